"""LlamaCppModel: a run on llama.cpp, generation on GGUF weights, routing still PRISM's.

The gate reads its blocks computed in PyTorch (`Router`: tokenizer, embeddings and blocks up to the gate's layer
only). The reply then comes from one route of a `BatchedLlama` over the run's GGUF: base, or the persona route,
which runs on the merged persona GGUF when `prism export gguf --merged` wrote one (no LoRA cost per token), else on
the base GGUF's weights with the exported LoRA; a k-way run adds one route per persona adapter (its LoRA on the base
weights). The base weights are loaded once; each route is a llama.cpp context of `max_num_seqs` sequences.

Requests are decoded together, continuously: each joins its route's batch when a slot is free and leaves it
when done (`submit`, what `prism serve` uses; the requests waiting at once get their routes in one gate forward),
and `stream` does the same for a list. Each request samples from its own seeded generator, so its reply does
not depend on what else is decoded beside it.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from prism.config import with_options
from prism.errors import PrismError
from prism.inference.artifacts import FinishedRun
from prism.inference.base import (
    GatedModel,
    GenerationRequest,
    ReloadResult,
    RouteDecision,
    StreamEvent,
    TokenScores,
    decode_step,
    forced_decision,
    token_scores,
)
from prism.inference.config import LoadConfig
from prism.inference.gguf_export import (
    ADAPTER_FILE,
    MERGED_FILE,
    export_is_current,
    export_outside,
    export_run,
    kway_adapter_file,
    recorded_base_gguf,
)
from prism.inference.router import Router
from prism.lm.decoding import TextStream, sample_token
from prism.lm.llama import base_gguf_for, check_vocabulary, default_threads
from prism.lm.llama_batch import BatchedLlama, RouteSpec
from prism.lm.llama_batch import Sequence as LlamaSequence
from prism.lm.llama_weights import decode_weights
from prism.lm.models import encode
from prism.routes import adapter_key, route_key
from prism.runs import EXPORT_DIR

log = logging.getLogger("prism")
DEFAULT_SLOT_TOKENS = 2048  # a sequence's context when --max-model-len is not given (its KV cells are reserved)


class LlamaCppModel(GatedModel):
    """A bootstrapped run on llama.cpp: the same `generate`/`stream`/`submit`/`decide` as PrismModel."""

    engine = "llamacpp"

    def __init__(self, router: Router, llama: BatchedLlama, *, persona_source: str = "none",
                 opener: PersonaRoutes | None = None, weights_type: str = "as-is"):
        self.router = router
        self.opener = opener  # how the persona routes were found, to find them again on a reload
        self.run = router.run
        self._use_gates(router.gates, router.routing)
        self.tokenizer = router.lm.tokenizer
        self.llama = llama  # routes: base, the binary adapter ("persona") and each k-way one ("persona-<persona>")
        self.persona_source = persona_source  # "merged", "lora" or "none"
        self.weights_type = weights_type  # the base weights: "as-is" (the GGUF's own) or the type re-encoded to
        self.max_model_len = llama.slot_tokens
        self.eos_ids = {self.tokenizer.eos_token_id, llama.weights.token_eos()} - {None, -1}

    @classmethod
    def from_run(cls, run: str | Path | FinishedRun, config: LoadConfig | None = None, **options: Any
                 ) -> LlamaCppModel:
        """Load a finished run on llama.cpp; `config` (or its fields as keywords) says how. The adapters come from
        the run's own export (RUN/gguf/) when it is current, else from one made outside the run (PersonaRoutes).
        `persona_model`: 'auto' (the merged GGUF when exported, else the LoRA), 'merged' or 'lora'."""
        config = with_options(LoadConfig, config, **options)
        run = run if isinstance(run, FinishedRun) else FinishedRun.open(run, config)
        base_path = base_gguf_for(run.config, config.gguf or recorded_base_gguf(run.path))
        router = Router.from_run(run, replace(config, device="cpu"))
        trained = getattr(router.lm.model.config, "max_position_embeddings", None) or DEFAULT_SLOT_TOKENS
        weights, weights_type = decode_weights(base_path, config.gguf_weights, config.max_num_seqs)
        opener = PersonaRoutes(base_path, config.persona_model, weights, config.gguf_weights, config.max_num_seqs)
        routes, source = opener.routes(run)
        llama = BatchedLlama({"base": RouteSpec(weights), **routes}, slots=config.max_num_seqs,
                             slot_tokens=config.max_model_len or min(trained, DEFAULT_SLOT_TOKENS),
                             threads=config.threads or default_threads(), kv_type=config.kv_cache_dtype)
        try:
            check_vocabulary(llama.weights, router.lm.tokenizer, base_path)
        except BaseException:
            llama.close()
            raise
        log.info("llama.cpp: %d routes x %d sequences x %d tokens (KV cache up to %.2f GB, each route's at its "
                 "first request), base weights %s", len(llama.routes), llama.slots, llama.slot_tokens,
                 llama.kv_bytes() / 1e9, weights_type)
        return cls(router, llama, persona_source=source, opener=opener, weights_type=weights_type)

    @property
    def has_adapter(self) -> bool:
        return adapter_key(None) in self.llama.routes

    def decide(self, conversations: Sequence[list[dict[str, str]]], routing: str | None = None
               ) -> list[RouteDecision]:
        return self.router.decide(conversations, routing)

    def reload(self) -> ReloadResult:
        """Read the run's gates, thresholds and adapters again (re-exporting the adapters when they changed),
        between decode steps: requests decoding when it happens finish on the old persona routes. A failed
        reload changes nothing."""
        if self.opener is None:
            raise PrismError("this model was not loaded with its persona routes' settings: restart to reload")
        run = self._reopen()
        routes, source = self.opener.routes(run)
        self.llama.replace_routes(routes, keep=("base",))
        self.router.use_run(run)
        self.persona_source = source
        return self._reloaded(run, persona_model=source)

    def close(self) -> None:
        super().close()
        self.llama.close()

    def observe_steps(self, on_step: Callable[[int], None]) -> None:
        self.llama.on_step = on_step

    def stream(self, requests: Sequence[GenerationRequest]) -> Iterator[StreamEvent]:
        """Each request's route first (all of them), then the requests' text deltas as they are decoded,
        together, and each one's completion."""
        if not requests:
            return
        requests = list(requests)
        encoded = [self._encode(r) for r in requests]
        decisions = self._decisions(requests)
        for i, decision in enumerate(decisions):
            self._route(decision)
            yield StreamEvent(i, decision=decision)
        events: queue.Queue[StreamEvent | BaseException] = queue.Queue()
        sequences = [self._sequence(i, r, d, ids, events.put) for i, (r, d, ids) in
                     enumerate(zip(requests, decisions, encoded))]
        try:
            for sequence, decision in zip(sequences, decisions):
                self.llama.submit(self._route(decision), sequence)
            pending = len(requests)
            while pending:
                event = events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                pending -= event.completion is not None
        finally:
            for sequence in sequences:
                sequence.cancel()  # a caller that stops listening frees the slots at the next step

    def submit(self, requests: Sequence[GenerationRequest],
               on_events: Sequence[Callable[[StreamEvent | BaseException], None]]) -> None:
        """Queue requests on their routes' batches and return at once, their routes decided in one gate forward:
        `on_events[i]` gets request i's route, its text deltas and its completion (or the exception that ended
        or refused it), from the decoding thread. A request refused (too long, an unknown persona) does not
        hold the others back. Cancel one with its request.cancel."""
        encoded: dict[int, list[int]] = {}
        for i, request in enumerate(requests):
            try:
                encoded[i] = self._encode(request)
            except Exception as exc:  # noqa: BLE001 - this request's error, not the batch's
                on_events[i](exc)
        decisions = self._decisions([requests[i] for i in encoded])
        for (i, ids), decision in zip(encoded.items(), decisions):
            try:
                route = self._route(decision)
                on_events[i](StreamEvent(0, decision=decision))
                self.llama.submit(route, self._sequence(0, requests[i], decision, ids, on_events[i]))
            except Exception as exc:  # noqa: BLE001
                on_events[i](exc)

    def score_tokens(self, sequences: Sequence[list[int]], decisions: Sequence[RouteDecision]) -> list[TokenScores]:
        self.check_scorable(sequences, decisions)
        scores: list[TokenScores | None] = [None] * len(sequences)

        def keep(index: int) -> Callable[[torch.Tensor], None]:
            def on_logits(logits: torch.Tensor) -> None:  # one row per position: the last predicts nothing scored
                scores[index] = token_scores(logits[:-1], sequences[index])
            return on_logits

        self.llama.run_routed((self._route(decision), LlamaSequence(list(ids), keep(i), logits_from=0))
                              for i, (ids, decision) in enumerate(zip(sequences, decisions)))
        return scores  # type: ignore[return-value]

    def _encode(self, request: GenerationRequest) -> list[int]:
        ids = encode(self.tokenizer, self.prompt(request.messages, request.assistant_prefix))
        self.check_length(len(ids), request.params.max_tokens)
        return ids

    def _route(self, decision: RouteDecision) -> str:
        """The llama.cpp route of a decision: "base", "persona" (the binary adapter) or "persona-<persona>"."""
        route = route_key(decision.route, decision.persona)
        if route not in self.llama.routes:
            self.check_persona_route(decision.persona)
        return route

    def _decisions(self, requests: list[GenerationRequest]) -> list[RouteDecision]:
        decisions: list[RouteDecision | None] = [forced_decision(r) if r.route != "auto" else None for r in requests]
        gated = [i for i, d in enumerate(decisions) if d is None]
        if gated:
            decided = self.router.decide_each([requests[i].messages for i in gated],
                                              [requests[i].routing for i in gated])
            for i, decision in zip(gated, decided):
                decisions[i] = decision
        return decisions  # type: ignore[return-value]

    def _sequence(self, index: int, request: GenerationRequest, decision: RouteDecision, ids: list[int],
                  emit: Callable[[StreamEvent | BaseException], None]) -> LlamaSequence:
        """The request as a llama.cpp sequence: each next-token distribution sampled with the request's own
        generator, and its events handed to `emit`."""
        text = TextStream(self.tokenizer, request.params.stop)
        logprobs: list[dict[str, Any]] | None = [] if request.params.logprobs is not None else None
        generator = request.params.generator()
        finished = False

        def step(events: list[StreamEvent]) -> bool:
            nonlocal finished
            for event in events:
                emit(event)
            finished = bool(events) and events[-1].completion is not None
            return finished

        def on_logits(logits: torch.Tensor) -> int | None:
            token = sample_token(logits[-1], request.params, generator)
            events = decode_step(index, request, decision, text, logprobs, token, logits[-1], self.eos_ids, len(ids))
            return None if step(events) else token

        def on_end(error: BaseException | None) -> None:
            if error is not None:
                emit(error)
            elif not finished and request.cancel is not None and request.cancel.is_set():
                # cancelled before its next token: the completion says so (decode_step reads no token then)
                step(decode_step(index, request, decision, text, logprobs, -1, torch.empty(0), self.eos_ids, len(ids)))

        return LlamaSequence(ids, on_logits, max_new_tokens=request.params.max_tokens, on_end=on_end,
                             stop=request.cancel)


@dataclass
class PersonaRoutes:
    """Finds a run's persona routes: for the binary adapter the merged persona GGUF when one is exported (and
    `persona_model` allows it), else the base GGUF with the run's LoRA; for each k-way persona the base GGUF with
    that persona's LoRA. A stale or missing export is exported first."""

    base_path: Path  # the base GGUF the adapters are exported against
    persona_model: str  # "auto", "merged" or "lora"
    base_weights: Path  # what the base route decodes (base_path or its re-encoding): the LoRA routes' weights too
    gguf_weights: str = "as-is"  # how a merged persona GGUF is decoded (prism.lm.llama_weights.decode_weights)
    sequences: int = 1

    def routes(self, run: FinishedRun) -> tuple[dict[str, RouteSpec], str]:
        """{"persona": the binary adapter's route (absent without one), "persona-<p>": each k-way persona's},
        and what the binary one runs on ("merged", "lora" or "none"). The run's own export (RUN/gguf, written by
        `prism export gguf`) when it is current; else one made outside the run (`export_outside`): loading and
        reloading never write into the run directory."""
        needed = ([None] if run.has_adapter else []) + list(run.personas)
        directory = run.path / EXPORT_DIR
        if not all(export_is_current(run.path, self.base_path, p, directory) for p in needed):
            directory = export_outside(run, self.base_path)
            if not all(export_is_current(run.path, self.base_path, p, directory) for p in needed):
                log.info("exporting the run's adapters for llama.cpp to %s (outside the run; `prism export gguf "
                         "%s` writes them into it)", directory, run.path)
                export_run(run, base_gguf=self.base_path, out=directory)
        routes = {adapter_key(p): RouteSpec(self.base_weights, directory / kway_adapter_file(p))
                  for p in run.personas}
        if not run.has_adapter:
            return routes, "none"
        merged = directory / MERGED_FILE  # only the run's own export has one: `prism export gguf --merged`
        if self.persona_model == "merged" and not merged.is_file():
            raise PrismError(f"the run has no merged persona GGUF made from its present adapter: run `prism export "
                             f"gguf {run.path} --merged` first")
        if self.persona_model in ("auto", "merged") and merged.is_file():
            merged_weights, _ = decode_weights(merged, self.gguf_weights, self.sequences)
            return {adapter_key(None): RouteSpec(merged_weights), **routes}, "merged"
        return {adapter_key(None): RouteSpec(self.base_weights, directory / ADAPTER_FILE), **routes}, "lora"
