"""Data-parallel distillation: the adapter trained by 2 CPU processes (gloo, started by `accelerate launch`)
matches the one trained by 1 process with the same global batch."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from prism.cli import main
from prism.config import resolve_config
from prism.runs import STAGES, RunDir

QUERIES = ["How do I write a poem about the sea?", "Explain recursion in Python.",
           "Compare two answers to the question.", "What is the capital of France?"]


def distill_ready_run(directory, model_dir):
    """A run whose stages before distill are done, with 4 persona wins to distill. Global batch 3 over
    2 processes gives shares of 2 and 1, and then 1 and 0: the last step has a process with no example.
    No LoRA dropout, so the processes' random streams cannot make the runs differ."""
    config = resolve_config(model=str(model_dir), preset="tiny", device="cpu", lora_r=4, lora_alpha=8,
                            lora_dropout=0.0, distill_epochs=2, distill_batch_size=3, distill_micro_batch_size=1,
                            seed=3)
    run = RunDir(directory)
    run.save_manifest({"config": config.to_dict(), "model": None,
                       "stages": {s: {"status": "done" if s != "distill" else "pending"} for s in STAGES}})
    run.append("labels", [{"query_id": f"q{i}", "persona_id": "precision", "domain": "precision", "query": q,
                           "persona": "You are a precise expert.",
                           "persona_answer": f"Answer {i}: be exact, structured and brief.", "plain_answer": "Hm.",
                           "label": 1, "split": "distill"} for i, q in enumerate(QUERIES)])
    return directory


def test_two_processes_train_the_same_adapter_as_one(tiny_model_dir, tmp_path):
    one = distill_ready_run(tmp_path / "one", tiny_model_dir)
    two = shutil.copytree(one, tmp_path / "two")
    assert main(["distill", str(one)]) == 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "prism.cli", "distill", str(two)]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data parallel over 2 processes" in done.stderr

    single, parallel = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (one, two))
    assert single.keys() == parallel.keys() and single
    # Same update up to float summation order (gradients are summed across processes in another order);
    # the LoRA B matrices start at zero, so every difference below comes from training.
    worst = max(float((single[k] - parallel[k]).abs().max()) for k in single)
    assert worst < 1e-4, worst
    moved = max(float(single[k].abs().max()) for k in single if "lora_B" in k)
    assert moved > 100 * worst  # training moved the weights far more than the two runs differ
    logs = [RunDir(p).read("distill_log") for p in (one, two)]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == [1, 2, 3, 4]
    assert [r["loss"] for r in logs[1]] == pytest.approx([r["loss"] for r in logs[0]], rel=1e-4)
    assert {r["processes"] for r in logs[1]} == {2} and {r["processes"] for r in logs[0]} == {1}
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["stages"]["distill"]["status"] == "done"
    assert manifest["stages"]["distill"]["engine"]["processes"] == 2


def test_distill_needs_the_earlier_stages(tiny_model_dir, tmp_path, capsys):
    run = distill_ready_run(tmp_path / "run", tiny_model_dir)
    RunDir(run).update_stage("verify", status="partial")
    assert main(["distill", str(run)]) == 2
    assert "verify are not done yet" in capsys.readouterr().err
