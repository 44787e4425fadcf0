"""PrismModel: the base model, the run's LoRA adapter(s) and its gate behind one generate call (transformers).

Routing costs one small MLP per request. Block 0 carries no LoRA, so its output is the same on every
route: the prefill runs the embeddings and block 0 once, a hook on block 0 evaluates the gate on that
hidden state, and blocks 1..N-1 then run each row with its route's adapter or none. Rows of different
routes share one batch through PEFT's mixed-batch LoRA forward (per-row adapter names, `__base__` = none);
a batch of one route takes PEFT's plain path instead. A k-way run's adapters (one per persona) are named
adapters of the same PeftModel, beside the binary one. The adapter weights never move.
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
    check_adapter_for_gate,
    check_adapter_unchanged,
    check_model_identity,
    gate_personas,
    load_gate,
    open_finished_run,
    resolve_routing,
    run_adapter_dirs,
)
from prism.inference.base import (
    GatedModel,
    GenerationRequest,
    RouteDecision,
    StreamEvent,
    adapter_key,
    decode_step,
    forced_decision,
    gate_decisions_on,
)
from prism.inference.router import gate_decisions
from prism.lm.batching import block0_features, pad_batch
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

ADAPTER = adapter_key(None)  # the binary adapter
NO_ADAPTER = "__base__"  # PEFT's name for "this row uses no adapter" in a mixed batch


class PrismModel(GatedModel):
    """A bootstrapped run as one model: `generate(messages)` routes, generates and says which route it took."""

    engine = "transformers"

    def __init__(self, lm: LoadedModel, gate: Gate, adapter: PeftModel | None = None, *,
                 run_path: Path | None = None, max_model_len: int | None = None,
                 gate_lm: LoadedModel | None = None, gates: dict[str, Gate] | None = None, routing: str = "binary"):
        self.lm = lm
        # the gate's float32 block 0: `lm` itself when it runs in float32 (then routing shares the prefill),
        # else a float32 copy of its embeddings and block 0 (see gate_feature_model)
        self.gate_lm = gate_lm or lm
        self.tokenizer = lm.tokenizer
        # every gate loaded, by routing ("binary", and "kway" for a k-way run): a request may name the one that
        # decides it (the eval compares them); `gate` is this model's own
        self.gates = gates or {routing: gate}
        self.routing = routing
        self.gate = gate
        self.adapter = adapter
        # adapter key ("persona", "persona-<k-way persona>") -> its name in the PeftModel; a reload loads the new
        # adapters under new names, then drops the old ones
        self.adapter_names = {name: name for name in adapter.peft_config} if adapter is not None else {}
        unnamed = [n for n in self.adapter_names if n != ADAPTER and not n.startswith(ADAPTER + "-")]
        if unnamed:
            raise PrismError(f"the PeftModel's adapters {unnamed} need PRISM's names: load the binary adapter with "
                             f"adapter_name={ADAPTER!r} and a k-way persona's with adapter_name='{ADAPTER}-<persona>'")
        self._active = next(iter(self.adapter_names.values()), None)  # the adapter PEFT's plain path runs
        self.reloads = 0
        self.run_path = run_path
        context = getattr(lm.model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(max_model_len or context, context)
        self.eos_ids = stop_token_ids(lm)
        self._cache_argument = cache_argument(lm.model)
        self._row_adapters: list[str] | None = None  # per-row adapter names, read by every LoRA layer
        self._adapter_enabled = True
        self._lock = threading.Lock()
        check_adapter_for_gate(self.gates.get("binary", gate), self.has_adapter)
        if adapter is not None:
            for module in lm.model.modules():
                if isinstance(module, LoraLayer):
                    module.register_forward_pre_hook(self._inject_row_adapters, with_kwargs=True)

    @classmethod
    def from_run(cls, run_dir: str | Path, *, device: str = "auto", threshold: float | None = None,
                 trust_remote_code: bool = False, max_model_len: int | None = None,
                 routing: str = "auto") -> PrismModel:
        """Load the base model, the adapter(s) and the gate(s) of a finished bootstrap run, once. `routing`:
        'binary', 'kway' (a run bootstrapped with --routing kway: its gate over base and one adapter per
        persona, and the binary gate and adapter beside them) or 'auto' (k-way when the run has it)."""
        run, manifest, config = open_finished_run(run_dir, trust_remote_code)
        routing = resolve_routing(run.path, routing)
        lm = load_model(config["model"], device=device, trust_remote_code=trust_remote_code, safetensors_only=True)
        check_model_identity(manifest, config, lm)
        gates = {name: load_gate(run, threshold if name == routing else None, name)
                 for name in ("binary", routing)}
        adapter = None
        for key, directory in run_adapter_dirs(run.path, gates).items():
            # autocast off: the LoRA weights take the base layers' dtype (bf16 on a GPU) instead of float32, so no
            # LoRA layer casts its input and output at every step
            if adapter is None:
                adapter = PeftModel.from_pretrained(lm.model, str(directory), adapter_name=key,
                                                    autocast_adapter_dtype=False).eval()
            else:
                adapter.load_adapter(str(directory), adapter_name=key, autocast_adapter_dtype=False)
        model = cls(lm, gates[routing], adapter, run_path=run.path, max_model_len=max_model_len,
                    gate_lm=gate_feature_model(lm, config["model"], trust_remote_code), gates=gates, routing=routing)
        model.trust_remote_code = trust_remote_code
        return model

    @property
    def has_adapter(self) -> bool:
        return ADAPTER in self.adapter_names

    @property
    def personas(self) -> list[str]:  # type: ignore[override]
        return [key.removeprefix(ADAPTER + "-") for key in self.adapter_names if key != ADAPTER]

    def gate_for(self, request: GenerationRequest) -> Gate:
        """The gate that decides `request` when its route is auto: the one it names, else this model's."""
        routing = request.routing or self.routing
        if routing not in self.gates:
            raise PrismError(f"this model has no {routing} gate (loaded: {', '.join(self.gates)}); load a run "
                             "bootstrapped with --routing kway with routing 'kway' or 'auto'")
        return self.gates[routing]

    def decide(self, conversations: Sequence[list[dict[str, str]]]) -> list[RouteDecision]:
        """The gate's route for each conversation, without generating (embeddings and block 0 only). It waits
        for a batch being generated: the prefill's gate hook sits on the same block 0."""
        with self._lock:
            return gate_decisions(self.gate_lm, self.gate, conversations)

    def reload(self) -> dict[str, Any]:
        """Read the run's gates, threshold and adapters again, between batches: a batch being generated
        finishes on the old adapters, the next one runs on the new. A reload that fails leaves the old run
        serving. The base model stays as loaded (a run made on another model needs a restart)."""
        if self.run_path is None:
            raise PrismError("this model was not loaded from a run directory: there is nothing to reload")
        with self._lock:
            run, manifest, config = open_finished_run(self.run_path, self.trust_remote_code)
            check_model_identity(manifest, config, self.lm)
            gates = {name: load_gate(run, None, name) for name in self.gates}
            dirs = run_adapter_dirs(run.path, gates)
            check_adapter_unchanged(run.path, self.has_adapter, ADAPTER in dirs, self.personas,
                                    gate_personas(gates["kway"]) if "kway" in gates else [])
            if dirs:
                self._swap_adapters(dirs)
            self.gates, self.gate = gates, gates[self.routing]
            self.reloads += 1
        return {"threshold": self.threshold, "adapter": self.has_adapter, "reloads": self.reloads,
                **({"personas": self.personas} if self.personas else {})}

    def _swap_adapters(self, dirs: dict[str, Path]) -> None:
        """Load every adapter again under a new name, then drop the old ones; any failure drops the new ones."""
        assert self.adapter is not None
        loaded: dict[str, str] = {}
        for key, directory in dirs.items():
            name = f"{key}-{self.reloads + 1}"
            try:
                self.adapter.load_adapter(str(directory), adapter_name=name, autocast_adapter_dtype=False)
            except Exception as exc:  # shapes that do not fit, a corrupt file: PEFT raises several kinds
                for new in [*loaded.values(), name]:  # never active: dropping them leaves the serving ones as they are
                    if new in self.adapter.peft_config:
                        self.adapter.delete_adapter(new)
                raise PrismError(f"the adapter in {directory} does not fit the base model ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:300]}); the old adapter keeps serving") from None
            loaded[key] = name
        old, self.adapter_names = self.adapter_names, loaded
        self._active = None
        self._activate(next(iter(loaded.values())))
        for name in old.values():
            self.adapter.delete_adapter(name)
        self.adapter.eval()

    def _activate(self, name: str) -> None:
        """Make `name` the adapter PEFT's plain (one-adapter) path runs."""
        assert self.adapter is not None
        if name != self._active:
            self.adapter.base_model.set_adapter(name, inference_mode=True)
            self._active = name

    def _row_adapter(self, decision: RouteDecision | None) -> str | None:
        """The PEFT adapter name a row runs with (None: none, the base route or not decided yet)."""
        return None if decision is None or decision.adapter is None else self.adapter_names[decision.adapter]

    def _apply_routes(self, row_adapters: list[str | None] | None) -> None:
        """Set how the LoRA layers treat the rows of the next forward pass (None: adapters on, PEFT's
        default). A batch of one route takes PEFT's plain paths, adapters off, or one adapter on for every
        row; only a mixed batch pays for per-row adapter names (gather and scatter in every LoRA layer)."""
        if self.adapter is None:
            return
        enable = row_adapters is None or any(name is not None for name in row_adapters)
        if enable != self._adapter_enabled:
            if enable:
                self.adapter.base_model.enable_adapter_layers()
            else:
                self.adapter.base_model.disable_adapter_layers()
            self._adapter_enabled = enable
        mixed = row_adapters is not None and len(set(row_adapters)) > 1
        if row_adapters and enable and not mixed:
            self._activate(row_adapters[0])  # type: ignore[arg-type]
        self._row_adapters = [name or NO_ADAPTER for name in row_adapters] if mixed else None  # type: ignore[union-attr]

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
        for request in requests:
            if request.route == "persona":
                self.check_persona_route(request.persona)

        decisions = self._early_decisions(requests, prompts)
        in_prefill = [i for i, d in enumerate(decisions) if d is None]
        rows = [self._row_adapter(d) for d in decisions]
        self._apply_routes(rows)
        ids, mask = pad_batch(encoded, tokenizer.pad_token_id, side="left")
        positions = (mask.cumsum(1) - 1).clamp(min=0)

        def gate_on_block0(_module: torch.nn.Module, _inputs: object, output: object) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            # left padding puts every prompt's last token at the end
            features = hidden[in_prefill, -1].float().cpu()
            for i, decision in zip(in_prefill, self._gate_rows([requests[i] for i in in_prefill], features)):
                decisions[i] = decision
                rows[i] = self._row_adapter(decision)
            self._apply_routes(rows)  # before blocks 1..N-1 run

        handle = decoder_layers(lm.model)[0].register_forward_hook(gate_on_block0) if in_prefill else None
        try:
            out = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                           position_ids=positions.to(lm.device), use_cache=use_cache, logits_to_keep=logits_to_keep)
        finally:
            if handle is not None:
                handle.remove()
        return out, decisions, encoded, mask, positions, rows

    def _stream(self, requests: list[GenerationRequest]) -> Iterator[StreamEvent]:
        lm, tokenizer = self.lm, self.lm.tokenizer
        out, decisions, encoded, mask, positions, rows = self._prefill(
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
                rows = [rows[row] for row in keep]
                self._apply_routes(rows)
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
            gate = self.gate_for(request)
            if request.route != "auto":
                decisions.append(forced_decision(request))
            elif gate.config.constant_route is not None:
                decisions.append(gate_decisions_on(gate, torch.zeros(1, gate.config.input_dim))[0])
            else:
                decisions.append(None)
                gate_prompt = self.gate_prompt(request.messages)
                if prompt != gate_prompt or self.gate_lm is not self.lm:  # includes any assistant prefix
                    separate[i] = gate_prompt
        if separate:
            features = block0_features(self.gate_lm, list(separate.values()))
            for i, decision in zip(separate, self._gate_rows([requests[i] for i in separate], features)):
                decisions[i] = decision
        return decisions

    def _gate_rows(self, requests: list[GenerationRequest], features: torch.Tensor) -> list[RouteDecision]:
        """The decision for each request from its block-0 features, each by its own gate."""
        decided: dict[int, RouteDecision] = {}
        gates = [self.gate_for(r) for r in requests]
        for gate in {id(g): g for g in gates}.values():
            members = [j for j, g in enumerate(gates) if g is gate]
            decided.update(zip(members, gate_decisions_on(gate, features[members])))
        return [decided[j] for j in range(len(requests))]
