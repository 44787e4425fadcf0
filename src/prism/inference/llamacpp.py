"""LlamaCppModel: a run on llama.cpp, generation on GGUF weights, routing still PRISM's.

The gate reads block 0 computed in PyTorch (`Router`: tokenizer, embeddings and block 0 only). The reply
then comes from one of two llama.cpp contexts over the run's GGUF: the base context, or the persona context,
which holds the merged persona GGUF when `prism export gguf --merged` wrote one (no LoRA cost per token),
else the base GGUF with the exported LoRA; a k-way run adds one context per persona adapter (its LoRA GGUF
on the base GGUF). One context per route keeps each route's prompt cache warm and never switches adapters
mid-stream; benchmarks/engines.py compares them with switching the adapter per request
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
from prism.inference.base import (
    GatedModel,
    GenerationRequest,
    RouteDecision,
    StreamEvent,
    adapter_key,
    decode_step,
    forced_decision,
)
from prism.inference.gguf_export import (
    ADAPTER_FILE,
    EXPORT_DIR,
    MERGED_FILE,
    export_gguf,
    export_is_current,
    kway_adapter_file,
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
                 opener: PersonaOpener | None = None, kway: dict[str, LlamaContext] | None = None):
        self.router = router
        self.opener = opener  # how the persona contexts were opened, to open them again on a reload
        self.gate = router.gate
        self.routing = router.routing
        self.tokenizer = router.lm.tokenizer
        self.run_path = run_path
        # one context per route: base, the binary adapter ("persona") and each k-way adapter ("persona-<persona>")
        self.contexts = {"base": base, "persona": persona,
                         **{adapter_key(p): context for p, context in (kway or {}).items()}}
        self.persona_source = persona_source  # "merged", "lora" or "none"
        self.max_model_len = min(max_model_len or base.n_ctx, base.n_ctx)
        self.eos_ids = base.stop_ids(self.tokenizer)
        self._lock = threading.Lock()

    @classmethod
    def from_run(cls, run_dir: str | Path, *, gguf: str | Path | None = None, threshold: float | None = None,
                 max_model_len: int | None = None, n_threads: int | None = None, persona: str = "auto",
                 trust_remote_code: bool = False, routing: str = "auto") -> LlamaCppModel:
        """Load a finished run on llama.cpp. The adapter is exported to RUN/gguf/adapter.gguf first when that
        file is missing or older than the run's adapter. `persona`: 'auto' (the merged GGUF when exported,
        else the LoRA), 'merged' or 'lora'. `routing`: 'binary', 'kway' or 'auto', as for PrismModel."""
        if persona not in ("auto", "merged", "lora"):
            raise PrismError(f"persona must be 'auto', 'merged' or 'lora', got {persona!r}")
        run, _manifest, config = open_finished_run(run_dir, trust_remote_code)
        base_path = base_gguf_for(config, gguf or recorded_base_gguf(run.path))
        router = Router.from_run(run.path, device="cpu", threshold=threshold, trust_remote_code=trust_remote_code,
                                 routing=routing)
        context_size = max_model_len or getattr(router.lm.model.config, "max_position_embeddings", None) or 4096
        base = LlamaContext(open_llama(base_path, n_ctx=context_size, n_threads=n_threads))
        check_vocabulary(base, router.lm.tokenizer, base_path)
        opener = PersonaOpener(run.path, base_path, persona, context_size, n_threads)
        persona_context, source = opener.open() if router.has_adapter else (None, "none")
        kway = {p: opener.open(p)[0] for p in router.personas}
        model = cls(router, base, persona_context, run_path=run.path, persona_source=source,
                    max_model_len=max_model_len, opener=opener, kway=kway)
        model.trust_remote_code = trust_remote_code
        return model

    @property
    def has_adapter(self) -> bool:
        return self.contexts["persona"] is not None

    @property
    def personas(self) -> list[str]:  # type: ignore[override]
        return list(self.router.personas)

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
            opened = {"persona": persona, **{adapter_key(p): self.opener.open(p)[0] for p in self.personas}}
            old = [self.contexts[key] for key in opened]
            self.router.use_gate(gate)
            self.gate = gate
            self.contexts.update(opened)
            self.persona_source = source
            for context in old:
                if context is not None:
                    context.llm.close()
        return {"threshold": self.threshold, "adapter": self.has_adapter, "persona_model": source,
                **({"personas": self.personas} if self.personas else {})}

    def context(self, route: str) -> LlamaContext:
        """The context of a route: "base", "persona" (the binary adapter) or "persona-<k-way persona>"."""
        context = self.contexts.get(route)
        if context is None:
            self.check_persona_route(None if route == "persona" else route.removeprefix("persona-"))
        assert context is not None
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
                self.context(decision.adapter or "base")
                yield StreamEvent(i, decision=decision)
            for i, (request, ids) in enumerate(zip(requests, encoded)):
                yield from self._reply(i, request, decisions[i], ids)

    def _decisions(self, requests: list[GenerationRequest]) -> list[RouteDecision]:
        for request in requests:
            if request.routing not in (None, self.routing):
                raise PrismError(f"this model routes with its {self.routing} gate only; load the run with --routing "
                                 f"{request.routing} for the other")
        decisions: list[RouteDecision | None] = [forced_decision(r) if r.route != "auto" else None for r in requests]
        gated = [i for i, d in enumerate(decisions) if d is None]
        if gated:
            for i, decision in zip(gated, self.router.decide([requests[i].messages for i in gated])):
                decisions[i] = decision
        return decisions  # type: ignore[return-value]

    def _reply(self, index: int, request: GenerationRequest, decision: RouteDecision, ids: list[int]
               ) -> Iterator[StreamEvent]:
        context = self.context(decision.adapter or "base")
        text = TextStream(self.tokenizer, request.params.stop)
        logprobs: list[dict[str, Any]] | None = [] if request.params.logprobs is not None else None
        for token, logits in context.sample(ids, request.params):
            events = decode_step(index, request, decision, text, logprobs, token, logits, self.eos_ids, len(ids))
            yield from events
            if events and events[-1].completion is not None:
                return


@dataclass
class PersonaOpener:
    """Opens a persona route's llama.cpp context of a run: for the binary adapter the merged persona GGUF when
    one is exported (and `persona` allows it), else the base GGUF with the run's LoRA; for a k-way persona the
    base GGUF with that persona's LoRA. A stale or missing export is exported first."""

    run_path: Path
    base_path: Path
    persona: str  # "auto", "merged" or "lora"
    context_size: int
    n_threads: int | None

    def open(self, kway_persona: str | None = None) -> tuple[LlamaContext, str]:
        out = self.run_path / EXPORT_DIR
        if not export_is_current(self.run_path, self.base_path, kway_persona):
            log.info("exporting the run's adapters to %s for llama.cpp", out)
            export_gguf(self.run_path, base_gguf=self.base_path)
        if kway_persona is not None:
            lora = out / kway_adapter_file(kway_persona)
            return LlamaContext(open_llama(self.base_path, lora=lora, n_ctx=self.context_size,
                                           n_threads=self.n_threads)), "lora"
        merged = out / MERGED_FILE
        if self.persona == "merged" and not merged.is_file():
            raise PrismError(f"{merged} does not exist: run `prism export gguf {self.run_path} --merged` first")
        if self.persona in ("auto", "merged") and merged.is_file():
            return LlamaContext(open_llama(merged, n_ctx=self.context_size, n_threads=self.n_threads)), "merged"
        lora = open_llama(self.base_path, lora=out / ADAPTER_FILE, n_ctx=self.context_size, n_threads=self.n_threads)
        return LlamaContext(lora), "lora"
