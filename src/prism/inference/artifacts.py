"""Reading a finished run for inference: its manifest and config, checked, and its gate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prism.errors import PrismError
from prism.lm.gate import Gate, check_threshold
from prism.lm.models import LoadedModel
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


def adapter_file(run_path: Path) -> Path | None:
    """The run's adapter weights, or None when the distill stage trained none."""
    adapter_dir = run_path / "adapter"
    if not (adapter_dir / "adapter_config.json").is_file():
        return None
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise PrismError(f"{adapter_dir} holds no adapter_model.safetensors; PRISM loads no pickled weights")
    return weights


def check_model_identity(manifest: dict[str, Any], config: dict[str, Any], lm: LoadedModel) -> None:
    """The loaded base model must be the one the run was trained on."""
    recorded = manifest.get("model") or {}
    for key in ("num_layers", "hidden_size", "parameters"):
        if recorded.get(key) is not None and recorded[key] != lm.identity.get(key):
            raise PrismError(f"the model {config['model']!r} now has {key}={lm.identity.get(key)} but the run "
                             f"was trained on {key}={recorded[key]}: the adapter and gate do not fit it")


def check_adapter_unchanged(run_path: Path, had_adapter: bool, has_adapter: bool) -> None:
    if has_adapter != had_adapter:
        raise PrismError(f"{run_path} {'now has' if has_adapter else 'no longer has'} an adapter: restart the "
                         "server to serve it (a reload swaps an adapter, it does not add or remove one)")
