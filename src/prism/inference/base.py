"""What every inference backend shares: requests, route decisions, completions and stream events, and
`GatedModel`, the one interface PrismModel and LlamaCppModel implement: `generate`/`stream` for a given batch,
`submit` for requests that join a running batch as they come (what a server uses), `decide` for routes alone."""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from prism.config import ROUTINGS, with_options
from prism.errors import ContextLengthError, PrismError, RequestError
from prism.inference.artifacts import FinishedRun
from prism.inference.streams import Intake, RequestStream
from prism.lm.decoding import SamplingParams, TextStream, token_logprobs
from prism.lm.gate import Gate, check_threshold, save_threshold
from prism.lm.models import chat_prompt, conversation_prompt, encode
from prism.routes import BASE, ROUTES, adapter_key
from prism.runs import gate_dir

log = logging.getLogger("prism")



@dataclass
class GenerationRequest:
    messages: list[dict[str, str]]
    route: str = "auto"
    params: SamplingParams = field(default_factory=SamplingParams)
    cancel: threading.Event | None = None  # set it to end this request early (client gone, Ctrl-C)
    assistant_prefix: str = ""  # the reply starts with this text (scoring and judging prompts)
    persona: str | None = None  # with route "persona": which k-way adapter (None: the binary adapter)
    routing: str | None = None  # which gate decides route "auto": "binary", "kway" (None: the model's own)

    def __post_init__(self) -> None:
        if self.route not in ROUTES:
            raise RequestError(f"route must be one of {', '.join(ROUTES)}, got {self.route!r}")
        if self.persona is not None and self.route != "persona":
            raise RequestError(f"a persona ({self.persona!r}) is named only with route 'persona', not {self.route!r}")
        if self.routing is not None and self.routing not in ROUTINGS:
            raise RequestError(f"routing must be one of {', '.join(ROUTINGS)}, got {self.routing!r}")


@dataclass
class RouteDecision:
    route: str  # "base" or "persona"
    gate_probability: float | None  # the gate's P(an adapter); None when the caller forced the route
    forced: bool
    persona: str | None = None  # the k-way adapter's persona on route "persona" (None: the binary adapter)

    @property
    def adapter(self) -> str | None:
        """The adapter this decision runs on (`adapter_key`), None on the base route."""
        return None if self.route == BASE else adapter_key(self.persona)


@dataclass
class Completion:
    text: str
    route: str
    gate_probability: float | None
    forced: bool
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of text or a stop string), "length" (max_tokens) or "cancelled"
    logprobs: list[dict[str, Any]] | None = None  # per token, when the request's params ask for them
    persona: str | None = None  # the k-way persona that answered (None: base, or the binary adapter)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StreamEvent:
    index: int  # position of the request in the batch
    delta: str = ""
    decision: RouteDecision | None = None  # once per request, before any of its text
    completion: Completion | None = None  # once per request, when it is finished


def decision_at(probability: float, threshold: float) -> RouteDecision:
    return RouteDecision("persona" if probability >= threshold else "base", probability, forced=False)


def forced_decision(request: GenerationRequest) -> RouteDecision:
    return RouteDecision(request.route, None, forced=True, persona=request.persona)


def gate_decisions_on(gate: Gate, features: torch.Tensor) -> list[RouteDecision]:
    """The gate's decision for each row of block-0 features (binary or k-way)."""
    return [RouteDecision("persona" if route else "base", probability, False, gate.persona_of(route))
            for probability, route in gate.decide(features)]


@dataclass
class TokenScores:
    """A token sequence scored as it stands: for each token after the first, its log-probability given the
    tokens before it, and whether it was the most probable one (the harness's `is_greedy`)."""

    logprobs: list[float]
    greedy: list[bool]


def token_scores(logits: torch.Tensor, ids: Sequence[int]) -> TokenScores:
    """From the logits at positions 0..n-2, each predicting the token after it."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor(list(ids[1:]))
    return TokenScores(logprobs.gather(1, targets[:, None])[:, 0].tolist(), (logprobs.argmax(-1) == targets).tolist())


@dataclass
class ReloadResult:
    """What a reload read: the threshold in force, whether the run has the binary adapter, its k-way personas,
    how many reloads this model has taken, and on llama.cpp which persona model the binary route runs on."""
    threshold: float
    adapter: bool
    personas: list[str]
    reloads: int
    persona_model: str | None = None  # llama.cpp: "merged" or "lora"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class RouteDecider(Protocol):
    """What serving needs of whatever decides routes: a gated model (`prism serve`) or the sidecar's Router."""

    routing: str

    @property
    def run_path(self) -> Path | None: ...

    @property
    def threshold(self) -> float: ...

    @property
    def has_adapter(self) -> bool: ...

    @property
    def personas(self) -> list[str]: ...

    def decide(self, conversations: Sequence[list[dict[str, str]]], routing: str | None = None
               ) -> list[RouteDecision]: ...

    def reload(self) -> ReloadResult: ...


class Gates:
    """The gates of a run (binary, and k-way for a k-way routing) and the one this model routes with; a request may
    name the other (`GenerationRequest.routing`). Shared by both backends and the Router."""

    gates: dict[str, Gate]
    routing: str  # the gate that decides when a request names none: "binary" or "kway"
    run: FinishedRun | None = None
    reloads: int = 0

    def _use_gates(self, gates: dict[str, Gate], routing: str | None = None) -> None:
        features = {(g.config.layer, g.config.pool) for g in gates.values()}
        if len(features) > 1:
            raise PrismError(f"the run's gates read different features (layer, pool): {sorted(features)}; re-run the "
                             "gate stage so that they share one")
        self.gates = gates
        self.routing = routing or ("kway" if "kway" in gates else "binary")

    @property
    def gate_layer(self) -> int:
        """The decoder block the gates read: the prefill up to it is the same on every route."""
        return self.gate.config.layer

    @property
    def gate(self) -> Gate:
        return self.gates[self.routing]

    @property
    def run_path(self) -> Path | None:
        return self.run.path if self.run is not None else None

    @property
    def personas(self) -> list[str]:
        """The k-way adapters' personas (served as prism-persona-<persona>); none for a binary routing."""
        return list(self.gates["kway"].config.classes[1:]) if "kway" in self.gates else []

    def gate_for(self, routing: str | None) -> Gate:
        """The gate of `routing` ("binary" or "kway"), or this model's own when None."""
        routing = routing or self.routing
        if routing not in self.gates:
            raise PrismError(f"this model has no {routing} gate (loaded: {', '.join(self.gates)}); load a run "
                             "bootstrapped with --routing kway with routing 'kway' or 'auto'")
        return self.gates[routing]

    @property
    def threshold(self) -> float:
        return self.gate.config.threshold

    def set_threshold(self, value: float, save: bool = False) -> None:
        """Route to an adapter when P(persona) >= value; `save` writes it into the config of the run's gate this
        model routes with (the k-way one for a k-way model)."""
        self.gate.config.threshold = check_threshold(value)
        if save:
            if self.run_path is None:
                raise PrismError("this model was not loaded from a run directory: nothing to save the threshold in")
            save_threshold(self.run_path / gate_dir(self.routing), value)

    def _reopen(self) -> FinishedRun:
        if self.run is None:
            raise PrismError("this model was not loaded from a run directory: there is nothing to reload")
        return self.run.reopen()

    def _reloaded(self, run: FinishedRun, **extra: Any) -> ReloadResult:
        """Take `run`'s gates as this model's (the routing stays), and say what the reload read."""
        layer = run.gate.config.layer
        if layer != self.gate_layer:
            raise PrismError(f"the reloaded run's gate reads decoder block {layer}, the loaded model's prefill was set "
                             f"up for block {self.gate_layer}: restart to serve it")
        self.run = run
        self._use_gates(run.gates, self.routing)
        self.reloads += 1
        return ReloadResult(self.threshold, run.has_adapter, run.personas, self.reloads, **extra)


class GatedModel(Gates, ABC):
    """What both engines share: the gates, a tokenizer for the chat template, and one generate call that
    routes. Subclasses load the model and implement `has_adapter`, `stream`, `decide` and `reload`."""

    engine: str  # "transformers" or "llamacpp"
    tokenizer: Any
    max_model_len: int
    _intake: Intake | None = None

    @property
    @abstractmethod
    def has_adapter(self) -> bool: ...

    @abstractmethod
    def stream(self, requests: Sequence[GenerationRequest]) -> Iterator[StreamEvent]: ...

    @abstractmethod
    def decide(self, conversations: Sequence[list[dict[str, str]]], routing: str | None = None
               ) -> list[RouteDecision]:
        """The route of each conversation by the gate of `routing` (None: this model's), without generating."""

    @abstractmethod
    def score_tokens(self, sequences: Sequence[list[int]], decisions: Sequence[RouteDecision]) -> list[TokenScores]:
        """Each token sequence scored as it stands (no chat template added), on its decision's route, the
        sequences batched together (mixed routes included)."""

    def check_scorable(self, sequences: Sequence[list[int]], decisions: Sequence[RouteDecision]) -> None:
        if len(sequences) != len(decisions):
            raise PrismError(f"{len(sequences)} sequences but {len(decisions)} route decisions")
        for ids in sequences:
            if len(ids) < 2:
                raise PrismError("a scored sequence needs two tokens at least (the first one has no prediction)")
            self.check_length(len(ids), 0)
        for decision in decisions:
            if decision.route == "persona":
                self.check_persona_route(decision.persona)

    @abstractmethod
    def reload(self) -> ReloadResult:
        """Read the run's gates, thresholds and adapters again without dropping requests in flight."""

    @abstractmethod
    def submit(self, requests: Sequence[GenerationRequest],
               on_events: Sequence[Callable[[StreamEvent | BaseException], None]]) -> None:
        """Queue requests and return at once: each joins the backend's running batch at a decode step with room
        (continuous batching; the backend's own thread schedules), their routes decided together. `on_events[i]`
        gets request i's route, text deltas and completion, or the error that refused or ended it, from the
        decoding thread. Setting a request's `cancel` aborts it: it leaves the batch at the next step."""

    @abstractmethod
    def observe_steps(self, on_step: Callable[[int], None]) -> None:
        """Have `on_step` told, after each decode step, the number of sequences it decoded (0: none), in the
        decoding thread."""

    def generate_async(self, request: GenerationRequest, *, on_end: Callable[[RequestStream], None] | None = None,
                       deadline: float | None = None) -> RequestStream:
        """One request as an async stream of its events, on the backend's running batch (call it from the event
        loop; `async for event in stream`): its route, its text deltas, its completion, or the error that ended
        it. `abort(stream)` (or the request's cancel) stops it; past `deadline` (time.monotonic()) it is aborted
        and the stream raises RequestTimedOut; `on_end` is told once the engine is done with it."""
        return self.intake.open(request, on_end, deadline)

    @staticmethod
    def abort(stream: RequestStream) -> None:
        """Stop a request: a waiting one never starts, a running one leaves the batch at the next step."""
        stream.abort()

    @property
    def intake(self) -> Intake:
        """The thread that hands this model its async requests, with the last decode step's size (`running`)."""
        if self._intake is None:
            self._intake = Intake(self.submit, self.observe_steps)
        return self._intake

    def close(self) -> None:
        """Free what the backend holds outside Python's memory (llama.cpp's contexts) and its intake thread."""
        if self._intake is not None:
            self._intake.close()

    def check_persona_route(self, persona: str | None = None) -> None:
        if persona is not None:
            if persona not in self.personas:
                served = ", ".join(self.personas) or "none: serve a run bootstrapped with --routing kway"
                raise RequestError(f"this model has no k-way adapter for the persona {persona!r}; its personas: "
                                   f"{served}")
        elif not self.has_adapter:
            raise RequestError("this run has no adapter (its distill stage was skipped): the persona route is "
                               "unavailable")

    def prompt(self, messages: list[dict[str, str]], assistant_prefix: str = "") -> str:
        return conversation_prompt(self.tokenizer, messages) + assistant_prefix

    def gate_prompt(self, messages: list[dict[str, str]]) -> str:
        return gate_prompt(self.tokenizer, messages)

    def prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        return len(encode(self.tokenizer, self.prompt(messages)))

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens + max_tokens > self.max_model_len:
            raise ContextLengthError(
                f"this model's maximum context length is {self.max_model_len} tokens, but the request has "
                f"{prompt_tokens} prompt tokens and asks for up to {max_tokens} completion tokens: shorten the "
                "messages or lower max_tokens")

    # -- generation ------------------------------------------------------------------------------------

    def generate(self, messages: list[dict[str, str]] | str, *, route: str = ROUTES[0], persona: str | None = None,
                 **sampling: Any) -> Completion:
        """One reply: text, the route taken and the gate probability. `messages` may be a plain string;
        `persona` names a k-way adapter for route "persona"; `sampling` are SamplingParams' fields (max_tokens,
        temperature, top_p, seed, stop, ...), greedy by default."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if sampling.get("stop") is None:
            sampling.pop("stop", None)
        params = with_options(SamplingParams, None, **sampling)
        return self.generate_batch([GenerationRequest(messages, route, params, persona=persona)])[0]

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Replies to many requests in one batch (routes may differ per request)."""
        completions: list[Completion | None] = [None] * len(requests)
        for event in self.stream(requests):
            if event.completion is not None:
                completions[event.index] = event.completion
        return completions  # type: ignore[return-value]


def decode_step(index: int, request: GenerationRequest, decision: RouteDecision | None, text: TextStream,
                logprobs: list[dict[str, Any]] | None, token: int, logits: torch.Tensor, eos_ids: set[int],
                prompt_tokens: int) -> list[StreamEvent]:
    """Take one sampled token into a request's reply: its text delta, and its completion when the token
    ends it (end of text, a stop string, max_tokens, or a cancelled request). Shared by both engines."""
    events, reason = [], None
    if request.cancel is not None and request.cancel.is_set():
        reason = "cancelled"
    elif token in eos_ids and not request.params.ignore_eos:
        reason = "stop"
    else:
        if logprobs is not None:
            logprobs.append(token_logprobs(logits, token, request.params.logprobs, text.tokenizer))
        delta = text.add(token)
        if delta:
            events.append(StreamEvent(index, delta=delta))
        if text.stopped:
            reason = "stop"
        elif len(text.tokens) >= request.params.max_tokens:
            reason = "length"
    if reason is not None:
        assert decision is not None
        completion = Completion(text.text, decision.route, decision.gate_probability, decision.forced, prompt_tokens,
                                len(text.tokens), reason, logprobs, decision.persona)
        events.append(StreamEvent(index, delta=text.flush(), completion=completion))
    return events


def gate_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The gate's input: the last user turn alone in the base chat template, as in training."""
    return chat_prompt(tokenizer, messages[-1]["content"])
