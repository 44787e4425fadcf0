import json

import pytest

from prism.errors import PrismError
from prism.evaluation.calibrate import (
    Objective,
    _candidates,
    calibrate,
    collect_outcomes,
    routing_curve,
    split_halves,
    value_at,
)
from prism.runs import RunDir


def write_records(run_dir, mtbench_lora, mtbench_gate, mmlu_gate):
    store = RunDir(run_dir / "eval")
    store.path.mkdir(parents=True)
    scores, answers = [], []
    for i, (lora, p) in enumerate(zip(mtbench_lora, mtbench_gate)):
        for system, score in (("base", 5.0), ("lora", lora), ("prism", None)):
            answers.append({"key": f"{system}:{i}:0", "system": system, "question_id": i, "turn": 0,
                            "route": "base", "gate_probability": p if system == "prism" else None})
            if score is not None:
                scores.append({"key": f"single:{system}:{i}:0", "system": system, "question_id": i, "turn": 0,
                               "score": score})
    store.append("mtbench_answers", answers)
    store.append("mtbench_scores", scores)
    mmlu = []
    for i, p in enumerate(mmlu_gate):
        mmlu += [{"key": f"base:{i}", "system": "base", "id": str(i), "correct": True, "gate_probability": None},
                 {"key": f"lora:{i}", "system": "lora", "id": str(i), "correct": False, "gate_probability": None},
                 {"key": f"prism:{i}", "system": "prism", "id": str(i), "correct": True, "gate_probability": p}]
    store.append("mmlu", mmlu)
    gate = run_dir / "gate"
    gate.mkdir()
    (gate / "config.json").write_text(json.dumps({"input_dim": 4, "threshold": 0.5}))
    RunDir(run_dir).save_manifest({"stages": {"gate": {"heldout_accuracy": 0.7, "heldout_method": "k-fold"}}})
    return store


def test_routing_curve_with_random_and_oracle_references(tmp_path):
    store = write_records(tmp_path, [8, 2, 8, 2], [0.9, 0.1, 0.8, 0.2], [0.85, 0.05])
    curve = routing_curve(collect_outcomes(store)["mtbench_score"])
    by_threshold = {round(p["threshold"], 6): p for p in curve["points"]}
    assert by_threshold[0.0]["share"] == 1.0 and by_threshold[0.0]["value"] == 5.0  # always adapter: mean lora
    assert by_threshold[0.8]["value"] == 6.5 and by_threshold[0.8]["random"] == 5.0
    assert curve["oracle"] == {"share": 0.5, "value": 6.5}


def test_calibrate_chooses_on_one_half_and_reports_on_the_other_within_the_mmlu_limit(tmp_path):
    store = write_records(tmp_path, [8, 2, 8, 2, 8, 2, 8, 2], [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4],
                          [0.85, 0.86])
    found = collect_outcomes(store)
    selection, held_out = split_halves(found["mtbench_score"])
    assert len(selection.ids) == len(held_out.ids) == 4 and set(selection.ids).isdisjoint(held_out.ids)
    mmlu_selection = split_halves(found["mmlu_accuracy"])[0]
    result = calibrate(tmp_path, Objective(max_mmlu_drop=0.5))
    best = result["threshold"]
    # chosen on the selection half: the best threshold there that keeps that half's MMLU item on base
    allowed = [t for t in _candidates(selection.probability + mmlu_selection.probability)
               if t > mmlu_selection.probability[0]]
    assert best in allowed and value_at(selection, best) == max(value_at(selection, t) for t in allowed)
    # reported on the other half
    assert result["at_threshold"]["mtbench_score"] == value_at(held_out, best)
    assert result["items"]["mtbench_score"] == {"selection": 4, "held_out": 4}
    assert result["curves"]["mtbench_score"]["items"] == 4
    assert json.loads((tmp_path / "gate" / "config.json").read_text())["threshold"] == best


def test_calibrate_without_records_says_what_to_run(tmp_path):
    (tmp_path / "eval").mkdir()
    with pytest.raises(PrismError, match="prism eval"):
        calibrate(tmp_path)


def test_calibrate_reads_only_the_last_evals_items(tmp_path):
    store = write_records(tmp_path, [8, 2, 8, 2], [0.9, 0.1, 0.8, 0.2], [0.85, 0.05])
    assert collect_outcomes(store)["mtbench_score"].base == [5.0] * 4
    # a later `prism eval --limit` covered questions 0 and 1 and MMLU item 1 only: the rest is older cache
    (store.path / "eval_config.json").write_text(json.dumps({"scoring": "letter",
                                                             "items": {"mtbench": [0, 1], "mmlu": ["1"]}}))
    found = collect_outcomes(store)
    assert found["mtbench_score"].adapter == [8.0, 2.0] and found["mtbench_score"].probability == [0.9, 0.1]
    assert found["mmlu_accuracy"].probability == [0.05]
    # another scoring's records are not this eval's
    (store.path / "eval_config.json").write_text(json.dumps({"scoring": "cloze"}))
    assert "mmlu_accuracy" not in collect_outcomes(store)
