"""`prism eval`: the systems of `config.SYSTEMS` on one base model, scored on knowledge (MMLU, ARC), generative
quality (MT-Bench), safety (JailbreakBench, HarmBench, PKU-SafeRLHF) and the run's own verifiers on held-out
queries (verified), with every generation and score cached in `run/eval/`.

Each benchmark is a module with one `run(ev, bench)` over the shared `Evaluation`; a new benchmark is a new
module, a name in `config.BENCHES` and a line in `BENCHMARKS`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prism.config import with_options
from prism.evaluation import knowledge, mtbench, refusal, verified
from prism.evaluation.config import KWAY_SYSTEMS, EvalConfig
from prism.evaluation.context import Evaluation
from prism.evaluation.metrics import summarize
from prism.evaluation.routing_comparison import COMPARISON_FILE, compare_routings
from prism.inference.config import LoadConfig
from prism.inference.transformers import PrismModel
from prism.runs import write_json_atomic

log = logging.getLogger("prism")
BENCHMARKS: dict[str, Callable[[Evaluation, str], None]] = {
    "mmlu": knowledge.run, "arc": knowledge.run, "mtbench": mtbench.run,
    "jbb": refusal.run, "harmbench": refusal.run, "pku": refusal.run, "verified": verified.run}


def run_benchmarks(ev: Evaluation) -> dict[str, Any]:
    """Every benchmark the config names, then results.json and eval_config.json."""
    for bench in ev.config.benches:
        log.info("eval %s: systems %s", bench, ", ".join(ev.config.systems))
        BENCHMARKS[bench](ev, bench)
    results = summarize(ev.store, ev.config, ev.items, thresholds=ev.thresholds())
    write_json_atomic(ev.store.path / "results.json", results)
    comparison = compare_routings(ev.store, results, ev.items, ev.thresholds(), ev.config.scoring)
    if comparison is not None:
        write_json_atomic(ev.store.path / COMPARISON_FILE, comparison)
    # the items this --limit covers: calibrate and report read the same ones, not the whole cache
    covered = {bench: sorted(ids, key=str) for bench, ids in ev.items.items()}
    write_json_atomic(ev.store.path / "eval_config.json",
                      asdict(ev.config) | {"judge": ev.judge.name, "items": covered})
    return results


def evaluate(run: str | Path, config: EvalConfig, load: LoadConfig | None = None, **options: Any) -> dict[str, Any]:
    """Run (or resume) the evaluation of a bootstrapped run, loaded as `load` (or its fields as keywords: device,
    trust_remote_code) says; writes run/eval/results.json."""
    model = PrismModel.from_run(run, with_options(LoadConfig, load, **options))
    if "kway" not in model.gates and set(KWAY_SYSTEMS) & set(config.systems):
        log.info("%s was bootstrapped with --routing binary: no kway systems to evaluate", run)
        config.systems = [s for s in config.systems if s not in KWAY_SYSTEMS]
    if model.adapter is None and {"lora", "prism"} & set(config.systems):
        log.warning("this run has no adapter: lora and prism are the base model")
        config.systems = [s for s in config.systems if s not in ("lora", "kway-lora")]
    return run_benchmarks(Evaluation(model, run, config))
