"""Route decisions: the gate on the base model's blocks up to its layer, for a batch of conversations. `Router` is
the gate alone (tokenizer, embeddings and blocks 0..gate layer loaded, nothing else), for the sidecar and the
llama.cpp backend."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from prism.config import with_options
from prism.inference.artifacts import FinishedRun
from prism.inference.base import Gates, ReloadResult, RouteDecision, gate_decisions_on, gate_prompt
from prism.inference.config import LoadConfig
from prism.lm.batching import gate_features
from prism.lm.gate import Gate
from prism.lm.models import LoadedModel, load_first_blocks


def gate_decisions(lm: LoadedModel, gate: Gate, conversations: Sequence[list[dict[str, str]]]) -> list[RouteDecision]:
    """The gate's route for each conversation: embeddings and blocks 0..gate layer of `lm`, then the gate."""
    if gate.config.constant_route is not None:  # no features needed
        return gate_decisions_on(gate, torch.zeros(len(conversations), gate.config.input_dim))
    return prompt_decisions(lm, gate, [gate_prompt(lm.tokenizer, m) for m in conversations])


def prompt_decisions(lm: LoadedModel, gate: Gate, gate_prompts: list[str]) -> list[RouteDecision]:
    """The gate's route for each already-rendered gate prompt."""
    return gate_decisions_on(gate, gate_features(lm, gate_prompts, gate.config.layer, gate.config.pool))


class Router(Gates):
    """The gate alone, in front of another server or of llama.cpp: the tokenizer, the embeddings and decoder
    blocks 0..gate layer of the base model (the rest is never loaded) and the run's gates. Decides exactly as
    PrismModel does."""

    def __init__(self, lm: LoadedModel, run: FinishedRun):
        self.lm, self.run = lm, run
        self._use_gates(run.gates, run.routing)
        self._lock = threading.Lock()

    @classmethod
    def from_run(cls, run: str | Path | FinishedRun, config: LoadConfig | None = None, **options: object) -> Router:
        """A finished run's router; `config` (or its fields as keywords: device, threshold, routing, ...) says how
        to load it."""
        config = with_options(LoadConfig, config, **options)
        run = run if isinstance(run, FinishedRun) else FinishedRun.open(run, config)
        return cls(load_first_blocks(run.model, device=config.device, trust_remote_code=config.trust_remote_code,
                                     layer=run.gate.config.layer), run)

    @property
    def has_adapter(self) -> bool:
        return self.run.has_adapter

    def reload(self) -> ReloadResult:
        """Read the run's gates and thresholds again; a reload that fails leaves the old gates deciding."""
        return self.use_run(self._reopen())

    def use_run(self, run: FinishedRun, **extra: object) -> ReloadResult:
        """Decide with `run`'s gates from now on (a reload's), never while a decision is being computed."""
        with self._lock:
            return self._reloaded(run, **extra)

    @property
    def loaded_share(self) -> float | None:
        """Share of the model's parameters this router holds in memory."""
        total = self.lm.identity.get("checkpoint_parameters")
        return self.lm.identity["loaded_parameters"] / total if total else None

    def decide(self, conversations: Sequence[list[dict[str, str]]], routing: str | None = None
               ) -> list[RouteDecision]:
        with self._lock:  # one forward at a time: torch's CPU threads are shared anyway
            return gate_decisions(self.lm, self.gate_for(routing), conversations)

    def decide_each(self, conversations: Sequence[list[dict[str, str]]], routings: Sequence[str | None]
                    ) -> list[RouteDecision]:
        """Each conversation's route by the gate its own routing names (None: this router's)."""
        decided: dict[int, RouteDecision] = {}
        for routing in dict.fromkeys(routings):
            members = [i for i, r in enumerate(routings) if r == routing]
            decided.update(zip(members, self.decide([conversations[i] for i in members], routing)))
        return [decided[i] for i in range(len(conversations))]
