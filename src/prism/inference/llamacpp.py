"""LlamaCppModel: a run on llama.cpp, generation on GGUF weights, routing still PRISM's.

The gate reads block 0 computed in PyTorch (`Router`: tokenizer, embeddings and block 0 only). The reply
then comes from one of the llama.cpp contexts over the run's GGUF: the base context, or the persona context,
which holds the merged persona GGUF when `prism export gguf --merged` wrote one (no LoRA cost per token),
else the base GGUF with the exported LoRA; a k-way run adds one context per persona adapter (its LoRA GGUF
on the base GGUF). One context per route keeps each route's prompt cache warm and never switches adapters
mid-stream; benchmarks/engines.py compares them with switching the adapter per request on one context.

Requests run one at a time, on a worker thread that holds the contexts while it decodes and hands each event
to the caller through a queue: the caller's generator holds no lock, and closing it stops the worker at the
next token.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prism.config import with_options
from prism.errors import PrismError
from prism.inference.artifacts import FinishedRun, adapter_key
from prism.inference.base import (
    GatedModel,
    GenerationRequest,
    ReloadResult,
    RouteDecision,
    StreamEvent,
    decode_step,
    forced_decision,
)
from prism.inference.config import LoadConfig
from prism.inference.gguf_export import (
    ADAPTER_FILE,
    MERGED_FILE,
    export_is_current,
    export_run,
    kway_adapter_file,
    recorded_base_gguf,
)
from prism.inference.router import Router
from prism.lm.decoding import TextStream
from prism.lm.llama import LlamaContext, base_gguf_for, check_vocabulary, open_llama
from prism.lm.models import encode
from prism.runs import EXPORT_DIR

log = logging.getLogger("prism")
DEFAULT_CONTEXT = 4096  # when the model's config names no context window


class LlamaCppModel(GatedModel):
    """A bootstrapped run on llama.cpp: the same `generate`/`stream`/`decide` as PrismModel."""

    engine = "llamacpp"

    def __init__(self, router: Router, contexts: dict[str, LlamaContext | None], *, persona_source: str = "none",
                 max_model_len: int | None = None, opener: PersonaOpener | None = None):
        self.router = router
        self.opener = opener  # how the persona contexts were opened, to open them again on a reload
        self.run = router.run
        self._use_gates(router.gates, router.routing)
        self.tokenizer = router.lm.tokenizer
        # one context per route: base, the binary adapter ("persona") and each k-way adapter ("persona-<persona>")
        self.contexts = contexts
        base = contexts["base"]
        assert base is not None
        self.persona_source = persona_source  # "merged", "lora" or "none"
        self.max_model_len = min(max_model_len or base.n_ctx, base.n_ctx)
        self.eos_ids = base.stop_ids(self.tokenizer)
        self._lock = threading.Lock()  # held by the worker while it decodes, and by a reload

    @classmethod
    def from_run(cls, run: str | Path | FinishedRun, config: LoadConfig | None = None, **options: Any
                 ) -> LlamaCppModel:
        """Load a finished run on llama.cpp; `config` (or its fields as keywords) says how. The adapters are
        exported to RUN/gguf/ first when that export is missing or older than the run's adapters.
        `persona_model`: 'auto' (the merged GGUF when exported, else the LoRA), 'merged' or 'lora'."""
        config = with_options(LoadConfig, config, **options)
        run = run if isinstance(run, FinishedRun) else FinishedRun.open(run, config)
        base_path = base_gguf_for(run.config, config.gguf or recorded_base_gguf(run.path))
        router = Router.from_run(run, replace(config, device="cpu"))
        context_size = (config.max_model_len or getattr(router.lm.model.config, "max_position_embeddings", None)
                        or DEFAULT_CONTEXT)
        base = LlamaContext(open_llama(base_path, n_ctx=context_size, n_threads=config.threads))
        check_vocabulary(base, router.lm.tokenizer, base_path)
        opener = PersonaOpener(base_path, config.persona_model, context_size, config.threads)
        contexts, source = opener.open_all(run)
        return cls(router, {"base": base, **contexts}, persona_source=source, max_model_len=config.max_model_len,
                   opener=opener)

    @property
    def has_adapter(self) -> bool:
        return self.contexts.get("persona") is not None

    def decide(self, conversations: Sequence[list[dict[str, str]]], routing: str | None = None
               ) -> list[RouteDecision]:
        return self.router.decide(conversations, routing)

    def reload(self) -> ReloadResult:
        """Read the run's gates, thresholds and adapters again (re-exporting the adapters when they changed)
        between requests: the one being generated finishes on the old persona context. A failed reload changes
        nothing."""
        if self.opener is None:
            raise PrismError("this model was not loaded with its persona contexts' settings: restart to reload")
        run = self._reopen()
        opened, source = self.opener.open_all(run)
        with self._lock:
            old = [self.contexts[key] for key in opened]
            self.router.use_run(run)
            self.contexts.update(opened)
            self.persona_source = source
            result = self._reloaded(run, persona_model=source)
        for context in old:
            if context is not None:
                context.llm.close()
        return result

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
        requests = list(requests)
        encoded = [encode(self.tokenizer, self.prompt(r.messages, r.assistant_prefix)) for r in requests]
        for ids, request in zip(encoded, requests):
            self.check_length(len(ids), request.params.max_tokens)
        decisions = self._decisions(requests)
        for i, decision in enumerate(decisions):
            self.context(decision.adapter or "base")
            yield StreamEvent(i, decision=decision)
        events: queue.Queue[StreamEvent | BaseException | None] = queue.Queue()
        stop = threading.Event()
        worker = threading.Thread(target=self._replies, args=(requests, decisions, encoded, events, stop),
                                  name="prism-llamacpp", daemon=True)
        worker.start()
        try:
            while (event := events.get()) is not None:
                if isinstance(event, BaseException):
                    raise event
                yield event
        finally:
            stop.set()  # a caller that stops listening stops the worker at its next token

    def _replies(self, requests: list[GenerationRequest], decisions: list[RouteDecision], encoded: list[list[int]],
                 events: queue.Queue, stop: threading.Event) -> None:
        try:
            with self._lock:
                for i, (request, ids) in enumerate(zip(requests, encoded)):
                    for event in self._reply(i, request, decisions[i], ids):
                        if stop.is_set():
                            return
                        events.put(event)
        except BaseException as exc:  # handed to the caller, who raises it
            events.put(exc)
        finally:
            events.put(None)

    def _decisions(self, requests: list[GenerationRequest]) -> list[RouteDecision]:
        decisions: list[RouteDecision | None] = [forced_decision(r) if r.route != "auto" else None for r in requests]
        gated = [i for i, d in enumerate(decisions) if d is None]
        if gated:
            decided = self.router.decide_each([requests[i].messages for i in gated],
                                              [requests[i].routing for i in gated])
            for i, decision in zip(gated, decided):
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
    """Opens a run's persona contexts: for the binary adapter the merged persona GGUF when one is exported (and
    `persona_model` allows it), else the base GGUF with the run's LoRA; for each k-way persona the base GGUF with
    that persona's LoRA. A stale or missing export is exported first."""

    base_path: Path
    persona_model: str  # "auto", "merged" or "lora"
    context_size: int
    n_threads: int | None

    def open_all(self, run: FinishedRun) -> tuple[dict[str, LlamaContext | None], str]:
        """{"persona": the binary adapter's context (None without one), "persona-<p>": each k-way persona's},
        and what the binary one runs on ("merged", "lora" or "none")."""
        stale = [p for p in ([None] if run.has_adapter else []) + list(run.personas)
                 if not export_is_current(run.path, self.base_path, p)]
        if stale:
            log.info("exporting the run's adapters to %s for llama.cpp", run.path / EXPORT_DIR)
            export_run(run, base_gguf=self.base_path)
        binary, source = self._binary(run) if run.has_adapter else (None, "none")
        kway = {adapter_key(p): self._open(self.base_path, run.path / EXPORT_DIR / kway_adapter_file(p))
                for p in run.personas}
        return {adapter_key(None): binary, **kway}, source

    def _binary(self, run: FinishedRun) -> tuple[LlamaContext, str]:
        merged = run.path / EXPORT_DIR / MERGED_FILE
        if self.persona_model == "merged" and not merged.is_file():
            raise PrismError(f"{merged} does not exist: run `prism export gguf {run.path} --merged` first")
        if self.persona_model in ("auto", "merged") and merged.is_file():
            return self._open(merged), "merged"
        return self._open(self.base_path, run.path / EXPORT_DIR / ADAPTER_FILE), "lora"

    def _open(self, path: Path, lora: Path | None = None) -> LlamaContext:
        return LlamaContext(open_llama(path, lora=lora, n_ctx=self.context_size, n_threads=self.n_threads))
