"""Route decisions: the gate on block 0 of the base model, for a batch of conversations. `Router` is the
gate alone (tokenizer, embeddings and block 0 loaded, nothing else), for the sidecar."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prism.inference.artifacts import (
    adapter_file,
    check_adapter_for_gate,
    check_adapter_unchanged,
    load_gate,
    open_finished_run,
)
from prism.inference.base import RouteDecision, decision_at, gate_prompt
from prism.lm.batching import block0_features
from prism.lm.gate import Gate
from prism.lm.models import LoadedModel, load_block0


def gate_decisions(lm: LoadedModel, gate: Gate, conversations: Sequence[list[dict[str, str]]]) -> list[RouteDecision]:
    """The gate's route for each conversation: embeddings and block 0 of `lm`, then the gate."""
    if gate.config.constant_route is not None:
        return [decision_at(float(gate.config.constant_route), gate.config.threshold) for _ in conversations]
    return prompt_decisions(lm, gate, [gate_prompt(lm.tokenizer, m) for m in conversations])


def prompt_decisions(lm: LoadedModel, gate: Gate, gate_prompts: list[str]) -> list[RouteDecision]:
    """The gate's route for each already-rendered gate prompt."""
    features = block0_features(lm, gate_prompts)
    return [decision_at(p, gate.config.threshold) for p in gate.persona_probability(features).tolist()]


class Router:
    """The gate alone, for a sidecar in front of another server: the tokenizer, the embeddings and decoder
    block 0 of the base model (the rest is never loaded) and the gate. Decides exactly as PrismModel does."""

    def __init__(self, lm: LoadedModel, gate: Gate, *, run_path: Path, has_adapter: bool):
        self.lm, self.gate, self.run_path, self.has_adapter = lm, gate, run_path, has_adapter
        self.trust_remote_code = False
        self._lock = threading.Lock()

    @classmethod
    def from_run(cls, run_dir: str | Path, *, device: str = "auto", threshold: float | None = None,
                 trust_remote_code: bool = False) -> Router:
        run, _manifest, config = open_finished_run(run_dir, trust_remote_code)
        lm = load_block0(config["model"], device=device, trust_remote_code=trust_remote_code)
        has_adapter = (run.path / "adapter" / "adapter_config.json").is_file()
        gate = load_gate(run, threshold)
        check_adapter_for_gate(gate, has_adapter)
        router = cls(lm, gate, run_path=run.path, has_adapter=has_adapter)
        router.trust_remote_code = trust_remote_code
        return router

    def read_run(self) -> Gate:
        """The run's gate (with its saved threshold) as the run directory holds it now, checked against the
        adapter this router routes to."""
        run, _manifest, _config = open_finished_run(self.run_path, self.trust_remote_code)
        gate = load_gate(run, None)
        has_adapter = adapter_file(run.path) is not None
        check_adapter_for_gate(gate, has_adapter)
        check_adapter_unchanged(run.path, self.has_adapter, has_adapter)
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

