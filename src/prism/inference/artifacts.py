"""Reading a finished run for inference: its manifest and config, checked, and its gate."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prism.errors import PrismError
from prism.inference.base import adapter_key
from prism.lm.gate import Gate, check_threshold
from prism.lm.models import LoadedModel
from prism.runs import FINISHED, KWAY_ADAPTERS, KWAY_GATE, RunDir, gate_dir


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


def resolve_routing(run_path: Path, routing: str) -> str:
    """'binary' or 'kway' as asked; 'auto': k-way when the run has a k-way gate (bootstrapped with
    --routing kway), else binary."""
    has_kway = (run_path / KWAY_GATE / "config.json").is_file()
    if routing == "auto":
        return "kway" if has_kway else "binary"
    if routing == "kway" and not has_kway:
        raise PrismError(f"{run_path} has no k-way gate ({KWAY_GATE}/): it was bootstrapped with --routing binary; "
                         "serve it with --routing binary, or bootstrap a run with --routing kway")
    if routing not in ("binary", "kway"):
        raise PrismError(f"--routing must be auto, binary or kway, got {routing!r}")
    return routing


def load_gate(run: RunDir, threshold: float | None, routing: str = "binary") -> Gate:
    gate = Gate.load(run.path / gate_dir(routing))
    if threshold is not None:
        gate.config.threshold = check_threshold(threshold)
    return gate


def gate_personas(gate: Gate) -> list[str]:
    """The k-way personas a gate routes to (none for a binary gate)."""
    return list(gate.config.classes[1:]) if gate.config.classes else []


def kway_adapter_dirs(run_path: Path, gate: Gate) -> dict[str, Path]:
    """Each k-way persona's PEFT adapter directory, checked to hold safetensors weights."""
    dirs = {}
    for persona in gate_personas(gate):
        directory = run_path / KWAY_ADAPTERS / persona
        if not (directory / "adapter_config.json").is_file():
            raise PrismError(f"the k-way gate routes to {persona!r} but {directory} holds no adapter: re-run "
                             f"`prism bootstrap --out {run_path}` to finish the distill stage")
        if not (directory / "adapter_model.safetensors").is_file():
            raise PrismError(f"{directory} holds no adapter_model.safetensors; PRISM loads no pickled weights")
        dirs[persona] = directory
    return dirs


def kway_adapters(run_path: Path) -> dict[str, Path]:
    """A run's k-way persona adapters, as its k-way gate names them (none for a binary run)."""
    if resolve_routing(run_path, "auto") != "kway":
        return {}
    return kway_adapter_dirs(run_path, Gate.load(run_path / KWAY_GATE))


def check_adapter_for_gate(gate: Gate, has_adapter: bool) -> None:
    if gate.config.classes is None and not has_adapter and gate.config.constant_route != 0:
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


def run_adapter_dirs(run_path: Path, gates: dict[str, Gate]) -> dict[str, Path]:
    """The adapters the gates route to, by adapter key: `persona` (the binary adapter, when distill trained
    one) and, with a k-way gate, `persona-<persona>` for each of its personas; checked against the gates."""
    dirs = {adapter_key(None): run_path / "adapter"} if adapter_file(run_path) is not None else {}
    check_adapter_for_gate(gates["binary"], bool(dirs))
    if "kway" in gates:
        dirs.update({adapter_key(p): d for p, d in kway_adapter_dirs(run_path, gates["kway"]).items()})
    return dirs


def check_model_identity(manifest: dict[str, Any], config: dict[str, Any], lm: LoadedModel) -> None:
    """The loaded base model must be the one the run was trained on."""
    recorded = manifest.get("model") or {}
    for key in ("num_layers", "hidden_size", "parameters"):
        if recorded.get(key) is not None and recorded[key] != lm.identity.get(key):
            raise PrismError(f"the model {config['model']!r} now has {key}={lm.identity.get(key)} but the run "
                             f"was trained on {key}={recorded[key]}: the adapter and gate do not fit it")


def check_adapter_unchanged(run_path: Path, had_adapter: bool, has_adapter: bool,
                            had_personas: Sequence[str] = (), has_personas: Sequence[str] = ()) -> None:
    if has_adapter != had_adapter:
        raise PrismError(f"{run_path} {'now has' if has_adapter else 'no longer has'} an adapter: restart the "
                         "server to serve it (a reload swaps an adapter, it does not add or remove one)")
    if list(had_personas) != list(has_personas):
        raise PrismError(f"{run_path}'s k-way personas are now {', '.join(has_personas) or 'none'}, not "
                         f"{', '.join(had_personas) or 'none'}: restart the server to serve them (a reload swaps "
                         "adapters, it does not add or remove one)")
