"""A finished run, opened once for inference (`FinishedRun`): its manifest and config checked, the routing
resolved, its gates loaded with the threshold in force, and the PEFT directory of each adapter its gates route
to found and checked. PrismModel, LlamaCppModel and the Router are made from one, and a reload opens it again."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prism.config import ROUTINGS, with_new_defaults
from prism.errors import PrismError
from prism.inference.config import LoadConfig
from prism.lm.gate import GATE_CONFIG, Gate
from prism.lm.models import LoadedModel
from prism.routes import adapter_key
from prism.runs import ADAPTER_CONFIG, FINISHED, KWAY_GATE, RunDir, adapter_dir, gate_dir, has_adapter_weights


@dataclass
class FinishedRun:
    path: Path
    manifest: dict[str, Any]
    config: dict[str, Any]  # the bootstrap config the run recorded, with the defaults of fields added since
    routing: str  # "binary" or "kway": the gate `gate` is
    gates: dict[str, Gate]  # "binary", and "kway" for a k-way routing (a request may name either)
    adapters: dict[str, Path]  # adapter key (`adapter_key`) -> its PEFT directory
    trust_remote_code: bool

    @classmethod
    def open(cls, run: str | Path, config: LoadConfig) -> FinishedRun:
        """The run at `run` whose gate and distill stages are finished, as `config` asks to route it (its
        `routing`, its `threshold` over the saved one, its `trust_remote_code`)."""
        directory = RunDir(run)
        if not directory.exists():
            raise PrismError(f"{directory.path} is not a PRISM run directory (no manifest.json): "
                             f"run `prism bootstrap --out {directory.path}` first")
        manifest = directory.manifest()
        stages = manifest.get("stages", {})
        for stage in ("gate", "distill"):
            if stages.get(stage, {}).get("status") not in FINISHED:
                raise PrismError(f"{directory.path}: the {stage} stage has not finished; run `prism bootstrap --out "
                                 f"{directory.path}` with the run's settings to complete it")
        recorded = with_new_defaults(manifest["config"])
        if recorded.get("trust_remote_code") and not config.trust_remote_code:
            raise PrismError(f"{directory.path} was made with trust_remote_code: pass --trust-remote-code to load "
                             "its model code (only if you trust it)")
        routing = resolve_routing(directory.path, config.routing)
        gates = {name: Gate.load(directory.path / gate_dir(name)) for name in dict.fromkeys(("binary", routing))}
        if config.threshold is not None:
            gates[routing].config.threshold = config.threshold
        return cls(directory.path, manifest, recorded, routing, gates, run_adapter_dirs(directory.path, gates),
                   config.trust_remote_code)

    def reopen(self) -> FinishedRun:
        """The run as its directory holds it now (gates with their saved thresholds), routed as before, for a
        reload: it must route to the same adapters (a reload swaps an adapter, it does not add or remove one)."""
        fresh = FinishedRun.open(self.path, LoadConfig(routing=self.routing, trust_remote_code=self.trust_remote_code))
        if fresh.has_adapter != self.has_adapter:
            raise PrismError(f"{self.path} {'now has' if fresh.has_adapter else 'no longer has'} an adapter: restart "
                             "the server to serve it (a reload swaps an adapter, it does not add or remove one)")
        if fresh.personas != self.personas:
            raise PrismError(f"{self.path}'s k-way personas are now {', '.join(fresh.personas) or 'none'}, not "
                             f"{', '.join(self.personas) or 'none'}: restart the server to serve them (a reload swaps "
                             "adapters, it does not add or remove one)")
        return fresh

    @property
    def gate(self) -> Gate:
        """The gate this run routes with (the k-way one for a k-way routing)."""
        return self.gates[self.routing]

    @property
    def model(self) -> str:
        """The base model's name as the run's config gives it (a Hub id, a path, or 'embedded')."""
        return self.config["model"]

    @property
    def has_adapter(self) -> bool:
        return adapter_key(None) in self.adapters

    @property
    def personas(self) -> list[str]:
        """The k-way personas the run routes to (none for a binary routing)."""
        return gate_personas(self.gates["kway"]) if "kway" in self.gates else []

    def check_model(self, lm: LoadedModel) -> None:
        """The loaded base model must be the one the run was trained on."""
        recorded = self.manifest.get("model") or {}
        for key in ("num_layers", "hidden_size", "parameters"):
            if recorded.get(key) is not None and recorded[key] != lm.identity.get(key):
                raise PrismError(f"the model {self.model!r} now has {key}={lm.identity.get(key)} but the run was "
                                 f"trained on {key}={recorded[key]}: the adapter and gate do not fit it")


def resolve_routing(run_path: Path, routing: str) -> str:
    """'binary' or 'kway' as asked; 'auto': k-way when the run has a k-way gate (bootstrapped with
    --routing kway), else binary."""
    has_kway = (run_path / KWAY_GATE / GATE_CONFIG).is_file()
    if routing == "auto":
        return "kway" if has_kway else "binary"
    if routing == "kway" and not has_kway:
        raise PrismError(f"{run_path} has no k-way gate ({KWAY_GATE}/): it was bootstrapped with --routing binary; "
                         "serve it with --routing binary, or bootstrap a run with --routing kway")
    if routing not in ROUTINGS:
        raise PrismError(f"--routing must be auto, binary or kway, got {routing!r}")
    return routing


def gate_personas(gate: Gate) -> list[str]:
    """The k-way personas a gate routes to (none for a binary gate)."""
    return list(gate.config.classes[1:]) if gate.config.classes else []


def checked_adapter_dir(run_path: Path, persona: str | None = None) -> Path:
    """The PEFT directory of the binary adapter (or a k-way persona's), checked to hold safetensors weights."""
    directory = adapter_dir(run_path, persona)
    if not (directory / ADAPTER_CONFIG).is_file():
        raise PrismError(f"the k-way gate routes to {persona!r} but {directory} holds no adapter: re-run "
                         f"`prism bootstrap --out {run_path}` to finish the distill stage")
    if not has_adapter_weights(directory):
        raise PrismError(f"{directory} holds no adapter_model.safetensors; PRISM loads no pickled weights")
    return directory


def run_adapter_dirs(run_path: Path, gates: dict[str, Gate]) -> dict[str, Path]:
    """The adapters the gates route to, by adapter key: `persona` (the binary adapter, when distill trained
    one) and, with a k-way gate, `persona-<persona>` for each of its personas; checked against the gates."""
    dirs = {}
    if (adapter_dir(run_path) / ADAPTER_CONFIG).is_file():  # no config: distill trained no adapter
        dirs[adapter_key(None)] = checked_adapter_dir(run_path)
    check_adapter_for_gate(gates["binary"], bool(dirs))
    if "kway" in gates:
        dirs.update({adapter_key(p): checked_adapter_dir(run_path, p) for p in gate_personas(gates["kway"])})
    check_adapters_above_gate(gates, dirs)
    return dirs


def check_adapters_above_gate(gates: dict[str, Gate], adapters: dict[str, Path]) -> None:
    """Every adapter leaves the blocks up to the gate's layer alone: the gate decides on their output during the
    shared prefill, before any adapter runs."""
    layer = next(iter(gates.values())).config.layer
    for directory in adapters.values():
        try:
            layers = json.loads((directory / ADAPTER_CONFIG).read_text()).get("layers_to_transform")
        except (OSError, ValueError) as exc:
            raise PrismError(f"cannot read the adapter config in {directory}: {exc}") from None
        if layers is None or min([layers] if isinstance(layers, int) else layers) <= layer:
            raise PrismError(f"the adapter in {directory} changes decoder blocks at or below the gate's layer {layer} "
                             f"(layers_to_transform: {layers}): the gate reads those blocks' output before any adapter "
                             "runs, so it needs LoRA above them only; re-run the distill stage with this gate layer")


def check_adapter_for_gate(gate: Gate, has_adapter: bool) -> None:
    if gate.config.classes is None and not has_adapter and gate.config.constant_route != 0:
        raise PrismError("the gate can route to the adapter but the run has no adapter: re-run the distill stage")
