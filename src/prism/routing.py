"""Gated inference: the base model, the run's LoRA adapter and its gate behind one generate call.

Routing costs one small MLP per request. Block 0 carries no LoRA, so its output is the same on both
routes: the prefill runs the embeddings and block 0 once, a hook on block 0 evaluates the gate on that
hidden state, and blocks 1..N-1 then run each row with or without the adapter. Rows of both routes
share one batch through PEFT's mixed-batch LoRA forward (per-row adapter names, `__base__` = none);
a batch of one route takes PEFT's plain path instead. The adapter weights never move.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from prism.decoding import SamplingParams, TextStream, sample_token, token_logprobs
from prism.engine import block0_features, pad_batch
from prism.errors import PrismError
from prism.gate import Gate, save_threshold
from prism.models import (
    LoadedModel,
    cache_argument,
    chat_prompt,
    conversation_prompt,
    decoder_layers,
    encode,
    gate_feature_model,
    load_block0,
    load_model,
    output_cache,
    stop_token_ids,
)
from prism.runs import RunDir

log = logging.getLogger("prism")
ROUTES = ("auto", "base", "persona")
ADAPTER = "persona"
NO_ADAPTER = "__base__"  # PEFT's name for "this row uses no adapter" in a mixed batch


class ContextLengthError(PrismError):
    pass


@dataclass
class GenerationRequest:
    messages: list[dict[str, str]]
    route: str = "auto"
    params: SamplingParams = field(default_factory=SamplingParams)
    cancel: threading.Event | None = None  # set it to end this request early (client gone, Ctrl-C)
    assistant_prefix: str = ""  # the reply starts with this text (scoring and judging prompts)

    def __post_init__(self) -> None:
        if self.route not in ROUTES:
            raise PrismError(f"route must be one of {', '.join(ROUTES)}, got {self.route!r}")


@dataclass
class RouteDecision:
    route: str  # "base" or "persona"
    gate_probability: float | None  # the gate's P(persona); None when the caller forced the route
    forced: bool


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StreamEvent:
    index: int  # position of the request in the batch
    delta: str = ""
    decision: RouteDecision | None = None  # once per request, before any of its text
    completion: Completion | None = None  # once per request, when it is finished


def _decision(probability: float, threshold: float) -> RouteDecision:
    return RouteDecision("persona" if probability >= threshold else "base", probability, forced=False)


class GatedModel(ABC):
    """What both engines share: a gate, a tokenizer for the chat template, and one generate call that
    routes. Subclasses load the model and implement `has_adapter`, `stream` and `decide`."""

    engine: str  # "transformers" or "llamacpp"
    gate: Gate
    tokenizer: Any
    run_path: Path | None
    max_model_len: int

    @property
    @abstractmethod
    def has_adapter(self) -> bool: ...

    @abstractmethod
    def stream(self, requests: Sequence[GenerationRequest]) -> Iterator[StreamEvent]: ...

    @abstractmethod
    def decide(self, conversations: Sequence[list[dict[str, str]]]) -> list[RouteDecision]: ...

    # -- routing ---------------------------------------------------------------------------------------

    @property
    def threshold(self) -> float:
        return self.gate.config.threshold

    def set_threshold(self, value: float, save: bool = False) -> None:
        """Route to the adapter when P(persona) >= value; `save` writes it into the run's gate config."""
        self.gate.config.threshold = _check_threshold(value)
        if save:
            if self.run_path is None:
                raise PrismError("this model was not loaded from a run directory: nothing to save the threshold in")
            save_threshold(self.run_path / "gate", value)

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

    def generate(self, messages: list[dict[str, str]] | str, *, route: str = "auto", max_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop: list[str] | None = None) -> Completion:
        """One reply: text, the route taken and the gate probability. `messages` may be a plain string."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                stop=list(stop or []))
        return self.generate_batch([GenerationRequest(messages, route, params)])[0]

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Replies to many requests in one batch (routes may differ per request)."""
        completions: list[Completion | None] = [None] * len(requests)
        for event in self.stream(requests):
            if event.completion is not None:
                completions[event.index] = event.completion
        return completions  # type: ignore[return-value]


class PrismModel(GatedModel):
    """A bootstrapped run as one model: `generate(messages)` routes, generates and says which route it took."""

    engine = "transformers"

    def __init__(self, lm: LoadedModel, gate: Gate, adapter: PeftModel | None = None, *,
                 run_path: Path | None = None, max_model_len: int | None = None,
                 gate_lm: LoadedModel | None = None):
        self.lm = lm
        # the gate's float32 block 0: `lm` itself when it runs in float32 (then routing shares the prefill),
        # else a float32 copy of its embeddings and block 0 (see gate_feature_model)
        self.gate_lm = gate_lm or lm
        self.tokenizer = lm.tokenizer
        self.gate = gate
        self.adapter = adapter
        self.run_path = run_path
        context = getattr(lm.model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(max_model_len or context, context)
        self.eos_ids = stop_token_ids(lm)
        self._cache_argument = cache_argument(lm.model)
        self._row_adapters: list[str] | None = None  # per-row adapter names, read by every LoRA layer
        self._adapter_enabled = True
        self._lock = threading.Lock()
        _check_adapter_for_gate(gate, adapter is not None)
        if adapter is not None:
            for module in lm.model.modules():
                if isinstance(module, LoraLayer):
                    module.register_forward_pre_hook(self._inject_row_adapters, with_kwargs=True)

    @classmethod
    def from_run(cls, run_dir: str | Path, *, device: str = "auto", threshold: float | None = None,
                 trust_remote_code: bool = False, max_model_len: int | None = None) -> PrismModel:
        """Load the base model, the adapter and the gate of a finished bootstrap run, once."""
        run, manifest, config = open_finished_run(run_dir, trust_remote_code)
        lm = load_model(config["model"], device=device, trust_remote_code=trust_remote_code, safetensors_only=True)
        recorded = manifest.get("model") or {}
        for key in ("num_layers", "hidden_size", "parameters"):
            if recorded.get(key) is not None and recorded[key] != lm.identity.get(key):
                raise PrismError(f"the model {config['model']!r} now has {key}={lm.identity.get(key)} but the run "
                                 f"was trained on {key}={recorded[key]}: the adapter and gate do not fit it")
        gate = load_gate(run, threshold)
        adapter = None
        adapter_dir = run.path / "adapter"
        if (adapter_dir / "adapter_config.json").is_file():
            if not (adapter_dir / "adapter_model.safetensors").is_file():
                raise PrismError(f"{adapter_dir} holds no adapter_model.safetensors; PRISM loads no pickled weights")
            adapter = PeftModel.from_pretrained(lm.model, str(adapter_dir), adapter_name=ADAPTER).eval()
        return cls(lm, gate, adapter, run_path=run.path, max_model_len=max_model_len,
                   gate_lm=gate_feature_model(lm, config["model"], trust_remote_code))

    @property
    def has_adapter(self) -> bool:
        return self.adapter is not None

    def decide(self, conversations: Sequence[list[dict[str, str]]]) -> list[RouteDecision]:
        """The gate's route for each conversation, without generating (embeddings and block 0 only)."""
        return gate_decisions(self.gate_lm, self.gate, conversations)

    def _apply_routes(self, persona_rows: list[bool] | None) -> None:
        """Set how the LoRA layers treat the rows of the next forward pass (None: adapter on, PEFT's
        default). A uniform batch takes PEFT's plain paths, adapter off or on for every row; only a mixed
        batch pays for per-row adapter names (gather and scatter in every LoRA layer)."""
        if self.adapter is None:
            return
        enable = persona_rows is None or any(persona_rows)
        if enable != self._adapter_enabled:
            if enable:
                self.adapter.base_model.enable_adapter_layers()
            else:
                self.adapter.base_model.disable_adapter_layers()
            self._adapter_enabled = enable
        mixed = persona_rows is not None and len(set(persona_rows)) > 1
        self._row_adapters = [ADAPTER if p else NO_ADAPTER for p in persona_rows] if mixed else None

    def _inject_row_adapters(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._row_adapters is None:
            return None
        kwargs["adapter_names"] = self._row_adapters
        return args, kwargs

    @torch.no_grad()
    def stream(self, requests: Sequence[GenerationRequest]) -> Iterator[StreamEvent]:
        """Generate for a batch, yielding each request's route, then its text deltas, then its completion."""
        if not requests:
            return
        with self._lock:
            try:
                yield from self._stream(list(requests))
            finally:
                self._apply_routes(None)

    @torch.no_grad()
    def next_token_logprobs(self, requests: Sequence[GenerationRequest]) -> tuple[torch.Tensor, list[RouteDecision]]:
        """Log-probabilities of the token after each prompt (n, vocab), each on its request's route:
        one routed prefill, no generation (multiple-choice scoring, verdicts)."""
        with self._lock:
            try:
                out, decisions, *_ = self._prefill(list(requests), [1] * len(requests), use_cache=False)
            finally:
                self._apply_routes(None)
        return torch.log_softmax(out.logits[:, -1].float().cpu(), dim=-1), decisions

    @torch.no_grad()
    def continuation_logprobs(self, requests: Sequence[GenerationRequest], continuations: Sequence[str]
                              ) -> tuple[list[tuple[float, int]], list[RouteDecision]]:
        """(sum of log-probabilities, token count) of each continuation right after its request's prompt,
        each on its request's route (cloze scoring)."""
        tokenizer = self.lm.tokenizer
        extended, counts = [], []
        for request, continuation in zip(requests, continuations):
            prompt = self.prompt(request.messages, request.assistant_prefix)
            counts.append(max(1, len(encode(tokenizer, prompt + continuation)) - len(encode(tokenizer, prompt))))
            extended.append(replace(request, assistant_prefix=request.assistant_prefix + continuation))
        keep = max(counts) + 1
        with self._lock:
            try:
                out, decisions, encoded, *_ = self._prefill(extended, [1] * len(extended), use_cache=False,
                                                            logits_to_keep=keep)
            finally:
                self._apply_routes(None)
        logprobs = torch.log_softmax(out.logits.float().cpu(), dim=-1)  # left padded: rows end together
        values = []
        for row, (ids, count) in enumerate(zip(encoded, counts)):
            predicted = logprobs[row, keep - count - 1 : keep - 1]
            values.append((float(predicted.gather(1, torch.tensor(ids[-count:])[:, None]).sum()), count))
        return values, decisions

    def _prefill(self, requests: list[GenerationRequest], max_tokens: list[int], use_cache: bool = True,
                 logits_to_keep: int = 1) -> tuple:
        lm, tokenizer = self.lm, self.lm.tokenizer
        prompts = [self.prompt(r.messages, r.assistant_prefix) for r in requests]
        encoded = [encode(tokenizer, p) for p in prompts]
        for ids, wanted in zip(encoded, max_tokens):
            self.check_length(len(ids), wanted)
        if self.adapter is None and any(r.route == "persona" for r in requests):
            raise PrismError("this run has no adapter (its distill stage was skipped): the persona route is "
                             "unavailable")

        decisions = self._early_decisions(requests, prompts)
        in_prefill = [i for i, d in enumerate(decisions) if d is None]
        persona_rows = [d is not None and d.route == "persona" for d in decisions]
        self._apply_routes(persona_rows)
        ids, mask = pad_batch(encoded, tokenizer.pad_token_id, side="left")
        positions = (mask.cumsum(1) - 1).clamp(min=0)

        def gate_on_block0(_module: torch.nn.Module, _inputs: object, output: object) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            # left padding puts every prompt's last token at the end
            probabilities = self.gate.persona_probability(hidden[in_prefill, -1].float().cpu()).tolist()
            for i, probability in zip(in_prefill, probabilities):
                decisions[i] = _decision(probability, self.threshold)
                persona_rows[i] = decisions[i].route == "persona"
            self._apply_routes(persona_rows)  # before blocks 1..N-1 run

        handle = decoder_layers(lm.model)[0].register_forward_hook(gate_on_block0) if in_prefill else None
        try:
            out = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                           position_ids=positions.to(lm.device), use_cache=use_cache, logits_to_keep=logits_to_keep)
        finally:
            if handle is not None:
                handle.remove()
        return out, decisions, encoded, mask, positions, persona_rows

    def _stream(self, requests: list[GenerationRequest]) -> Iterator[StreamEvent]:
        lm, tokenizer = self.lm, self.lm.tokenizer
        out, decisions, encoded, mask, positions, persona_rows = self._prefill(
            requests, [r.params.max_tokens for r in requests])
        for i, decision in enumerate(decisions):
            yield StreamEvent(i, decision=decision)

        streams = [TextStream(tokenizer, r.params.stop) for r in requests]
        logprobs: list[list[dict[str, Any]] | None] = [[] if r.params.logprobs is not None else None for r in requests]
        generators = [r.params.generator() for r in requests]
        active = list(range(len(requests)))  # request index of each row still in the batch
        cache, logits = output_cache(out), out.logits[:, -1]
        last_position = positions[:, -1]
        while True:
            next_tokens, keep = [], []
            for row, i in enumerate(active):
                request, text = requests[i], streams[i]
                token = sample_token(logits[row], request.params, generators[i])
                events = decode_step(i, request, decisions[i], text, logprobs[i], token, logits[row], self.eos_ids,
                                     len(encoded[i]))
                yield from events
                if not events or events[-1].completion is None:
                    next_tokens.append(token)
                    keep.append(row)
            if not keep:
                return
            if len(keep) < len(active):
                index = torch.tensor(keep)
                cache.batch_select_indices(index.to(lm.device))
                mask, last_position = mask[index], last_position[index]
                active = [active[row] for row in keep]
                persona_rows = [persona_rows[row] for row in keep]
                self._apply_routes(persona_rows)
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype)], dim=1)
            last_position = last_position + 1
            out = lm.model(input_ids=torch.tensor(next_tokens, device=lm.device)[:, None],
                           attention_mask=mask.to(lm.device), position_ids=last_position[:, None].to(lm.device),
                           use_cache=True, **{self._cache_argument: cache})
            cache, logits = output_cache(out), out.logits[:, -1]

    def _early_decisions(self, requests: list[GenerationRequest], prompts: list[str]) -> list[RouteDecision | None]:
        """Routes known before the prefill: forced ones, a constant gate, and conversations whose prompt is
        not the gate's prompt (multi-turn or a custom system message), or every one when the model is not
        float32: those get a float32 block-0-only pass over the gate prompt. None = decided by the gate
        during this batch's own prefill."""
        decisions: list[RouteDecision | None] = []
        separate: dict[int, str] = {}  # row -> its gate prompt
        for i, (request, prompt) in enumerate(zip(requests, prompts)):
            if request.route != "auto":
                decisions.append(RouteDecision(request.route, None, forced=True))
            elif self.gate.config.constant_route is not None:
                decisions.append(_decision(float(self.gate.config.constant_route), self.threshold))
            else:
                decisions.append(None)
                gate_prompt = self.gate_prompt(request.messages)
                if prompt != gate_prompt or self.gate_lm is not self.lm:  # includes any assistant prefix
                    separate[i] = gate_prompt
        if separate:
            for i, decision in zip(separate, prompt_decisions(self.gate_lm, self.gate, list(separate.values()))):
                decisions[i] = decision
        return decisions


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
                                len(text.tokens), reason, logprobs)
        events.append(StreamEvent(index, delta=text.flush(), completion=completion))
    return events


def load_gated_model(run_dir: str | Path, *, engine: str = "auto", gguf: str | Path | None = None,
                     threshold: float | None = None, device: str = "auto", max_model_len: int | None = None,
                     threads: int | None = None, persona_model: str = "auto",
                     trust_remote_code: bool = False) -> GatedModel:
    """A finished run on the engine asked for: 'auto' takes llama.cpp when the run's model is GGUF (the
    embedded default, `gguf` given, or a base GGUF recorded by `prism export gguf`) and llama-cpp-python is
    installed, else transformers (PrismModel)."""
    from prism.gguf_export import recorded_base_gguf
    from prism.llamacpp import LlamaCppModel, resolve_engine

    run, _manifest, config = open_finished_run(run_dir, trust_remote_code)
    gguf = gguf or recorded_base_gguf(run.path)
    if resolve_engine(engine, config["model"], None if gguf is None else str(gguf)) == "llamacpp":
        if device not in ("auto", "cpu"):
            log.warning("the llamacpp engine runs on the CPU here; --device %s is ignored", device)
        return LlamaCppModel.from_run(run_dir, gguf=gguf, threshold=threshold, max_model_len=max_model_len,
                                      n_threads=threads, persona=persona_model, trust_remote_code=trust_remote_code)
    return PrismModel.from_run(run_dir, device=device, threshold=threshold, trust_remote_code=trust_remote_code,
                               max_model_len=max_model_len)


def open_finished_run(run_dir: str | Path, trust_remote_code: bool) -> tuple[RunDir, dict[str, Any], dict[str, Any]]:
    """(run, manifest, bootstrap config) of a run whose gate and distill stages are finished."""
    run = RunDir(run_dir)
    if not run.exists():
        raise PrismError(f"{run.path} is not a PRISM run directory (no manifest.json): "
                         f"run `prism bootstrap --out {run.path}` first")
    manifest = run.manifest()
    stages = manifest.get("stages", {})
    for stage in ("gate", "distill"):
        if stages.get(stage, {}).get("status") not in ("done", "skipped"):
            raise PrismError(f"{run.path}: the {stage} stage has not finished; run `prism bootstrap --out "
                             f"{run.path}` with the run's settings to complete it")
    config = manifest["config"]
    if config.get("trust_remote_code") and not trust_remote_code:
        raise PrismError(f"{run.path} was made with trust_remote_code: pass --trust-remote-code to load "
                         "its model code (only if you trust it)")
    return run, manifest, config


def load_gate(run: RunDir, threshold: float | None) -> Gate:
    gate = Gate.load(run.path / "gate")
    if threshold is not None:
        gate.config.threshold = _check_threshold(threshold)
    return gate


def gate_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The gate's input: the last user turn alone in the base chat template, as in training."""
    return chat_prompt(tokenizer, messages[-1]["content"])


def gate_decisions(lm: LoadedModel, gate: Gate, conversations: Sequence[list[dict[str, str]]]) -> list[RouteDecision]:
    """The gate's route for each conversation: embeddings and block 0 of `lm`, then the gate."""
    if gate.config.constant_route is not None:
        return [_decision(float(gate.config.constant_route), gate.config.threshold) for _ in conversations]
    return prompt_decisions(lm, gate, [gate_prompt(lm.tokenizer, m) for m in conversations])


def prompt_decisions(lm: LoadedModel, gate: Gate, gate_prompts: list[str]) -> list[RouteDecision]:
    """The gate's route for each already-rendered gate prompt."""
    features = block0_features(lm, gate_prompts)
    return [_decision(p, gate.config.threshold) for p in gate.persona_probability(features).tolist()]


class Router:
    """The gate alone, for a sidecar in front of another server: the tokenizer, the embeddings and decoder
    block 0 of the base model (the rest is never loaded) and the gate. Decides exactly as PrismModel does."""

    def __init__(self, lm: LoadedModel, gate: Gate, *, run_path: Path, has_adapter: bool):
        self.lm, self.gate, self.run_path, self.has_adapter = lm, gate, run_path, has_adapter
        self._lock = threading.Lock()

    @classmethod
    def from_run(cls, run_dir: str | Path, *, device: str = "auto", threshold: float | None = None,
                 trust_remote_code: bool = False) -> Router:
        run, _manifest, config = open_finished_run(run_dir, trust_remote_code)
        lm = load_block0(config["model"], device=device, trust_remote_code=trust_remote_code)
        has_adapter = (run.path / "adapter" / "adapter_config.json").is_file()
        gate = load_gate(run, threshold)
        _check_adapter_for_gate(gate, has_adapter)
        return cls(lm, gate, run_path=run.path, has_adapter=has_adapter)

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


def _check_adapter_for_gate(gate: Gate, has_adapter: bool) -> None:
    if not has_adapter and gate.config.constant_route != 0:
        raise PrismError("the gate can route to the adapter but the run has no adapter: re-run the distill stage")


def _check_threshold(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise PrismError(f"the gate threshold is a probability: pass a value in [0, 1], got {value}")
    return value
