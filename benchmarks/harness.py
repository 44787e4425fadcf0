"""`prism lm-eval` (the harness's prism_mmlu and prism_arc tasks) beside `prism eval` on the same items, on the
transformers backend, one after the other in this run: each system's accuracy by both, and the wall time of
the harness path over prism eval's.

prism eval scores MMLU and ARC by the answer letter after a prompt of its own (one forward pass per item),
the harness by each choice as a continuation (the letter for MMLU, the choice's own text for ARC: one pass
per choice), so the numbers differ by design; the items are the same: both read one data directory written
here, the first --mmlu-per-subject items of each MMLU subject and the first --arc-limit of each ARC split.

    .venv/bin/python benchmarks/harness.py --run runs/demo [--mmlu-per-subject 5] [--arc-limit 100] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from prism.evaluation.config import EvalConfig
from prism.evaluation.data import default_data_dir
from prism.evaluation.harness import lm_eval
from prism.evaluation.runner import evaluate
from prism.library_warnings import silence_library_warnings


def write_items(data: Path, per_subject: int, arc_limit: int) -> dict[str, int]:
    """The first items of the benchmark data directory, in its layout, for both paths to read."""
    source = default_data_dir()
    (data / "mmlu").mkdir(parents=True)
    (data / "arc").mkdir()
    taken: dict[str, int] = {}
    kept = []
    for line in (source / "mmlu" / "test_subset.jsonl").read_text().splitlines():
        subject = json.loads(line)["subject"]
        if taken.get(subject, 0) < per_subject:
            taken[subject] = taken.get(subject, 0) + 1
            kept.append(line)
    (data / "mmlu" / "test_subset.jsonl").write_text("\n".join(kept) + "\n")
    shutil.copy(source / "mmlu" / "dev.jsonl", data / "mmlu" / "dev.jsonl")
    arc = 0
    for split in ("easy", "challenge"):
        lines = (source / "arc" / f"{split}_test.jsonl").read_text().splitlines()[:arc_limit]
        (data / "arc" / f"{split}_test.jsonl").write_text("\n".join(lines) + "\n")
        arc += len(lines)
    return {"mmlu": len(kept), "arc": arc}


def main() -> None:
    silence_library_warnings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a finished run (its eval/ is not touched: a copy is scored)")
    parser.add_argument("--mmlu-per-subject", type=int, default=5, help="items of each MMLU subject")
    parser.add_argument("--arc-limit", type=int, default=100, help="items of each ARC split")
    parser.add_argument("--systems", default="base,prism")
    parser.add_argument("--json", help="write the accuracies and times here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    systems = args.systems.split(",")
    with tempfile.TemporaryDirectory(prefix="prism-harness-bench-") as scratch:
        run, data = Path(scratch) / "run", Path(scratch) / "data"
        shutil.copytree(args.run, run, ignore=shutil.ignore_patterns("eval", "gguf", "replaced-*"))
        items = write_items(data, args.mmlu_per_subject, args.arc_limit)
        started = time.perf_counter()
        results = evaluate(run, EvalConfig(benches=["mmlu", "arc"], systems=list(systems), data_dir=str(data)),
                           device="cpu")
        prism_eval_s = time.perf_counter() - started
        started = time.perf_counter()
        table = lm_eval(run, tasks=["prism_mmlu", "prism_arc"], systems=systems, data_dir=str(data),
                        out=str(Path(scratch) / "harness"))
        harness_s = time.perf_counter() - started
    print(f"items: MMLU {items['mmlu']} ({args.mmlu_per_subject} per subject), ARC {items['arc']} "
          f"({args.arc_limit} per split, Easy and Challenge), the same files for both")
    print("| system | MMLU prism eval (letter) | MMLU harness acc | ARC prism eval (letter) | ARC harness acc | "
          "ARC harness acc_norm |")
    print("|---|---|---|---|---|---|")
    accuracy = {}
    for system in systems:
        row = {"mmlu_prism_eval": results[system]["mmlu"]["accuracy"],
               "mmlu_harness": table["systems"][system]["prism_mmlu"]["acc,none"],
               "arc_prism_eval": results[system]["arc"]["accuracy"],
               "arc_harness": table["systems"][system]["prism_arc"]["acc,none"],
               "arc_harness_norm": table["systems"][system]["prism_arc"]["acc_norm,none"]}
        accuracy[system] = row
        print(f"| {system} | " + " | ".join(f"{value:.4f}" for value in row.values()) + " |")
    routing = table["routing"]
    if routing:
        print("prism routes to an adapter (harness): " + ", ".join(f"{t} {s:.1%}" for t, s in sorted(routing.items())))
    print(f"time: prism eval {prism_eval_s:.0f} s, harness {harness_s:.0f} s; harness / prism eval "
          f"{harness_s / prism_eval_s:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"accuracy": accuracy, "routing": routing, "prism_eval_s": prism_eval_s,
                                               "harness_s": harness_s}, indent=2) + "\n")


if __name__ == "__main__":
    main()
