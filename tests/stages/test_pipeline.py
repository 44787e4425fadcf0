"""The whole bootstrap on the tiny random model: artifacts, resume, and the errors users see."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import whole_and_resumed
from prism.cli import main
from prism.errors import PrismError
from prism.runs import STAGES, RunDir
from prism.stages import pipeline
from prism.stages.inspect import inspect_run
from prism.stages.pipeline import bootstrap

SEED = 5


def plant_a_judge_that_prefers_some_persona_answers(monkeypatch) -> None:
    """The tiny random model's judge says TIE for almost every pair, so the persona never wins both orders.
    This judge runs the real scoring pass, then puts its probability on the slot holding the persona
    answer for every other query (by answer length), so the gate and the distillation get both labels."""
    from prism.engines.base import OptionProbs
    from prism.engines.local import LocalEngine

    real = LocalEngine.option_probs

    def option_probs(self, prompts, options, **kwargs):
        verdicts = real(self, prompts, options, **kwargs)
        planted = []
        for prompt, verdict in zip(prompts, verdicts):
            answer_a = prompt.user.split("[Answer A]\n", 1)[1].split("\n\n[Answer B]\n", 1)[0]
            answer_b = prompt.user.split("\n\n[Answer B]\n", 1)[1].split("\n\nWhich answer", 1)[0]
            persona_slot = "A" if answer_a in self.persona_answers else "B"
            favoured = self.persona_answers.get(answer_a if persona_slot == "A" else answer_b, 1) % 2 == 0
            winner = persona_slot if favoured else "TIE"
            planted.append(OptionProbs({o: 0.9 if o == winner else 0.05 for o in options}, verdict.mass, "logits"))
        return planted

    monkeypatch.setattr(LocalEngine, "option_probs", option_probs)
    monkeypatch.setattr(LocalEngine, "persona_answers", {}, raising=False)
    from prism.stages import verify

    run_verify = verify.run

    def verify_with_known_answers(ctx):
        answers = {a["answer"]: len(a["answer"]) for a in ctx.run.read("answers") if a["variant"] == "persona"}
        plain = {a["answer"] for a in ctx.run.read("answers") if a["variant"] == "plain"}
        LocalEngine.persona_answers = {k: v for k, v in answers.items() if k not in plain}
        return run_verify(ctx)

    monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, "verify", verify_with_known_answers)


def test_bootstrap_end_to_end_writes_every_artifact(tiny_config, tmp_path, monkeypatch):
    plant_a_judge_that_prefers_some_persona_answers(monkeypatch)
    config = tiny_config(seed=SEED, queries_per_persona=8)
    summary = bootstrap(config, tmp_path / "run")
    assert summary["stages"] == {s: "skipped" if s == "adapter_outcomes" else "done" for s in STAGES}  # gate_labels
    counts = summary["counts"]
    assert counts["personas"] == 3
    assert counts["queries"] == 24
    assert counts["answers"] == 2 * counts["queries"]
    assert counts["judgments"] == 2 * counts["queries"]
    assert counts["distill"] + counts["retain"] == counts["queries"]
    assert counts["distill"] >= 2 and counts["retain"] >= 2
    assert summary["distill"]["steps"] > 0 and summary["distill"]["loss_first"] > 0
    assert summary["distill"]["persona_signal"] > 1e-3  # the teacher saw the persona
    assert summary["verify"]["pairs"] == counts["queries"] and summary["verify"]["distill_calibrated_rule"] >= 2
    assert summary["adapter"]["trainable_params"] > 0
    gate = summary["gate"]
    assert gate["kind"] in ("logistic", "mlp", "knn") and gate["kind"] == gate["classifier"]["chosen"].split()[0]
    assert gate["heldout_accuracy"] is not None and 0 <= gate["threshold"]["threshold"] <= 1
    run = tmp_path / "run"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["layers_to_transform"] == [1, 2]
    assert (run / "gate" / "gate.safetensors").is_file() and (run / "gate" / "config.json").is_file()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["seed"] == SEED and manifest["versions"]["torch"]
    assert manifest["model"]["num_layers"] == 3
    assert all(manifest["stages"][s]["seconds"] >= 0 for s in STAGES)
    labels = RunDir(run).read("labels")
    assert all(set(r["verdicts"]) == {"persona_first", "persona_second"} for r in labels)

    # A second run with the same config does nothing and changes nothing.
    before = {p.name: p.stat().st_mtime_ns for p in run.glob("*.jsonl")}
    assert bootstrap(config, run)["counts"] == counts
    assert {p.name: p.stat().st_mtime_ns for p in run.glob("*.jsonl")} == before


def test_same_seed_same_run(tiny_config, tmp_path):
    config = tiny_config(domains=["math"], queries_per_persona=2)
    first = bootstrap(config, tmp_path / "a")
    second = bootstrap(config, tmp_path / "b")
    assert first["counts"] == second["counts"]
    for name in ("queries", "answers", "labels"):
        assert RunDir(tmp_path / "a").read(name) == RunDir(tmp_path / "b").read(name)


def test_a_persona_that_never_wins_skips_training_and_routes_to_base(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr("prism.stages.judge_pairwise.both_orders_label", lambda verdicts: 0)
    summary = bootstrap(tiny_config(domains=["math"], queries_per_persona=2), tmp_path / "run")
    assert summary["stages"]["distill"] == "skipped"
    assert summary["gate"] == {**summary["gate"], "kind": "constant", "constant_route": 0}
    assert not (tmp_path / "run" / "adapter").exists()


def test_user_written_personas(tiny_config, tmp_path):
    personas = tmp_path / "personas.yaml"
    personas.write_text("code review: You are a senior engineer who reviews code for bugs first.\n")
    bootstrap(tiny_config(personas_file=str(personas), queries_per_persona=2), tmp_path / "run")
    records = RunDir(tmp_path / "run").read("personas")
    assert records == [{"id": "code-review", "domain": "code review", "source": "user",
                        "persona": "You are a senior engineer who reviews code for bugs first."}]


def _cli(args, capsys):
    capsys.readouterr()  # drop what earlier steps of the test printed
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code, err, fragment):
    assert code == 2
    assert "Traceback" not in err
    assert err.startswith("prism: error:") and err.count("\n") == 1
    assert fragment in err


def test_unknown_model_path_is_one_clear_line(tmp_path, capsys):
    code, _, err = _cli(["bootstrap", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "r")], capsys)
    _assert_one_line_error(code, err, "does not exist")


def test_empty_domain_list_is_one_clear_line(tmp_path, capsys):
    code, _, err = _cli(["bootstrap", "--domains", " , ", "--out", str(tmp_path / "r")], capsys)
    _assert_one_line_error(code, err, "domain list is empty")


def test_corrupt_jsonl_line_is_named_and_nothing_is_lost(tiny_config, tmp_path, capsys):
    config = tiny_config(domains=["math"], queries_per_persona=2)
    run = tmp_path / "run"
    bootstrap(config, run)
    answers = (run / "answers.jsonl").read_text().splitlines()
    (run / "answers.jsonl").write_text("\n".join([answers[0], "{broken", *answers[1:]]) + "\n")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"]["answers"]["status"] = "partial"
    (run / "manifest.json").write_text(json.dumps(manifest))
    args = ["bootstrap", "--out", str(run), "--model", config.model, "--domains", "math", "--preset", "tiny",
            "--queries-per-persona", "2", "--persona-max-tokens", "24", "--query-max-tokens", "16",
            "--answer-max-tokens", "12", "--batch-size", "8", "--distill-epochs", "3", "--distill-batch-size", "2",
            "--distill-micro-batch-size", "2", "--gate-epochs", "10", "--device", "cpu"]
    code, _, err = _cli(args, capsys)
    _assert_one_line_error(code, err, "answers.jsonl:2 is not a valid JSON record")
    assert len((run / "answers.jsonl").read_text().splitlines()) == len(answers) + 1  # nothing dropped
    code, _, err = _cli(["inspect", str(run)], capsys)
    _assert_one_line_error(code, err, "answers.jsonl:2")


def test_config_mismatch_is_refused_then_force_moves_the_old_run_aside(tiny_config, tmp_path, capsys):
    config = tiny_config(domains=["math"], queries_per_persona=2)
    run = tmp_path / "run"
    bootstrap(config, run)
    args = ["bootstrap", "--out", str(run), "--model", config.model, "--domains", "math", "--preset", "tiny",
            "--queries-per-persona", "3", "--device", "cpu"]
    code, _, err = _cli(args, capsys)
    _assert_one_line_error(code, err, "queries_per_persona: 2 -> 3")
    assert RunDir(run).manifest()["config"]["queries_per_persona"] == 2  # untouched
    code, _, _ = _cli([*args, "--force", "--persona-max-tokens", "24", "--query-max-tokens", "16",
                       "--answer-max-tokens", "12", "--batch-size", "8", "--distill-epochs", "1",
                       "--gate-epochs", "2"], capsys)
    assert code == 0
    assert RunDir(run).manifest()["config"]["queries_per_persona"] == 3
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and (aside[0] / "answers.jsonl").is_file()


def test_other_gate_settings_keep_the_labels_and_train_the_gate_again(tiny_config, tmp_path, monkeypatch):
    """Another pooling or classifier: only the gate stage runs again; another gate layer: the adapter too, on the
    blocks above the new layer. The answers and labels are the run's own, and the old outputs are set aside."""
    plant_a_judge_that_prefers_some_persona_answers(monkeypatch)
    run = tmp_path / "run"
    bootstrap(tiny_config(gate_pool="last", gate_classifier="mlp"), run)
    kept = {name: (run / name).stat().st_mtime_ns for name in ("answers.jsonl", "labels.jsonl")}
    adapter = (run / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns

    summary = bootstrap(tiny_config(gate_pool="mean", gate_classifier="logistic"), run)
    assert json.loads((run / "gate" / "config.json").read_text())["pool"] == "mean"
    assert summary["gate"]["kind"] == "logistic"
    assert (run / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == adapter
    assert [p.name for p in run.glob("replaced-*/gate")] == ["gate"]

    bootstrap(tiny_config(gate_pool="mean", gate_classifier="logistic", gate_layer=1), run)
    assert json.loads((run / "gate" / "config.json").read_text())["layer"] == 1
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["layers_to_transform"] == [2]
    assert {name: (run / name).stat().st_mtime_ns for name in kept} == kept
    assert len(list(run.glob("replaced-*/adapter"))) == 1


def test_inspect_json_has_the_documented_keys(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    bootstrap(tiny_config(domains=["math"], queries_per_persona=2), run)
    code, out, _ = _cli(["inspect", str(run), "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert set(data) >= {"stages", "counts", "gate", "adapter", "distill"}
    assert set(data["counts"]) >= {"personas", "queries", "answers", "judgments", "distill", "retain"}
    code, out, _ = _cli(["inspect", str(run)], capsys)
    assert "judgments 4" in out


def test_killed_mid_stage_resumes_without_duplicates_or_losses(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "prism.cli", "bootstrap", "--out", str(run), "--model", str(tiny_model_dir),
            "--domains", "writing,safety,math", "--preset", "tiny", "--queries-per-persona", "4",
            "--persona-max-tokens", "24", "--query-max-tokens", "16", "--answer-max-tokens", "48",
            "--batch-size", "1", "--distill-epochs", "2", "--distill-batch-size", "2", "--gate-epochs", "5",
            "--device", "cpu", "--threads", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    answers = run / "answers.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not answers.exists() or len(answers.read_text().splitlines()) < 3):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = len(answers.read_text().splitlines())
    assert 3 <= partial < 24, "the kill should land in the middle of the answers stage"
    assert RunDir(run).stage_status("answers") == "partial"
    assert inspect_run(run)["stages"]["answers"] == "partial"

    finished = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    ids = [r["id"] for r in RunDir(run).read("answers")]
    assert len(ids) == len(set(ids)) == 24
    queries = [q["id"] for q in RunDir(run).read("queries") if q["status"] == "kept"]
    assert set(ids) == {f"{q}:{v}" for q in queries for v in ("plain", "persona")}
    distilled = inspect_run(run)["stages"]["distill"]  # the adapter's outcomes are judged when there is one
    assert inspect_run(run)["stages"] == {s: "done" for s in STAGES} | {
        "distill": distilled, "adapter_outcomes": "done" if distilled == "done" else "skipped"}


@pytest.mark.parametrize("stage_file", ["queries.jsonl", "judgments.jsonl"])
def test_resume_after_deleting_the_tail_of_a_stage(tiny_config, tmp_path, stage_file):
    """Truncating a stage file and marking it partial regenerates exactly the missing records."""
    config = tiny_config(domains=["math", "safety"], queries_per_persona=2)
    run = tmp_path / "run"
    bootstrap(config, run)
    stage = "verify" if stage_file == "judgments.jsonl" else "queries"
    complete = (run / stage_file).read_text().splitlines()
    (run / stage_file).write_text("\n".join(complete[: len(complete) // 2]) + "\n")
    downstream = {"queries": ["answers.jsonl", "judgments.jsonl", "labels.jsonl"], "verify": ["labels.jsonl"]}
    for name in downstream[stage]:
        (run / name).unlink()
    manifest = json.loads((run / "manifest.json").read_text())
    for name in STAGES[STAGES.index(stage):]:
        manifest["stages"][name]["status"] = "pending" if name != stage else "partial"
    (run / "manifest.json").write_text(json.dumps(manifest))
    bootstrap(config, run)
    again = (run / stage_file).read_text().splitlines()
    assert sorted(json.loads(x)["id"] for x in again) == sorted(json.loads(x)["id"] for x in complete)


def test_a_run_killed_midway_and_resumed_writes_the_records_of_an_uninterrupted_run(tiny_config, tmp_path,
                                                                                    monkeypatch):
    """Each record samples from a stream seeded by the run seed and its own id: where the kill fell, and so
    which batches the resumed stage forms, must not change what any record gets."""
    config = tiny_config(domains=["math", "safety"], queries_per_persona=4, batch_size=3, answer_temperature=1.0)
    whole, resumed = whole_and_resumed(config, tmp_path, monkeypatch)
    for name in ("personas", "queries", "answers", "labels"):
        key = "id" if name != "labels" else "query_id"
        assert sorted(resumed.read(name), key=lambda r: r[key]) == sorted(whole.read(name), key=lambda r: r[key])


def test_a_run_moved_midway_with_its_files_resumes_to_the_records_of_an_uninterrupted_one(tiny_config, tmp_path,
                                                                                        monkeypatch):
    """A run's input files count by their content, not their path: moved (with its personas file) to another folder
    before it finished, it resumes, and ends with the records of a run that was never interrupted."""
    import shutil

    personas = tmp_path / "personas.yaml"
    personas.write_text("math: You are a mathematician. Answer step by step.\nsafety: You are a safety expert.\n")
    config = tiny_config(domains=[], personas_file=str(personas), queries_per_persona=3)
    bootstrap(config, tmp_path / "whole")
    append = RunDir.append

    def stop_at_the_answers(self, name, records):
        if name == "answers":
            raise KeyboardInterrupt
        append(self, name, records)

    monkeypatch.setattr(RunDir, "append", stop_at_the_answers)
    with pytest.raises(KeyboardInterrupt):
        bootstrap(config, tmp_path / "first" / "run")
    monkeypatch.setattr(RunDir, "append", append)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(str(tmp_path / "first" / "run"), moved / "run")
    shutil.move(str(personas), moved / "personas.yaml")
    bootstrap(tiny_config(domains=[], personas_file=str(moved / "personas.yaml"), queries_per_persona=3), moved / "run")
    whole, resumed = RunDir(tmp_path / "whole"), RunDir(moved / "run")
    for name in ("personas", "queries", "answers", "labels"):
        key = "id" if name != "labels" else "query_id"
        assert sorted(resumed.read(name), key=lambda r: r[key]) == sorted(whole.read(name), key=lambda r: r[key])
    (moved / "personas.yaml").write_text("math: You are a poet.\nsafety: You are a safety expert.\n")
    with pytest.raises(PrismError, match="personas_file: 'sha256:"):
        bootstrap(tiny_config(domains=[], personas_file=str(moved / "personas.yaml"), queries_per_persona=3),
                  moved / "run")
