"""`prism lm-eval` (the harness's prism_mmlu and prism_arc tasks) beside `prism eval` on the same items, on the
transformers backend, one after the other in this run: each system's accuracy by both, and the wall time of
the harness path over prism eval's.

prism eval scores MMLU and ARC by the answer letter after a prompt of its own (one forward pass per item),
the harness by each choice as a continuation (the letter for MMLU, the choice's own text for ARC: one pass
per choice), so the numbers differ by design; the items are the same: every MMLU item of the data directory,
and the first --arc-limit of each ARC split.

    .venv/bin/python benchmarks/harness.py --run runs/demo [--arc-limit 100] [--systems base,prism] [--json FILE]
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
from prism.evaluation.harness import lm_eval
from prism.evaluation.runner import evaluate
from prism.library_warnings import silence_library_warnings


def main() -> None:
    silence_library_warnings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a finished run (its eval/ is not touched: a copy is scored)")
    parser.add_argument("--arc-limit", type=int, default=100, help="items of each ARC split")
    parser.add_argument("--systems", default="base,prism")
    parser.add_argument("--json", help="write the accuracies and times here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    systems = args.systems.split(",")
    with tempfile.TemporaryDirectory(prefix="prism-harness-bench-") as scratch:
        run = Path(scratch) / "run"
        shutil.copytree(args.run, run, ignore=shutil.ignore_patterns("eval", "gguf", "replaced-*"))
        started = time.perf_counter()
        results = evaluate(run, EvalConfig(benches=["mmlu", "arc"], systems=list(systems),
                                           limit={"arc": args.arc_limit}), device="cpu")
        prism_eval_s = time.perf_counter() - started
        started = time.perf_counter()
        mmlu = lm_eval(run, tasks=["prism_mmlu"], systems=systems, out=str(Path(scratch) / "mmlu"))
        arc = lm_eval(run, tasks=["prism_arc"], systems=systems, limit=args.arc_limit, out=str(Path(scratch) / "arc"))
        harness_s = time.perf_counter() - started
    print(f"items: MMLU all of the data directory's subset, ARC {args.arc_limit} per split (Easy, Challenge)")
    print("| system | MMLU prism eval (letter) | MMLU harness acc | ARC prism eval (letter) | ARC harness acc | "
          "ARC harness acc_norm |")
    print("|---|---|---|---|---|---|")
    table = {}
    for system in systems:
        row = {"mmlu_prism_eval": results[system]["mmlu"]["accuracy"],
               "mmlu_harness": mmlu["systems"][system]["prism_mmlu"]["acc,none"],
               "arc_prism_eval": results[system]["arc"]["accuracy"],
               "arc_harness": arc["systems"][system]["prism_arc"]["acc,none"],
               "arc_harness_norm": arc["systems"][system]["prism_arc"]["acc_norm,none"]}
        table[system] = row
        print(f"| {system} | " + " | ".join(f"{value:.4f}" for value in row.values()) + " |")
    routing = {**mmlu["routing"], **arc["routing"]}
    if routing:
        print("prism routes to an adapter (harness): " + ", ".join(f"{t} {s:.1%}" for t, s in sorted(routing.items())))
    print(f"time: prism eval {prism_eval_s:.0f} s, harness {harness_s:.0f} s; harness / prism eval "
          f"{harness_s / prism_eval_s:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"accuracy": table, "routing": routing, "prism_eval_s": prism_eval_s,
                                               "harness_s": harness_s}, indent=2) + "\n")


if __name__ == "__main__":
    main()
