"""LlamaCppModel: a run on llama.cpp, generation on GGUF weights, routing still PRISM's.

The gate reads block 0 computed in PyTorch (`Router`: tokenizer, embeddings and block 0 only). The reply
then comes from one of two llama.cpp contexts over the run's GGUF: the base context, or the persona context,
which holds the merged persona GGUF when `prism export gguf --merged` wrote one (no LoRA cost per token),
else the base GGUF with the exported LoRA. Two contexts keep each route's prompt cache warm and never
switch adapters mid-stream; benchmarks/engines.py compares them with switching the adapter per request
on one context. Requests run one at a time: batches of many requests are the transformers backend's job.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prism.errors import PrismError
from prism.inference.artifacts import open_finished_run
from prism.inference.base import GatedModel, GenerationRequest, RouteDecision, StreamEvent, decode_step
from prism.inference.gguf_export import (
    ADAPTER_FILE,
    EXPORT_DIR,
    MERGED_FILE,
    export_gguf,
    export_is_current,
    recorded_base_gguf,
)
from prism.inference.router import Router
from prism.lm.decoding import TextStream
from prism.lm.llama import LlamaContext, base_gguf_for, check_vocabulary, open_llama
from prism.lm.models import encode

log = logging.getLogger("prism")


class LlamaCppModel(GatedModel):
    """A bootstrapped run on llama.cpp: the same `generate`/`stream`/`decide` as PrismModel."""

    engine = "llamacpp"

    def __init__(self, router: Router, base: LlamaContext, persona: LlamaContext | None, *,
                 run_path: Path | None = None, persona_source: str = "none", max_model_len: int | None = None,
                 opener: PersonaOpener | None = None):
        self.router = router
        self.opener = opener  # how the persona context was opened, to open it again on a reload
        self.gate = router.gate
        self.tokenizer = router.lm.tokenizer
        self.run_path = run_path
        self.contexts = {"base": base, "persona": persona}
        self.persona_source = persona_source  # "merged", "lora" or "none"
        self.max_model_len = min(max_model_len or base.n_ctx, base.n_ctx)
        self.eos_ids = base.stop_ids(self.tokenizer)
        self._lock = threading.Lock()

    @classmethod
    def from_run(cls, run_dir: str | Path, *, gguf: str | Path | None = None, threshold: float | None = None,
                 max_model_len: int | None = None, n_threads: int | None = None, persona: str = "auto",
                 trust_remote_code: bool = False) -> LlamaCppModel:
        """Load a finished run on llama.cpp. The adapter is exported to RUN/gguf/adapter.gguf first when that
        file is missing or older than the run's adapter. `persona`: 'auto' (the merged GGUF when exported,
        else the LoRA), 'merged' or 'lora'."""
        if persona not in ("auto", "merged", "lora"):
            raise PrismError(f"persona must be 'auto', 'merged' or 'lora', got {persona!r}")
        run, _manifest, config = open_finished_run(run_dir, trust_remote_code)
        base_path = base_gguf_for(config, gguf or recorded_base_gguf(run.path))
        router = Router.from_run(run.path, device="cpu", threshold=threshold, trust_remote_code=trust_remote_code)
        context_size = max_model_len or getattr(router.lm.model.config, "max_position_embeddings", None) or 4096
        base = LlamaContext(open_llama(base_path, n_ctx=context_size, n_threads=n_threads))
        check_vocabulary(base, router.lm.tokenizer, base_path)
        opener = PersonaOpener(run.path, base_path, persona, context_size, n_threads)
        persona_context, source = opener.open() if router.has_adapter else (None, "none")
        model = cls(router, base, persona_context, run_path=run.path, persona_source=source,
                    max_model_len=max_model_len, opener=opener)
        model.trust_remote_code = trust_remote_code
        return model

    @property
    def has_adapter(self) -> bool:
        return self.contexts["persona"] is not None

    def decide(self, conversations: Sequence[list[dict[str, str]]]) -> list[RouteDecision]:
        return self.router.decide(conversations)

    def reload(self) -> dict[str, Any]:
        """Read the run's gate, threshold and adapter again (re-exporting the adapter when it changed) between
        requests: the one being generated finishes on the old persona context. A failed reload changes nothing."""
        if self.run_path is None or self.opener is None:
            raise PrismError("this model was not loaded from a run directory: there is nothing to reload")
        with self._lock:
            gate = self.router.read_run()
            persona, source = self.opener.open() if self.has_adapter else (None, "none")
            old = self.contexts["persona"]
            self.router.use_gate(gate)
            self.gate = gate
            self.contexts["persona"], self.persona_source = persona, source
            if old is not None:
                old.llm.close()
        return {"threshold": self.threshold, "adapter": self.has_adapter, "persona_model": source}

    def context(self, route: str) -> LlamaContext:
        context = self.contexts[route]
        if context is None:
            self.check_persona_route()
        return context

    def stream(self, requests: Sequence[GenerationRequest]) -> Iterator[StreamEvent]:
        """Each request's route first (all of them), then each request's text and completion in turn."""
        if not requests:
            return
        with self._lock:
            encoded = [encode(self.tokenizer, self.prompt(r.messages, r.assistant_prefix)) for r in requests]
            for ids, request in zip(encoded, requests):
                self.check_length(len(ids), request.params.max_tokens)
            decisions = self._decisions(list(requests))
            for i, decision in enumerate(decisions):
                self.context(decision.route)
                yield StreamEvent(i, decision=decision)
            for i, (request, ids) in enumerate(zip(requests, encoded)):
                yield from self._reply(i, request, decisions[i], ids)

    def _decisions(self, requests: list[GenerationRequest]) -> list[RouteDecision]:
        decisions: list[RouteDecision | None] = [
            RouteDecision(r.route, None, forced=True) if r.route != "auto" else None for r in requests]
        gated = [i for i, d in enumerate(decisions) if d is None]
        if gated:
            for i, decision in zip(gated, self.router.decide([requests[i].messages for i in gated])):
                decisions[i] = decision
        return decisions  # type: ignore[return-value]

    def _reply(self, index: int, request: GenerationRequest, decision: RouteDecision, ids: list[int]
               ) -> Iterator[StreamEvent]:
        context = self.context(decision.route)
        text = TextStream(self.tokenizer, request.params.stop)
        logprobs: list[dict[str, Any]] | None = [] if request.params.logprobs is not None else None
        for token, logits in context.sample(ids, request.params):
            events = decode_step(index, request, decision, text, logprobs, token, logits, self.eos_ids, len(ids))
            yield from events
            if events and events[-1].completion is not None:
                return


@dataclass
class PersonaOpener:
    """Opens the persona route's llama.cpp context of a run: the merged persona GGUF when one is exported
    (and `persona` allows it), else the base GGUF with the run's LoRA, exported first when it is stale."""

    run_path: Path
    base_path: Path
    persona: str  # "auto", "merged" or "lora"
    context_size: int
    n_threads: int | None

    def open(self) -> tuple[LlamaContext, str]:
        out = self.run_path / EXPORT_DIR
        if not export_is_current(self.run_path, self.base_path):
            log.info("exporting the run's adapter to %s for llama.cpp", out / ADAPTER_FILE)
            export_gguf(self.run_path, base_gguf=self.base_path)
        merged = out / MERGED_FILE
        if self.persona == "merged" and not merged.is_file():
            raise PrismError(f"{merged} does not exist: run `prism export gguf {self.run_path} --merged` first")
        if self.persona in ("auto", "merged") and merged.is_file():
            return LlamaContext(open_llama(merged, n_ctx=self.context_size, n_threads=self.n_threads)), "merged"
        lora = open_llama(self.base_path, lora=out / ADAPTER_FILE, n_ctx=self.context_size, n_threads=self.n_threads)
        return LlamaContext(lora), "lora"
