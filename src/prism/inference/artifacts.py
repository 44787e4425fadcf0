"""Gated inference: the base model, the run's LoRA adapter and its gate behind one generate call.

Routing costs one small MLP per request. Block 0 carries no LoRA, so its output is the same on both
routes: the prefill runs the embeddings and block 0 once, a hook on block 0 evaluates the gate on that
hidden state, and blocks 1..N-1 then run each row with or without the adapter. Rows of both routes
share one batch through PEFT's mixed-batch LoRA forward (per-row adapter names, `__base__` = none);
a batch of one route takes PEFT's plain path instead. The adapter weights never move.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prism.errors import PrismError
from prism.inference.base import check_threshold
from prism.lm.gate import Gate
from prism.runs import RunDir


def open_finished_run(run_dir: str | Path, trust_remote_code: bool) -> tuple[RunDir, dict[str, Any], dict[str, Any]]:
    """(run, manifest, bootstrap config) of a run whose gate and distill stages are finished."""
    run = RunDir(run_dir)
    if not run.exists():
        raise PrismError(f"{run.path} is not a PRISM run directory (no manifest.json): "
                         f"run `prism bootstrap --out {run.path}` first")
    manifest = run.manifest()
    stages = manifest.get("stages", {})
    for stage in ("gate", "distill"):
        if stages.get(stage, {}).get("status") not in ("done", "skipped"):
            raise PrismError(f"{run.path}: the {stage} stage has not finished; run `prism bootstrap --out "
                             f"{run.path}` with the run's settings to complete it")
    config = manifest["config"]
    if config.get("trust_remote_code") and not trust_remote_code:
        raise PrismError(f"{run.path} was made with trust_remote_code: pass --trust-remote-code to load "
                         "its model code (only if you trust it)")
    return run, manifest, config



def load_gate(run: RunDir, threshold: float | None) -> Gate:
    gate = Gate.load(run.path / "gate")
    if threshold is not None:
        gate.config.threshold = check_threshold(threshold)
    return gate



def check_adapter_for_gate(gate: Gate, has_adapter: bool) -> None:
    if not has_adapter and gate.config.constant_route != 0:
        raise PrismError("the gate can route to the adapter but the run has no adapter: re-run the distill stage")

