"""Reading a finished run for inference: its manifest and config, checked, and its gate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prism.errors import PrismError
from prism.lm.gate import Gate, check_threshold
from prism.runs import FINISHED, RunDir


def open_finished_run(run_dir: str | Path, trust_remote_code: bool) -> tuple[RunDir, dict[str, Any], dict[str, Any]]:
    """(run, manifest, bootstrap config) of a run whose gate and distill stages are finished."""
    run = RunDir(run_dir)
    if not run.exists():
        raise PrismError(f"{run.path} is not a PRISM run directory (no manifest.json): "
                         f"run `prism bootstrap --out {run.path}` first")
    manifest = run.manifest()
    stages = manifest.get("stages", {})
    for stage in ("gate", "distill"):
        if stages.get(stage, {}).get("status") not in FINISHED:
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

