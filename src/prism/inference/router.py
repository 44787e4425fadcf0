"""Route decisions: the gate on block 0 of the base model, for a batch of conversations. `Router` is the
gate alone (tokenizer, embeddings and block 0 loaded, nothing else), for the sidecar."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from prism.inference.artifacts import (
    adapter_file,
    check_adapter_for_gate,
    check_adapter_unchanged,
    gate_personas,
    kway_adapter_dirs,
    load_gate,
    open_finished_run,
    resolve_routing,
)
from prism.inference.base import RouteDecision, gate_decisions_on, gate_prompt
from prism.lm.batching import block0_features
from prism.lm.gate import Gate
from prism.lm.models import LoadedModel, load_block0


def gate_decisions(lm: LoadedModel, gate: Gate, conversations: Sequence[list[dict[str, str]]]) -> list[RouteDecision]:
    """The gate's route for each conversation: embeddings and block 0 of `lm`, then the gate."""
    if gate.config.constant_route is not None:  # no features needed
        return gate_decisions_on(gate, torch.zeros(len(conversations), gate.config.input_dim))
    return prompt_decisions(lm, gate, [gate_prompt(lm.tokenizer, m) for m in conversations])


def prompt_decisions(lm: LoadedModel, gate: Gate, gate_prompts: list[str]) -> list[RouteDecision]:
    """The gate's route for each already-rendered gate prompt."""
    return gate_decisions_on(gate, block0_features(lm, gate_prompts))


class Router:
    """The gate alone, for a sidecar in front of another server: the tokenizer, the embeddings and decoder
    block 0 of the base model (the rest is never loaded) and the gate. Decides exactly as PrismModel does."""

    def __init__(self, lm: LoadedModel, gate: Gate, *, run_path: Path, has_adapter: bool, routing: str = "binary"):
        self.lm, self.gate, self.run_path, self.has_adapter = lm, gate, run_path, has_adapter
        self.routing = routing
        self.personas = gate_personas(gate)  # k-way: the adapters it routes to, besides the binary one
        self.trust_remote_code = False
        self._lock = threading.Lock()

    @classmethod
    def from_run(cls, run_dir: str | Path, *, device: str = "auto", threshold: float | None = None,
                 trust_remote_code: bool = False, routing: str = "auto") -> Router:
        """`routing`: 'binary', 'kway' (a run bootstrapped with --routing kway) or 'auto' (k-way when the run
        has it)."""
        run, _manifest, config = open_finished_run(run_dir, trust_remote_code)
        routing = resolve_routing(run.path, routing)
        lm = load_block0(config["model"], device=device, trust_remote_code=trust_remote_code)
        has_adapter = adapter_file(run.path) is not None
        gate = load_gate(run, threshold, routing)
        check_adapter_for_gate(gate, has_adapter)
        kway_adapter_dirs(run.path, gate)
        router = cls(lm, gate, run_path=run.path, has_adapter=has_adapter, routing=routing)
        router.trust_remote_code = trust_remote_code
        return router

    def read_run(self) -> Gate:
        """The run's gate (with its saved threshold) as the run directory holds it now, checked against the
        adapters this router routes to."""
        run, _manifest, _config = open_finished_run(self.run_path, self.trust_remote_code)
        gate = load_gate(run, None, self.routing)
        has_adapter = adapter_file(run.path) is not None
        check_adapter_for_gate(gate, has_adapter)
        kway_adapter_dirs(run.path, gate)
        check_adapter_unchanged(run.path, self.has_adapter, has_adapter, self.personas, gate_personas(gate))
        return gate

    def use_gate(self, gate: Gate) -> None:
        with self._lock:  # never while a decision is being computed
            self.gate = gate

    def reload(self) -> dict[str, Any]:
        """Read the run's gate and threshold again; a reload that fails leaves the old gate deciding."""
        self.use_gate(self.read_run())
        return {"threshold": self.threshold, "adapter": self.has_adapter}

    @property
    def threshold(self) -> float:
        return self.gate.config.threshold

    @property
    def loaded_share(self) -> float | None:
        """Share of the model's parameters this router holds in memory."""
        total = self.lm.identity.get("checkpoint_parameters")
        return self.lm.identity["loaded_parameters"] / total if total else None

    def decide(self, conversations: Sequence[list[dict[str, str]]]) -> list[RouteDecision]:
        with self._lock:  # one forward at a time: torch's CPU threads are shared anyway
            return gate_decisions(self.lm, self.gate, conversations)

