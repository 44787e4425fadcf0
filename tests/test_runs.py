import pytest

from prism.errors import PrismError
from prism.runs import RunDir


def test_append_and_read_back(tmp_path):
    run = RunDir(tmp_path)
    run.append("answers", [{"id": "a"}, {"id": "b"}])
    run.append("answers", [{"id": "c"}])
    assert [r["id"] for r in run.read("answers")] == ["a", "b", "c"]


def test_torn_last_line_is_skipped_then_replaced(tmp_path):
    run = RunDir(tmp_path)
    run.append("answers", [{"id": "a"}])
    with run.file("answers").open("a") as fh:
        fh.write('{"id": "b", "ans')  # a kill in the middle of a write
    assert [r["id"] for r in run.read("answers")] == ["a"]
    run.append("answers", [{"id": "b"}])
    assert [r["id"] for r in run.read("answers")] == ["a", "b"]


def test_complete_last_record_without_newline_is_kept(tmp_path):
    run = RunDir(tmp_path)
    run.append("answers", [{"id": "a"}])
    with run.file("answers").open("a") as fh:
        fh.write('{"id": "b"}')
    assert [r["id"] for r in run.read("answers")] == ["a", "b"]
    run.append("answers", [{"id": "c"}])
    assert [r["id"] for r in run.read("answers")] == ["a", "b", "c"]


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    run = RunDir(tmp_path)
    run.file("answers").write_text('{"id": "a"}\nnot json\n{"id": "c"}\n')
    with pytest.raises(PrismError, match=r"answers.jsonl:2 is not a valid JSON record.*fix or delete that line"):
        run.read("answers")
    assert run.file("answers").read_text().count("\n") == 3  # nothing was thrown away
