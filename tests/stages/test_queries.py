import json

import pytest

from prism.runs import RunDir
from prism.stages.pipeline import bootstrap
from prism.stages.queries import NearDuplicateFilter, clean_query, query_status


@pytest.mark.parametrize("raw, expected", [
    ("How do I write a sonnet about the sea?\nSecond line", "How do I write a sonnet about the sea?"),
    ("1. What is the boiling point of water at altitude?", "What is the boiling point of water at altitude?"),
    ("A user might ask:\n\n\"How can I review a pull request well?\"", "How can I review a pull request well?"),
    ('A user might ask: "What makes a villain believable?" and more', "What makes a villain believable?"),
    ("Question: Why is the sky blue?", "Why is the sky blue?"),
    ("- **Explain quicksort simply**", "Explain quicksort simply"),
    ("\n\n", ""),
])
def test_clean_query(raw, expected):
    assert clean_query(raw) == expected


def test_near_duplicates_are_dropped_at_rouge_l_threshold():
    dedup = NearDuplicateFilter(0.7, ["How do I write a poem about the sea?"])
    assert dedup.is_duplicate("How do I write a poem about the ocean?")
    assert not dedup.is_duplicate("What is the capital of Australia?")


def test_query_status_rules():
    dedup = NearDuplicateFilter(0.7, ["Explain how vaccines train the immune system."])
    assert query_status("Too short?", 15, dedup, 0, 4) == "too_short"
    assert query_status("Explain how vaccines train the immune system!", 15, dedup, 0, 4) == "duplicate"
    assert query_status("What is a good first programming language?", 15, dedup, 4, 4) == "surplus"
    assert query_status("What is a good first programming language?", 15, dedup, 3, 4) == "kept"


def _queries_until_the_answers(config, run):
    """The bootstrap of `config` into `run` up to its answers stage (stopped there), and the run's query records."""
    append = RunDir.append

    def stop_at_the_answers(self, name, records):
        if name == "answers":
            raise KeyboardInterrupt
        append(self, name, records)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RunDir, "append", stop_at_the_answers)
        with pytest.raises(KeyboardInterrupt):
            bootstrap(config, run)
    return sorted(RunDir(run).read("queries"), key=lambda r: r["id"])


def test_a_run_made_before_the_query_nucleus_resumes_without_one(tiny_config, tmp_path):
    """A run that predates query_top_p sampled its queries without a nucleus: stopped in its queries stage and
    resumed by the same command (today's default, 0.9), it ends with the queries of an uninterrupted run at 1."""
    settings = dict(domains=["math", "safety"], queries_per_persona=4, batch_size=3, query_temperature=1.5)
    assert tiny_config(**settings).query_top_p == 0.9
    whole = _queries_until_the_answers(tiny_config(**settings, query_top_p=1.0), tmp_path / "whole")
    assert _queries_until_the_answers(tiny_config(**settings), tmp_path / "today") != whole  # the nucleus matters
    old = tmp_path / "old"
    saves = []
    append = RunDir.append

    def stop_after_one_save_of_queries(self, name, records):
        if name == "queries" and saves:
            raise KeyboardInterrupt
        append(self, name, records)
        if name == "queries":
            saves.append(len(records))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RunDir, "append", stop_after_one_save_of_queries)
        with pytest.raises(KeyboardInterrupt):
            bootstrap(tiny_config(**settings, query_top_p=1.0), old)
    assert 0 < len(RunDir(old).read("queries")) < len(whole)
    manifest = json.loads((old / "manifest.json").read_text())
    for recorded in (manifest["config"], manifest["config_identity"]):  # as a run made before the field recorded it
        recorded.pop("query_top_p")
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert _queries_until_the_answers(tiny_config(**settings), old) == whole
