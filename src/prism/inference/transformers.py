"""PrismModel: the base model, the run's LoRA adapter and its gate behind one generate call (transformers).

Routing costs one small MLP per request. Block 0 carries no LoRA, so its output is the same on both
routes: the prefill runs the embeddings and block 0 once, a hook on block 0 evaluates the gate on that
hidden state, and blocks 1..N-1 then run each row with or without the adapter. Rows of both routes
share one batch through PEFT's mixed-batch LoRA forward (per-row adapter names, `__base__` = none);
a batch of one route takes PEFT's plain path instead. The adapter weights never move.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from prism.errors import PrismError
from prism.inference.artifacts import (
    adapter_file,
    check_adapter_for_gate,
    check_adapter_unchanged,
    check_model_identity,
    load_gate,
    open_finished_run,
)
from prism.inference.base import GatedModel, GenerationRequest, RouteDecision, StreamEvent, decision_at, decode_step
from prism.inference.router import gate_decisions, prompt_decisions
from prism.lm.batching import pad_batch
from prism.lm.decoding import TextStream, sample_tokens
from prism.lm.gate import Gate
from prism.lm.models import (
    LoadedModel,
    cache_argument,
    decoder_layers,
    encode,
    gate_feature_model,
    load_model,
    output_cache,
    stop_token_ids,
)

ADAPTER = "persona"
NO_ADAPTER = "__base__"  # PEFT's name for "this row uses no adapter" in a mixed batch


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
        self.adapter_name = ADAPTER  # a reload loads the new adapter under a new name, then drops the old one
        self.reloads = 0
        self.run_path = run_path
        context = getattr(lm.model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(max_model_len or context, context)
        self.eos_ids = stop_token_ids(lm)
        self._cache_argument = cache_argument(lm.model)
        self._row_adapters: list[str] | None = None  # per-row adapter names, read by every LoRA layer
        self._adapter_enabled = True
        self._lock = threading.Lock()
        check_adapter_for_gate(gate, adapter is not None)
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
        check_model_identity(manifest, config, lm)
        gate = load_gate(run, threshold)
        adapter = None
        if adapter_file(run.path) is not None:
            # autocast off: the LoRA weights take the base layers' dtype (bf16 on a GPU) instead of float32, so no
            # LoRA layer casts its input and output at every step
            adapter = PeftModel.from_pretrained(lm.model, str(run.path / "adapter"), adapter_name=ADAPTER,
                                                autocast_adapter_dtype=False).eval()
        model = cls(lm, gate, adapter, run_path=run.path, max_model_len=max_model_len,
                    gate_lm=gate_feature_model(lm, config["model"], trust_remote_code))
        model.trust_remote_code = trust_remote_code
        return model

    @property
    def has_adapter(self) -> bool:
        return self.adapter is not None

    def decide(self, conversations: Sequence[list[dict[str, str]]]) -> list[RouteDecision]:
        """The gate's route for each conversation, without generating (embeddings and block 0 only). It waits
        for a batch being generated: the prefill's gate hook sits on the same block 0."""
        with self._lock:
            return gate_decisions(self.gate_lm, self.gate, conversations)

    def reload(self) -> dict[str, Any]:
        """Read the run's gate, threshold and adapter again, between batches: a batch being generated
        finishes on the old adapter, the next one runs on the new. A reload that fails leaves the old run
        serving. The base model stays as loaded (a run made on another model needs a restart)."""
        if self.run_path is None:
            raise PrismError("this model was not loaded from a run directory: there is nothing to reload")
        with self._lock:
            run, manifest, config = open_finished_run(self.run_path, self.trust_remote_code)
            check_model_identity(manifest, config, self.lm)
            gate = load_gate(run, None)
            has_adapter = adapter_file(run.path) is not None
            check_adapter_for_gate(gate, has_adapter)
            check_adapter_unchanged(run.path, self.adapter is not None, has_adapter)
            if self.adapter is not None:
                self._swap_adapter(run.path / "adapter")
            self.gate = gate
            self.reloads += 1
        return {"threshold": self.threshold, "adapter": self.adapter is not None, "reloads": self.reloads}

    def _swap_adapter(self, adapter_dir: Path) -> None:
        assert self.adapter is not None
        new_name = f"{ADAPTER}-{self.reloads + 1}"
        try:
            self.adapter.load_adapter(str(adapter_dir), adapter_name=new_name, autocast_adapter_dtype=False)
        except Exception as exc:  # shapes that do not fit, a corrupt file: PEFT raises several kinds
            if new_name in self.adapter.peft_config:
                self.adapter.delete_adapter(new_name)
            raise PrismError(f"the adapter in {adapter_dir} does not fit the base model ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:300]}); the old adapter keeps serving") from None
        old_name, self.adapter_name = self.adapter_name, new_name
        self.adapter.set_adapter(new_name)
        self.adapter.delete_adapter(old_name)
        self.adapter.eval()

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
        self._row_adapters = [self.adapter_name if p else NO_ADAPTER for p in persona_rows] if mixed else None

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
        if any(r.route == "persona" for r in requests):
            self.check_persona_route()

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
                decisions[i] = decision_at(probability, self.threshold)
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
            sampled = sample_tokens(logits, [requests[i].params for i in active], [generators[i] for i in active])
            for row, (i, token) in enumerate(zip(active, sampled)):
                request, text = requests[i], streams[i]
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
                decisions.append(decision_at(float(self.gate.config.constant_route), self.threshold))
            else:
                decisions.append(None)
                gate_prompt = self.gate_prompt(request.messages)
                if prompt != gate_prompt or self.gate_lm is not self.lm:  # includes any assistant prefix
                    separate[i] = gate_prompt
        if separate:
            for i, decision in zip(separate, prompt_decisions(self.gate_lm, self.gate, list(separate.values()))):
                decisions[i] = decision
        return decisions

