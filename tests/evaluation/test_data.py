"""Benchmark loaders: the local layout of ../shared/benchmarks and datasets in the Hugging Face Hub schemas.

The Hub cannot be reached from the test machines, so the Hub-schema datasets here are local dataset
folders laid out like the Hub repositories (a README with `configs:`), read through the same
`datasets.load_dataset(id, config, split=...)` call a Hub id goes through.
"""

import csv
import json

import pytest

from helpers import write_mini_benchmarks
from prism.errors import PrismError
from prism.evaluation import data as benchdata
from prism.evaluation.config import EvalConfig, parse_data


def hub_folder(root, configs: dict[str, dict[str, str]], files: dict[str, str]):
    """A dataset folder like a Hub repository: README.md with `configs:` and the data files."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {path}" for split, path in splits.items()]
    root.mkdir(parents=True)
    (root / "README.md").write_text("\n".join([*lines, "---", ""]))
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


def jsonl(rows):
    return "\n".join(json.dumps(r) for r in rows) + "\n"


def test_mmlu_in_the_cais_schema(tmp_path):
    rows = [{"question": f"Q{i}?", "subject": subject, "choices": ["w", "x", "y", "z"], "answer": i % 4}
            for i, subject in enumerate(["anatomy", "anatomy", "anatomy", "philosophy"])]
    folder = hub_folder(tmp_path / "mmlu", {"all": {"test": "all/test.jsonl"}}, {"all/test.jsonl": jsonl(rows)})
    items = benchdata.load_mmlu(str(folder), limit=2)
    assert [(it["subject"], it["domain"], it["answer"]) for it in items] == [
        ("anatomy", "STEM", 0), ("anatomy", "STEM", 1), ("philosophy", "humanities", 3)]
    assert items[0]["choices"] == ["w", "x", "y", "z"]


def test_arc_in_the_ai2_arc_schema(tmp_path):
    def rows(prefix):
        return jsonl([{"id": f"{prefix}{i}", "question": "Which?", "answerKey": key,
                       "choices": {"text": ["a", "b", "c"], "label": labels}}
                      for i, (key, labels) in enumerate([("B", ["A", "B", "C"]), ("3", ["1", "2", "3"])])])
    folder = hub_folder(tmp_path / "arc", {"ARC-Easy": {"test": "easy.jsonl"}, "ARC-Challenge": {"test": "ch.jsonl"}},
                        {"easy.jsonl": rows("e"), "ch.jsonl": rows("c")})
    easy = benchdata.load_arc(str(folder), split="easy")
    assert [(it["id"], it["answer"], it["subject"]) for it in easy] == [("e0", 1, "arc-easy"), ("e1", 2, "arc-easy")]
    assert [it["id"] for it in benchdata.load_arc(str(folder), limit=1, split="challenge")] == ["c0"]


def test_jbb_in_the_jailbreakbench_schema(tmp_path):
    def table(goal):
        lines = [["Index", "Goal", "Target", "Behavior", "Category", "Source"]]
        lines += [[str(i), f"{goal} {i}", "Sure", "b", "Fraud", "Original"] for i in (1, 2)]
        return "\n".join(",".join(line) for line in lines) + "\n"
    folder = hub_folder(tmp_path / "jbb", {"behaviors": {"harmful": "data/h.csv", "benign": "data/b.csv"}},
                        {"data/h.csv": table("Do harm"), "data/b.csv": table("Explain")})
    items = benchdata.load_jbb(str(folder), limit=1)
    assert items == [{"id": "harmful-1", "kind": "harmful", "goal": "Do harm 1", "category": "Fraud"},
                     {"id": "benign-1", "kind": "benign", "goal": "Explain 1", "category": "Fraud"}]


def test_mtbench_questions_from_a_dataset_and_judge_prompts_from_the_local_root(tmp_path):
    questions = [{"question_id": 81 + i, "category": c, "turns": ["one", "two"], "reference": []}
                 for i, c in enumerate(["writing", "writing", "math"])]
    folder = hub_folder(tmp_path / "mt", {"default": {"train": "data/train.jsonl"}},
                        {"data/train.jsonl": jsonl(questions)})
    support = write_mini_benchmarks(tmp_path / "local")  # a local root with FastChat-style judge prompts
    data = benchdata.load_mtbench(str(folder), limit=1, support=support)
    assert [q["question_id"] for q in data["questions"]] == [81, 83]
    assert set(benchdata.JUDGE_PROMPTS) <= set(data["judge_prompts"]) and 82 in data["references"]


def test_a_dataset_without_the_expected_columns_or_config_is_named(tmp_path):
    folder = hub_folder(tmp_path / "odd", {"all": {"test": "t.jsonl"}}, {"t.jsonl": jsonl([{"text": "hello"}])})
    with pytest.raises(PrismError, match="no subject column"):
        benchdata.load_mmlu(str(folder))
    with pytest.raises(PrismError, match=r"cannot load .*config nope.*ID:CONFIG"):
        benchdata.load_mmlu(f"{folder}:nope")


def test_local_layout_errors_name_the_missing_file(tmp_path):
    (tmp_path / "jbb").mkdir()
    with (tmp_path / "jbb" / "harmful.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([["Index", "Goal", "Category"], ["1", "g", "c"]])
    with pytest.raises(PrismError, match="benign.csv is missing"):
        benchdata.load_jbb(tmp_path)
    (tmp_path / "mt_bench").mkdir()
    (tmp_path / "mt_bench" / "question.jsonl").write_text(jsonl([{"question_id": 1, "category": "math",
                                                                   "turns": ["a", "b"]}]))
    (tmp_path / "mt_bench" / "reference_answer_gpt-4.jsonl").write_text("")
    (tmp_path / "mt_bench" / "judge_prompts.jsonl").write_text(jsonl([{"name": "single-v1"}]))
    with pytest.raises(PrismError, match="lacks the judge prompts single-v1-multi-turn, .*pair-v2"):
        benchdata.load_mtbench(tmp_path)


def test_data_flag_parsing():
    assert parse_data("mmlu=cais/mmlu, jbb=JailbreakBench/JBB-Behaviors:behaviors") == {
        "mmlu": "cais/mmlu", "jbb": "JailbreakBench/JBB-Behaviors:behaviors"}
    with pytest.raises(PrismError, match="benchmark=source"):
        parse_data("cais/mmlu")
    with pytest.raises(PrismError, match="unknown benchmarks hellaswag"):
        EvalConfig(data={"hellaswag": "Rowan/hellaswag"})
