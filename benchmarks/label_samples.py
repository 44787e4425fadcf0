"""What K answer pairs per query cost (`--label-samples`): the same bootstrap at K = 1 and K = 4, one after the
other in one run, per-stage wall time, on the embedded model. The answers and verify stages do K times the work.

    .venv/bin/python benchmarks/label_samples.py [--preset tiny] [--domains writing,safety,math] [--out DIR]
        [--samples 1,4] [--json FILE] [--model embedded]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from prism import bootstrap, resolve_config
from prism.library_warnings import silence_library_warnings
from prism.runs import STAGES, RunDir


def measure(model: str, preset: str, domains: list[str], samples: int, out: Path, seed: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    config = resolve_config(model=model, preset=preset, domains=domains, label_samples=samples, seed=seed,
                            device="cpu")
    started = time.perf_counter()
    summary = bootstrap(config, out)
    seconds = time.perf_counter() - started
    stages = RunDir(out).manifest()["stages"]
    return {"preset": preset, "label_samples": samples, "seconds": round(seconds, 1),
            "stages": {s: stages[s].get("seconds") for s in STAGES}, "queries": summary["counts"]["queries"],
            "distill": summary["counts"]["distill"], "reliability": (summary.get("labels") or {}).get("reliability")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--domains", default="writing,safety,math")
    parser.add_argument("--samples", default="1,4", help="the K values, measured one after the other")
    parser.add_argument("--out", default="runs/bench-label-samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--json", help="also write the figures as JSON to this file")
    args = parser.parse_args()
    silence_library_warnings()
    logging.basicConfig(level=logging.WARNING, format="prism: %(message)s")
    rows = [measure(args.model, args.preset, args.domains.split(","), int(k), Path(args.out) / f"k{k}", args.seed)
            for k in args.samples.split(",")]
    for row in rows:
        stages = ", ".join(f"{s} {v:.0f} s" for s, v in row["stages"].items() if v is not None)
        print(f"{row['preset']} K={row['label_samples']}: {row['seconds']:.0f} s ({stages}); {row['queries']} queries, "
              f"{row['distill']} distilled; reliability {row['reliability']}")
    first = rows[0]
    for row in rows[1:]:
        work = sum((row["stages"][s] or 0) for s in ("answers", "verify"))
        base = sum((first["stages"][s] or 0) for s in ("answers", "verify"))
        print(f"K={row['label_samples']} over K={first['label_samples']}: whole bootstrap "
              f"{row['seconds'] / first['seconds']:.2f}x, answers + verify {work / base:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
