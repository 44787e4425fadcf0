"""`prism eval` of a k-way run: kway and kway-lora beside prism on the same items, the comparison and the
k-way gate's calibration."""

import json
import shutil

from helpers import KWAY_PERSONAS, write_mini_benchmarks
from prism.cli import main
from prism.evaluation.context import messages_for
from prism.evaluation.data import load_mmlu
from prism.evaluation.knowledge import choice_prompt
from prism.inference.transformers import PrismModel
from prism.lm.gate import save_threshold
from prism.runs import RunDir


def test_eval_of_a_kway_run_compares_both_routings_on_the_same_items_and_calibrates_the_kway_gate(
        tiny_kway_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_kway_run, run)
    save_threshold(run / "kway" / "gate", 0.0)  # every item to its k-way adapter: the two gates then disagree
    data = write_mini_benchmarks(tmp_path / "data")
    args = ["eval", str(run), "--limit", "2", "--data-dir", str(data), "--device", "cpu", "--batch-size", "8",
            "--mtbench-max-tokens", "6", "--jbb-max-tokens", "6", "--bench", "mmlu,mtbench,jbb"]
    assert main(args) == 0
    results = json.loads((run / "eval" / "results.json").read_text())
    assert {"prism", "kway", "kway-lora"} <= set(results)
    store = RunDir(run / "eval")
    mmlu = store.read("mmlu")
    model = PrismModel.from_run(run, device="cpu")
    assert not any(r.get("persona") for r in mmlu if r["system"] == "prism"), "prism is the binary routing"
    items = {it["id"]: it for it in load_mmlu(data, 2)}
    kway_rows = [r for r in mmlu if r["system"] == "kway"]
    assert len(kway_rows) == len(items) and all(r["persona"] in KWAY_PERSONAS for r in kway_rows)
    for r in kway_rows:
        question = messages_for("kway", choice_prompt(items[r["id"]]["question"], items[r["id"]]["choices"]), None)
        decision = model.decide([question])[0]
        assert (r["route"], r.get("persona")) == (decision.route, decision.persona)
    always = [r for r in mmlu if r["system"] == "kway-lora"]
    assert always and all(r["route"] == "persona" and r["persona"] in KWAY_PERSONAS for r in always)
    answers = {r["key"]: r for r in store.read("mtbench_answers")}
    for key, second in answers.items():
        if second["system"] in ("kway", "kway-lora") and second["turn"] == 1:
            first = answers[key[: key.rindex(":")] + ":0"]
            assert (second["route"], second.get("persona")) == (first["route"], first.get("persona"))
    comparison = json.loads((run / "eval" / "routing_comparison.json").read_text())
    assert set(comparison["rows"]) == {"mmlu", "mtbench", "jbb"}
    assert comparison["rows"]["mmlu"]["kway_minus_prism"]["items"] == results["base"]["mmlu"]["accuracy_n"]
    assert comparison["rows"]["jbb"]["kway_minus_prism"]["items"] == results["base"]["jbb"]["refusal_harmful_n"]
    shares = results["kway-lora"]["mmlu"]["routing_shares"]
    assert set(shares) <= set(KWAY_PERSONAS) and abs(sum(shares.values()) - 1) < 1e-9

    binary_threshold = json.loads((run / "gate" / "config.json").read_text())["threshold"]
    assert main(["calibrate", str(run), "--routing", "kway"]) == 0
    assert "the k-way gate's threshold" in capsys.readouterr().out
    chosen = json.loads((run / "eval" / "calibration-kway.json").read_text())["threshold"]
    assert json.loads((run / "kway" / "gate" / "config.json").read_text())["threshold"] == chosen
    assert json.loads((run / "gate" / "config.json").read_text())["threshold"] == binary_threshold

    assert main(["report", str(run)]) == 0
    report = (run / "eval" / "report.md").read_text()
    assert "## k-way against binary routing (the same items)" in report and "| mmlu accuracy |" in report
    assert "calibrated to" in report and (run / "eval" / "plots" / "kway_routing.png").is_file() == bool(
        any(row["kway_routing_shares"] for row in comparison["rows"].values()))


def test_the_comparison_pairs_only_rows_of_the_thresholds_and_scoring_in_force(tmp_path):
    from prism.evaluation.routing_comparison import compare_routings

    store = RunDir(tmp_path)
    rows = []
    for item in ("a", "b", "c"):
        for system, threshold, correct in (("prism", 0.5, True), ("kway", 0.4, item == "a")):
            rows.append({"key": f"{system}@{threshold}:letter:{item}", "system": system, "id": item,
                         "scoring": "letter", "correct": correct})
            # the same items under the other scoring, and routed at an older threshold: never paired
            rows.append({"key": f"{system}@{threshold}:cloze:{item}", "system": system, "id": item,
                         "scoring": "cloze", "correct": not correct})
            rows.append({"key": f"{system}@0.9:letter:{item}", "system": system, "id": item,
                         "scoring": "letter", "correct": not correct})
    store.append("mmlu", rows)
    results = {s: {"mmlu": {"accuracy": 0.5, "routing_rate": 0.0}} for s in ("prism", "kway")}
    comparison = compare_routings(store, results, {"mmlu": {"a", "b", "c"}}, {"prism": 0.5, "kway": 0.4}, "letter")
    paired = comparison["rows"]["mmlu"]["kway_minus_prism"]
    assert (paired["items"], paired["only_system"], paired["only_base"]) == (3, 0, 2)
