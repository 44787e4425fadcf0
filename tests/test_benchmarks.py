"""The benchmark scripts run end to end on the tiny model (their figures are for the embedded model or a GPU)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def test_the_gpu_benchmark_runs_at_the_tiny_shape_on_the_cpu(tiny_model_dir):
    done = subprocess.run([sys.executable, str(SCRIPT), "--shapes", "tiny", "--device", "cpu", "--tokens", "3",
                           "--length", "48", "--micro-batch", "2", "--rounds", "1", "--tokenizer", str(tiny_model_dir)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("device CPU") and lines[1].startswith("tiny: ")
    assert "batch 1" in lines[2] and "batch 32" in lines[2] and "tok/s" in lines[2]
    assert "teacher top-64" in lines[3] and "with gradient checkpointing" in lines[3]
    assert "auto / same route" in lines[4] and "persona-only / base-only" in lines[4]


def test_the_kway_part_of_the_serving_benchmark_runs_on_a_kway_run(tiny_kway_run, capsys):
    import importlib.util

    from helpers import BASE_QUERIES
    from prism.inference.transformers import PrismModel

    spec = importlib.util.spec_from_file_location("serving_benchmark", SCRIPT.parent / "serving.py")
    serving = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serving)
    serving.kway_batch(PrismModel.from_run(tiny_kway_run, device="cpu"), BASE_QUERIES * 3, tokens=2, repeats=1)
    out = capsys.readouterr().out
    assert "5. k-way batches: 6 requests" in out and "(2 persona adapters)" in out
    for name in ("base-only", "one adapter", "base + binary adapter", "base + 2 adapters"):
        assert f"   {name} " in out


def test_the_known_answer_experiment_runs_end_to_end_at_the_tiny_model(tiny_model_dir, tmp_path):
    report_file = tmp_path / "known.json"
    done = subprocess.run([sys.executable, str(SCRIPT.parent / "known_answer.py"), "--model", str(tiny_model_dir),
                           "--out", str(tmp_path / "ka"), "--json", str(report_file), "--queries", "3",
                           "--heldout", "2", "--answer-tokens", "8", "--epochs", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(report_file.read_text())
    assert [d["name"] for d in report["domains"]] == ["quick one-line facts", "short definitions of words",
                                                     "in-depth explanations"]
    assert [d["helped"] for d in report["domains"]] == [True, True, False]
    for row in report["domains"]:
        assert set(row["pass_rate"]) == {"base", "persona", "lora", "prism", "oracle"} and row["n"] == 2
        assert all(value is None or 0 <= value <= 1 for value in row["pass_rate"].values())
        rates = row["pass_rate"]
        assert rates["oracle"] == max(v for v in (rates["base"], rates["lora"]) if v is not None)
    assert {"heldout_accuracy", "balanced_accuracy", "majority_baseline", "auroc"} <= set(report["gate"])
    assert set(report["routed_shares"]) == {"mmlu", "arc", "jbb harmful"}
    assert report["distill_examples"] == sum(
        r["label"] for r in map(json.loads, (tmp_path / "ka" / "run" / "labels.jsonl").read_text().splitlines()))
    assert "headline: lora vs base on the helped domains" in done.stdout


def test_the_known_answer_experiment_on_real_prompts_keeps_bootstrap_and_heldout_apart(tiny_model_dir, tmp_path):
    out = tmp_path / "ka"
    done = subprocess.run([sys.executable, str(SCRIPT.parent / "known_answer.py"), "--real", "--model",
                           str(tiny_model_dir), "--out", str(out), "--queries", "3", "--heldout", "2",
                           "--answer-tokens", "8", "--epochs", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    prompts = {name: [json.loads(line) for line in (out / f"{name}_prompts.jsonl").read_text().splitlines()]
               for name in ("bootstrap", "heldout")}
    for rows in prompts.values():
        assert {r["domain"] for r in rows} == {"science questions", "writing, roleplay and humanities"}
    assert not {r["query"] for r in prompts["bootstrap"]} & {r["query"] for r in prompts["heldout"]}
    queries = [json.loads(line)["query"] for line in (out / "run" / "queries.jsonl").read_text().splitlines()]
    assert sorted(queries) == sorted(r["query"] for r in prompts["bootstrap"])
    assert "oracle" in done.stdout and "of the oracle's" in done.stdout


def test_the_label_samples_benchmark_measures_each_k_on_the_tiny_model(tiny_model_dir, tmp_path):
    report = tmp_path / "k.json"
    done = subprocess.run([sys.executable, str(SCRIPT.parent / "label_samples.py"), "--model", str(tiny_model_dir),
                           "--domains", "math,safety", "--samples", "1,2", "--out", str(tmp_path / "runs"),
                           "--json", str(report)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(report.read_text())
    assert [r["label_samples"] for r in rows] == [1, 2] and "K=2 over K=1" in done.stdout
    assert rows[1]["reliability"] is not None and rows[0]["reliability"] is None


def test_the_shared_prompts_benchmark_compares_both_paths_on_the_tiny_model(tiny_model_dir, tmp_path):
    report = tmp_path / "shared.json"
    done = subprocess.run([sys.executable, str(SCRIPT.parent / "shared_prompts.py"), "--model", str(tiny_model_dir),
                           "--prompts", "4", "--samples", "2", "--tokens", "3", "--rounds", "1", "--json",
                           str(report)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(report.read_text())
    for part in ("answers", "judge"):
        assert len(figures[part]["alone_s"]) == len(figures[part]["shared_s"]) == 1
    assert figures["judge"]["identical"] == 1.0 and figures["judge"]["shared_prefix_tokens"] > 0
    assert "answers:" in done.stdout and "judge:" in done.stdout
