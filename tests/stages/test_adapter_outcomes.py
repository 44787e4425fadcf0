"""The adapter_outcomes stage: the adapter's own answers judged against the plain ones, and the gate learning from
those verdicts rather than the teacher's (gate_labels "adapter")."""

import torch
from test_judges import PAIRS, prepared_run
from test_pipeline import plant_a_judge_that_prefers_some_persona_answers

from prism.runs import STAGES, RunDir, adapter_dir
from prism.stages import adapter_outcomes, distill, gate, verify
from prism.stages.answers import answers_by_sample
from prism.stages.context import StageContext
from prism.stages.pipeline import bootstrap, distill_run
from prism.stages.queries import kept_queries

# The adapter's answers, by query, against the plain answers of PAIRS judged by max-words:5: it wins only where the
# plain answer is long and its own short (q3), loses where the reverse (q1), and ties elsewhere; the teacher's
# persona answers won q0 and q4 instead.
ADAPTER = {"q0": "A long adapter answer that runs past five words.", "q1": "An adapter answer of far too many words.",
           "q2": "Yes.", "q3": "Short one.", "q4": "Another answer well beyond the five word limit.", "q5": "Fine."}
TIMES = 3  # PAIRS three times over: enough queries of each class for the gate's folds


def run_with_adapter_answers(tmp_path, tiny_config, tiny_lm) -> StageContext:
    ctx = prepared_run(tmp_path / "run", tiny_config, pairs=PAIRS * TIMES, judge="verifier", verifier="max-words:5",
                       gate_labels="adapter")
    ctx.lm = tiny_lm
    verify.run(ctx)
    ctx.run.update_stage("verify", status="done")
    adapter_dir(ctx.run.path).mkdir(parents=True)
    (adapter_dir(ctx.run.path) / "adapter_model.safetensors").write_bytes(b"")  # its answers are written below
    ctx.run.append("adapter_answers", [
        {"id": f"q{i}:adapter", "query_id": f"q{i}", "variant": "adapter", "answer": ADAPTER[f"q{i % len(PAIRS)}"]}
        for i in range(len(PAIRS) * TIMES)])
    return ctx


def test_the_gate_learns_the_adapters_outcomes_not_the_teachers(tiny_config, tiny_lm, tmp_path):
    ctx = run_with_adapter_answers(tmp_path, tiny_config, tiny_lm)
    info = adapter_outcomes.run(ctx)
    ctx.run.update_stage("adapter_outcomes", status="done", **info)
    outcomes = {r["query_id"]: r["outcome"] for r in ctx.run.read("adapter_labels")}
    expected = {"q0": "tie", "q1": "loss", "q2": "tie", "q3": "win", "q4": "tie", "q5": "tie"}
    assert outcomes == {f"q{i}": expected[f"q{i % len(PAIRS)}"] for i in range(len(PAIRS) * TIMES)}
    assert info["adapter_outcomes"] == {"win": TIMES, "tie": 4 * TIMES, "loss": TIMES}
    labels = {r["query_id"]: r for r in ctx.run.read("adapter_labels")}
    assert labels["q3"]["persona_answer"] == ADAPTER["q3"] and labels["q3"]["plain_answer"] == PAIRS[3][2]
    teacher = {r["query_id"]: r["outcome"] for r in ctx.run.read("labels")}
    assert teacher["q0"] == "win" and teacher["q3"] == "tie"  # the teacher says otherwise

    fitted = gate.run(ctx)
    assert fitted["targets"]["labels"] == "adapter_labels"
    assert fitted["positives"] == TIMES  # the adapter's wins (q3), not the teacher's (q0, q4)
    assert fitted["targets"]["domain_win_rates"] != gate.run(with_teacher_labels(ctx))["targets"]["domain_win_rates"]


def with_teacher_labels(ctx: StageContext) -> StageContext:
    ctx.run.update_stage("adapter_outcomes", status="skipped")
    return ctx


def test_the_adapter_answers_on_the_real_generation_path_and_leaves_the_base_model_bare(tiny_config, tiny_lm,
                                                                                        tmp_path):
    ctx = prepared_run(tmp_path / "run", tiny_config, judge="verifier", verifier="max-words:5", gate_labels="adapter",
                       distill_epochs=1)
    ctx.lm = tiny_lm
    verify.run(ctx)
    # every query distilled, so that an adapter exists whatever the verdicts on the tiny model's text
    ctx.run.rewrite("labels", [dict(r, label=1, split="distill") for r in ctx.run.read("labels")])
    distill.run(ctx)
    prompt = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        before = tiny_lm.model(prompt).logits
    info = adapter_outcomes.run(ctx)
    assert info["queries"] == len(PAIRS) and sum(info["adapter_outcomes"].values()) == len(PAIRS)
    answers = answers_by_sample(RunDir(ctx.run.path).read("adapter_answers"))
    assert {qid for qid, _, _ in answers} == {q["id"] for q in kept_queries(ctx.run.read("queries"))}
    assert not any("lora" in name for name, _ in tiny_lm.model.named_modules())
    with torch.no_grad():
        assert torch.equal(tiny_lm.model(prompt).logits, before)
    assert adapter_outcomes.run(ctx)["queries"] == len(PAIRS)  # resumed: nothing generated twice
    assert len(ctx.run.read("adapter_answers")) == len(PAIRS)


def test_the_stage_says_why_it_has_nothing_to_do(tiny_config, tmp_path):
    ctx = prepared_run(tmp_path / "run", tiny_config, gate_labels="persona")
    assert "teacher's verdicts" in adapter_outcomes.run(ctx)["why"]
    ctx = prepared_run(tmp_path / "other", tiny_config, gate_labels="adapter")
    assert "no adapter" in adapter_outcomes.skip_reason(ctx.config, ctx.run)


def test_the_bootstrap_runs_the_stage_between_distill_and_gate_and_a_change_of_labels_keeps_the_adapter(
        tiny_config, tmp_path, monkeypatch):
    plant_a_judge_that_prefers_some_persona_answers(monkeypatch)
    config = tiny_config(seed=5, queries_per_persona=8, gate_labels="adapter")
    summary = bootstrap(config, tmp_path / "run")
    assert summary["stages"] == {s: "done" for s in STAGES}
    run = RunDir(tmp_path / "run")
    manifest = run.manifest()["stages"]
    assert manifest["distill"]["finished"] <= manifest["adapter_outcomes"]["started"] <= manifest["gate"]["started"]
    assert len(run.read("adapter_labels")) == summary["counts"]["queries"]
    assert manifest["gate"]["targets"]["labels"] == "adapter_labels"
    assert sum(summary["adapter_outcomes"]["adapter_outcomes"].values()) == summary["counts"]["queries"]
    adapter = (run.path / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns

    summary = bootstrap(tiny_config(seed=5, queries_per_persona=8, gate_labels="persona"), run.path)
    manifest = run.manifest()["stages"]
    assert summary["stages"]["adapter_outcomes"] == "skipped" and manifest["gate"]["targets"]["labels"] == "labels"
    assert (run.path / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == adapter


def test_a_retrained_adapter_has_its_outcomes_judged_again(tiny_config, tmp_path, monkeypatch, caplog):
    plant_a_judge_that_prefers_some_persona_answers(monkeypatch)
    config = tiny_config(seed=5, queries_per_persona=8, gate_labels="adapter")
    run = RunDir(tmp_path / "run")
    bootstrap(config, run.path)
    old_answers = run.read("adapter_answers")
    summary = distill_run(run.path, force=True)
    assert summary["stages"]["distill"] == "done"
    assert summary["stages"]["adapter_outcomes"] == summary["stages"]["gate"] == "pending"
    assert not run.file("adapter_answers").exists() and list(run.path.glob("replaced-*/adapter_answers.jsonl"))
    assert "prism bootstrap --out" in caplog.text
    summary = bootstrap(config, run.path)
    assert summary["stages"]["adapter_outcomes"] == summary["stages"]["gate"] == "done"
    assert len(run.read("adapter_answers")) == len(old_answers)
