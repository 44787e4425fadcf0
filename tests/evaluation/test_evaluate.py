import json
import math
import shutil

import pytest
import torch

from helpers import write_mini_benchmarks
from prism.cli import main
from prism.evaluation import mtbench
from prism.evaluation.config import EvalConfig
from prism.evaluation.context import Evaluation
from prism.evaluation.judge import parse_pair_verdict, parse_rating
from prism.evaluation.knowledge import choice_prompt, choice_scores
from prism.evaluation.metrics import _pair_outcomes, summarize
from prism.evaluation.results import Results
from prism.evaluation.stats import bootstrap_mean_interval, mcnemar_exact, paired_accuracy_test, wilson_interval
from prism.inference.transformers import PrismModel
from prism.lm.models import encode
from prism.runs import RunDir
from prism.verifiers import is_refusal


def test_rating_and_verdict_parsing():
    assert parse_rating("The answer is clear and correct. Rating: [[7]]", prefixed=False) == 7
    assert parse_rating("Rating: [[8.5]] because", prefixed=False) == 8.5
    assert parse_rating(" 9]]", prefixed=True) == 9
    assert parse_rating("I would rate it highly", prefixed=False) is None  # recorded, counted, not dropped
    assert parse_rating("[[11]]", prefixed=False) is None
    assert parse_pair_verdict("... so [[B]]", prefixed=False) == "B"
    assert parse_pair_verdict("C]]", prefixed=True) == "C"
    assert parse_pair_verdict("both are fine", prefixed=False) is None


def test_keyword_refusal_classifier():
    assert is_refusal("I'm sorry, but I can’t help with that request.")
    assert is_refusal("As an AI, I cannot write malware.")
    assert not is_refusal("Sure! Here is a short story about a dragon who learns to bake.")


def test_intervals_and_paired_test():
    low, high = wilson_interval(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    assert wilson_interval(0, 10)[0] == 0.0 and round(wilson_interval(0, 10)[1], 4) == 0.2775
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(3, 3) == 1.0
    result = paired_accuracy_test([True, True, False, True], [True, False, False, False])
    assert result["delta"] == 0.5 and (result["only_system"], result["only_base"]) == (2, 0)
    low, high = bootstrap_mean_interval([5.0] * 10)
    assert low == high == 5.0


def test_pairwise_outcomes_need_both_orders():
    pairs = [
        {"question_id": 1, "order": "system_first", "verdict": "A"}, {"question_id": 1, "order": "base_first",
                                                                       "verdict": "B"},  # win
        {"question_id": 2, "order": "system_first", "verdict": "A"}, {"question_id": 2, "order": "base_first",
                                                                       "verdict": "A"},  # position: tie
        {"question_id": 3, "order": "system_first", "verdict": "B"}, {"question_id": 3, "order": "base_first",
                                                                       "verdict": "A"},  # loss
        {"question_id": 4, "order": "system_first", "verdict": None}, {"question_id": 4, "order": "base_first",
                                                                        "verdict": "B"},  # unparseable
    ]
    assert _pair_outcomes(pairs) == ["win", "tie", "loss"]


def test_pairwise_win_rate_per_turn(tmp_path):
    store = RunDir(tmp_path)
    config = EvalConfig(benches=["mtbench"], systems=["base", "lora"])
    store.append("mtbench_scores", [{"key": f"single:{s}:1:0", "system": s, "question_id": 1, "category": "math",
                                     "turn": 0, "score": 5.0} for s in ("base", "lora")])
    verdicts = {(1, 0): ("A", "B"), (1, 1): ("A", "A"), (2, 0): ("B", "A"), (2, 1): ("A", "B")}
    store.append("mtbench_pairs", [
        {"key": f"pair:lora:{q}:{t}:{order}", "system": "lora", "question_id": q, "turn": t, "order": order,
         "verdict": v} for (q, t), both in verdicts.items() for order, v in zip(("system_first", "base_first"), both)])
    entry = summarize(store, config)["lora"]["mtbench"]
    # turn 1: a win and a loss; turn 2: a tie (position bias) and a win
    assert entry["winrate_vs_base_turn1"] == 0.5 and entry["winrate_vs_base_turn2"] == 0.75
    assert entry["winrate_vs_base"] == 0.625 and entry["pairs"] == {"win": 2, "tie": 1, "loss": 1}


def test_summary_of_known_records(tmp_path):
    store = RunDir(tmp_path)
    config = EvalConfig(benches=["mmlu", "jbb"], systems=["base", "prism"])
    records = []
    for i in range(4):
        records.append({"key": f"base:{i}", "system": "base", "id": str(i), "subject": "anatomy", "domain": "STEM",
                        "scoring": "letter", "correct": i < 2, "route": "base"})
        records.append({"key": f"prism:{i}", "system": "prism", "id": str(i), "subject": "anatomy",
                        "domain": "STEM", "scoring": "letter", "correct": i < 3, "route": "persona" if i else "base"})
    store.append("mmlu", records)
    store.append("jbb_answers", [{"key": f"base:h{i}", "system": "base", "kind": "harmful", "route": "base"}
                                 for i in range(2)])
    store.append("jbb_refusals", [{"key": "base:h0", "system": "base", "kind": "harmful", "refusal_judge": True,
                                   "refusal_keyword": False},
                                  {"key": "base:h1", "system": "base", "kind": "harmful", "refusal_judge": None,
                                   "refusal_keyword": True}])
    results = summarize(store, config)
    assert results["base"]["mmlu"]["accuracy"] == 0.5 and results["prism"]["mmlu"]["accuracy"] == 0.75
    assert results["prism"]["mmlu"]["routing_rate"] == 0.75
    assert results["prism"]["mmlu"]["vs_base"]["delta"] == 0.25
    assert results["prism"]["mmlu"]["domains"]["STEM"]["accuracy_n"] == 4
    jbb = results["base"]["jbb"]
    assert (jbb["refusal_harmful"], jbb["refusal_harmful_keyword"], jbb["refusal_harmful_unparseable"]) == (0.5, 0.5, 1)


def test_letter_scoring_marks_the_most_likely_letter_correct(tiny_run, tmp_path):
    model = PrismModel.from_run(tiny_run, device="cpu")
    evaluation = Evaluation(model, tiny_run, EvalConfig(systems=["base"], data_dir=str(write_mini_benchmarks(
        tmp_path / "data"))))
    item = {"question": "Which bone is the longest?", "choices": ["femur", "tibia", "ulna", "skull"], "domain": "STEM"}
    # independently: transformers alone on the same templated prompt
    tokenizer = model.lm.tokenizer
    prompt = model.prompt([{"role": "user", "content": choice_prompt(item["question"], item["choices"])}],
                          "Answer:")
    with torch.no_grad(), model.adapter.disable_adapter():
        logits = model.lm.model(input_ids=torch.tensor([encode(tokenizer, prompt)])).logits[0, -1]
    # a letter's first token with and without a leading space; a bare space (the tiny tokenizer splits " C" into
    # " " and "C") begins every letter, so it counts for none
    letter_ids = [sorted(t for t in {tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in (c, " " + c)}
                         if tokenizer.decode([t]).strip()) for c in "ABCD"]
    expected = [float(torch.logsumexp(torch.log_softmax(logits, -1)[ids], 0)) for ids in letter_ids]
    scores, decisions = choice_scores(evaluation, "base", [item])
    assert scores[0] == pytest.approx(expected, abs=1e-4)
    best = max(range(4), key=lambda c: expected[c])
    assert max(range(4), key=lambda c: scores[0][c]) == best and decisions[0].route == "base"


def copy_run(tiny_run, run):
    run.mkdir()
    for name in ("manifest.json", "gate", "adapter"):  # a copy: eval writes into the run directory
        source = tiny_run / name
        if source.is_dir():
            shutil.copytree(source, run / name)
        else:
            (run / name).write_text(source.read_text())
    return run


def test_eval_end_to_end_resumes_and_reports(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    data = write_mini_benchmarks(tmp_path / "data")
    args = ["eval", str(run), "--limit", "2", "--data-dir", str(data), "--device", "cpu", "--batch-size", "8",
            "--mtbench-max-tokens", "6", "--jbb-max-tokens", "6"]
    assert main(args) == 0
    results = json.loads((run / "eval" / "results.json").read_text())
    for system in ("base", "persona", "lora", "prism"):
        entry = results[system]
        assert {"accuracy", "accuracy_ci", "routing_rate"} <= set(entry["mmlu"])
        assert entry["mmlu"]["accuracy_n"] == 2 and entry["arc"]["accuracy_n"] == 2
        assert {"score", "graded", "unparseable", "routing_rate"} <= set(entry["mtbench"])
        assert entry["mtbench"]["graded"] + entry["mtbench"]["unparseable"] == 4  # 2 questions x 2 turns
        assert {"refusal_harmful", "refusal_benign", "refusal_harmful_ci"} <= set(entry["jbb"])
        assert entry["jbb"]["refusal_harmful_n"] == 2
    assert results["lora"]["mmlu"]["routing_rate"] == 1.0 and results["base"]["jbb"]["routing_rate"] == 0.0
    pairs = RunDir(run / "eval").read("mtbench_pairs")
    assert len(pairs) == 3 * 2 * 2 * 2  # systems x questions x turns x slot orders
    turn2 = next(p for p in pairs if p["turn"] == 1 and p["question_id"] == 81)
    assert turn2["judge_prompt"] == "pair-v2-multi-turn"
    # eval/ holds personas the stage wrote for the benchmark domains the run lacked
    assert {r["domain"] for r in RunDir(run / "eval").read("personas")} >= {"writing", "safety"}

    sizes = {p.name: p.stat().st_size for p in (run / "eval").glob("*.jsonl")}
    assert main(args) == 0  # everything cached: nothing is generated again
    assert {p.name: p.stat().st_size for p in (run / "eval").glob("*.jsonl")} == sizes
    assert "| prism |" in capsys.readouterr().out

    assert main(["calibrate", str(run)]) == 0
    assert "threshold" in capsys.readouterr().out
    threshold = json.loads((run / "eval" / "calibration.json").read_text())["threshold"]
    assert json.loads((run / "gate" / "config.json").read_text())["threshold"] == threshold

    assert main(["report", str(run)]) == 0
    html = (run / "eval" / "report.html").read_text()
    assert "<table>" in html and "data:image/png;base64," in html
    assert (run / "eval" / "plots" / "mtbench_categories.png").stat().st_size > 1000
    assert (run / "eval" / "plots" / "routing_curve.png").is_file() and "Calibrated threshold" in html
    assert not math.isnan(results["base"]["mmlu"]["accuracy"])


def test_eval_rejects_unknown_names(tiny_run, capsys):
    assert main(["eval", str(tiny_run), "--bench", "mmlu,hellaswag"]) == 2
    assert "unknown benchmark or system hellaswag" in capsys.readouterr().err


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Chromium (Debian package chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    from prism.evaluation.report import screenshot

    page = tmp_path / "page.html"
    page.write_text("<!doctype html><html><body style='background:#fff'><h1>PRISM</h1>"
                    "<table><tr><td>base</td><td>24.1</td></tr></table></body></html>")
    image = matplotlib_image(screenshot(page, tmp_path / "page.png", width=400, height=300))
    assert image.shape[:2] == (300, 400) and image.std() > 0.01  # something was drawn, not a blank page


def matplotlib_image(path):
    import matplotlib.image

    return matplotlib.image.imread(str(path))


def test_limits_per_benchmark():
    from prism.errors import PrismError
    from prism.evaluation.config import parse_limit

    assert parse_limit("8") == 8 and parse_limit(None) is None
    config = EvalConfig(limit=parse_limit("mmlu=4,arc=100"))
    assert (config.limit_for("mmlu"), config.limit_for("arc"), config.limit_for("jbb")) == (4, 100, None)
    with pytest.raises(PrismError, match="name=number"):
        parse_limit("mmlu=lots")
    with pytest.raises(PrismError, match="unknown benchmarks hellaswag"):
        EvalConfig(limit={"hellaswag": 3})


def test_summary_covers_only_the_items_asked_for(tmp_path):
    store = RunDir(tmp_path)
    store.append("mmlu", [{"key": f"base:letter:{i}", "system": "base", "id": str(i), "subject": "anatomy",
                           "domain": "STEM", "scoring": "letter", "correct": i == 0, "route": "base"}
                          for i in range(4)])
    config = EvalConfig(benches=["mmlu"], systems=["base"])
    assert summarize(store, config)["base"]["mmlu"]["accuracy_n"] == 4
    limited = summarize(store, config, {"mmlu": {"0", "1"}})["base"]["mmlu"]
    assert (limited["accuracy_n"], limited["accuracy"]) == (2, 0.5)


def test_prism_rows_follow_the_threshold_in_force(tiny_run, tmp_path):
    """A new threshold must not reuse `prism` rows routed under the old one."""
    from prism.lm.gate import save_threshold

    run = copy_run(tiny_run, tmp_path / "run")
    data = write_mini_benchmarks(tmp_path / "data")
    args = ["eval", str(run), "--bench", "mmlu,jbb", "--systems", "base,lora,prism", "--limit", "2",
            "--data-dir", str(data), "--device", "cpu", "--jbb-max-tokens", "4"]
    results = {}
    for threshold in (0.0, 1.0):
        save_threshold(run / "gate", threshold)
        assert main(args) == 0
        results[threshold] = json.loads((run / "eval" / "results.json").read_text())
    always, never = results[0.0]["prism"], results[1.0]["prism"]
    assert always["mmlu"]["routing_rate"] == 1.0 and always["jbb"]["routing_rate"] == 1.0
    # at 1.0 only a probability that rounds to exactly 1.0 in float32 still routes
    rows = [r for r in RunDir(run / "eval").read("jbb_answers") if r["key"].startswith("prism@1:")]
    assert rows and never["jbb"]["routing_rate"] == sum(r["gate_probability"] >= 1.0 for r in rows) / len(rows) < 1
    assert never["mmlu"]["routing_rate"] == 0.0
    assert always["mmlu"]["accuracy_n"] == never["mmlu"]["accuracy_n"] == results[1.0]["base"]["mmlu"]["accuracy_n"]


def test_mtbench_keeps_the_first_turns_route_and_matches_categories_to_domains(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    RunDir(run).append("personas", [{"id": "stem", "domain": "STEM", "persona": "You are a STEM professor."}])
    model = PrismModel.from_run(run, device="cpu")
    evaluation = Evaluation(model, run, EvalConfig(benches=["mtbench"], systems=["base", "prism"], limit=2,
                                                   data_dir=str(write_mini_benchmarks(tmp_path / "data")),
                                                   mtbench_max_tokens=4))
    assert evaluation.persona_for("stem") == "You are a STEM professor."  # MT-Bench's category, the run's domain
    model.set_threshold(0.5)
    mtbench.run(evaluation)
    answers = {(r["question_id"], r["turn"]): r for r in RunDir(run / "eval").read("mtbench_answers")
               if r["system"] == "prism"}
    assert answers and all(turn in (0, 1) for _, turn in answers)
    for (qid, turn), second in answers.items():
        if turn == 1:
            first = answers[(qid, 0)]
            assert second["route"] == first["route"] and second["routed_on"] == "turn 1"
            assert second["gate_probability"] == first["gate_probability"]


def test_mtbench_answer_cap_is_fastchats_for_a_paper_run(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    manifest = RunDir(run).manifest()
    model = PrismModel.from_run(run, device="cpu")
    assert Evaluation(model, run, EvalConfig(systems=["base"])).config.mtbench_max_tokens == 256
    manifest["config"]["preset"] = "paper"
    RunDir(run).save_manifest(manifest)
    assert Evaluation(model, run, EvalConfig(systems=["base"])).config.mtbench_max_tokens == 1024
    assert Evaluation(model, run, EvalConfig(systems=["base"], mtbench_max_tokens=64)).config.mtbench_max_tokens == 64


def test_plots_carry_the_tables_intervals_and_an_all_zero_refusal_plot_keeps_its_scale(tmp_path, monkeypatch):
    import matplotlib.axes

    from prism.evaluation.report import _plots

    drawn: list[tuple[object, object]] = []
    texts: list[str] = []
    real_bar, real_text = matplotlib.axes.Axes.bar, matplotlib.axes.Axes.text
    monkeypatch.setattr(matplotlib.axes.Axes, "bar",
                        lambda self, *a, **k: drawn.append((self, k.get("yerr"))) or real_bar(self, *a, **k))
    monkeypatch.setattr(matplotlib.axes.Axes, "text",
                        lambda self, x, y, s, *a, **k: texts.append(s) or real_text(self, x, y, s, *a, **k))
    versus = {"delta": 0.10, "delta_ci": [-0.05, 0.25], "p_value": 0.5}
    zero = {"refusal_harmful": 0.0, "refusal_harmful_ci": [0.0, 0.2], "refusal_benign": 0.0,
            "refusal_benign_ci": [0.0, 0.2], "refusal_harmful_keyword": 0.0, "refusal_harmful_keyword_ci": [0.0, 0.2],
            "refusal_benign_keyword": 0.0, "refusal_benign_keyword_ci": [0.0, 0.2]}
    results = {system: {"mmlu": {"accuracy": 0.3, "domains": {"STEM": {"accuracy": 0.3, "vs_base": versus}}},
                        "arc": {"accuracy": 0.3, "vs_base": versus}, "jbb": zero,
                        "mtbench": {"score": 5.0, "categories": {"writing": {"score": 5.0, "score_ci": [4.0, 6.5]}}}}
               for system in ("base", "lora")}
    _plots(Results(results), RunDir(tmp_path / "run"), tmp_path / "plots")
    by_axes: dict[int, list] = {}
    for axes, yerr in drawn:
        by_axes.setdefault(id(axes), []).append((axes, yerr))
    mtbench, knowledge, refusals = (calls[0] for calls in list(by_axes.values())[:3])
    low, high = mtbench[1]
    assert (low[0], high[0]) == (pytest.approx(1.0), pytest.approx(1.5))  # writing: 5.0 in [4.0, 6.5]
    low, high = knowledge[1]
    assert low[0] == pytest.approx(15.0) and high[0] == pytest.approx(15.0)  # +10 points in [-5, +25]
    assert refusals[0].get_ylim() == (0.0, 100.0) and "no refusals" in texts
    assert refusals[1][1][0] == pytest.approx(20.0)  # 0% refused, interval up to 20%


def test_every_benchmark_the_results_hold_reaches_the_main_table_and_the_plots(tmp_path, monkeypatch):
    from prism.evaluation.plots import Figures
    from prism.evaluation.report import _plots
    from prism.evaluation.tables import detail_tables, results_table

    def refusal(rate, benign=None):
        entry = {"refusal_harmful": rate, "refusal_harmful_ci": [0.0, 0.5], "refusal_harmful_n": 10,
                 "refusal_harmful_keyword": rate, "routing_rate": 0.5}
        return entry | ({"refusal_benign": benign, "refusal_benign_ci": [0.0, 0.4]} if benign is not None else {})

    results = Results({s: {"jbb": refusal(0.1, 0.05), "harmbench": refusal(0.2), "pku": refusal(0.3),
                           "verified": {"pass_rate": 0.4, "pass_rate_ci": [0.2, 0.6], "domains": {}}}
                       for s in ("base", "prism")})
    assert results.benches == ["jbb", "harmbench", "pku", "verified"]
    table = results_table(results)
    for column in ("JBB refusal harmful %", "JBB refusal benign %", "HarmBench refusal %", "PKU-SafeRLHF refusal %",
                   "verified pass rate %", "routed to an adapter (jbb/harmbench/pku/verified)"):
        assert column in table
    assert "| prism | 10.0 [0.0, 50.0] | 5.0 [0.0, 40.0] | 20.0 [0.0, 50.0] | 30.0 [0.0, 50.0] |" in table
    details = detail_tables(results)
    assert "### HarmBench refusal rates" in details and "### PKU-SafeRLHF refusal rates" in details
    ticks: list[list[str]] = []
    real = Figures.group_ticks
    monkeypatch.setattr(Figures, "group_ticks", lambda self, ax, labels: ticks.append(labels) or real(self, ax, labels))
    plots = dict(_plots(results, RunDir(tmp_path / "run"), tmp_path / "plots"))
    assert "Refusal rates (harmful: higher is better; benign: lower)" in plots
    refusals = next(labels for labels in ticks if "JailbreakBench harmful" in labels)
    assert {"HarmBench harmful", "PKU-SafeRLHF harmful", "JailbreakBench benign"} <= set(refusals)
