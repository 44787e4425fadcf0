"""PrismModel: the base model, the run's LoRA adapter(s) and its gates behind one generate call (transformers).

Routing costs one small classifier per request. The blocks up to the gate's layer (block 0 by default) carry no
LoRA, so their output is the same on every route: the prefill runs them once, a hook on the gate's layer evaluates
the gate on its pooled hidden states, and the blocks above then run each row with its route's adapter or none. Rows
of different routes share one batch through PEFT's mixed-batch LoRA forward (per-row adapter names, `__base__` =
none); a batch of one route takes PEFT's plain path instead. A k-way run's adapters (one per persona) are named
adapters of the same PeftModel, beside the binary one. The adapter weights never move.

Generation runs in `transformers_decode`'s loop: `stream` decodes a given batch in the caller's thread; `submit`
(what `prism serve` uses) queues requests for one decoding thread, where each joins the running batch at the next
decode step (continuous batching), prefilled and routed with the others that arrived meanwhile.

Every forward pass (prefill, decode step, scoring pass) runs inside `_routed`: it holds the model's lock,
sets PEFT's state for the pass's rows and hooks the LoRA layers their rows' adapters, and undoes all of it
when the pass ends. Between the passes of a stream nothing is held: a stream left unfinished blocks no one.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from prism.config import with_options
from prism.errors import PrismError
from prism.inference.artifacts import FinishedRun, check_adapter_for_gate
from prism.inference.base import (
    GatedModel,
    GenerationRequest,
    ReloadResult,
    RouteDecision,
    StreamEvent,
    TokenScores,
    forced_decision,
    gate_decisions_on,
    token_scores,
)
from prism.inference.config import LoadConfig
from prism.inference.router import gate_decisions
from prism.inference.transformers_decode import DecodeBatch, DecodeThread, Row, Waiting
from prism.lm.batching import gate_features, pad_batch, pool_mask, pool_states, template_prefix_ids
from prism.lm.decoding import TextStream
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
from prism.routes import adapter_key, is_adapter_key, persona_of

ADAPTER = adapter_key(None)  # the binary adapter
NO_ADAPTER = "__base__"  # PEFT's name for "this row uses no adapter" in a mixed batch


@dataclass
class AdapterSet:
    """The PEFT adapter names a generation of the run's adapters is loaded under (adapter key -> name), and how
    many streams still decode on it: a reload retires a set, and its adapters are deleted once no stream uses it."""

    names: dict[str, str]
    users: int = 0
    retired: bool = False

    def row_name(self, decision: RouteDecision | None) -> str | None:
        """The PEFT adapter name a row runs with (None: none, the base route or not decided yet)."""
        return None if decision is None or decision.adapter is None else self.names[decision.adapter]


class PrismModel(GatedModel):
    """A bootstrapped run as one model: `generate(messages)` routes, generates and says which route it took."""

    engine = "transformers"

    def __init__(self, lm: LoadedModel, gate: Gate, adapter: PeftModel | None = None, *,
                 run: FinishedRun | None = None, max_model_len: int | None = None,
                 gate_lm: LoadedModel | None = None, max_num_seqs: int = LoadConfig.max_num_seqs):
        self.lm = lm
        # the gate's float32 blocks: `lm` itself when it runs in float32 (then routing shares the prefill),
        # else a float32 copy of its embeddings and blocks up to the gate's layer (see gate_feature_model)
        self.gate_lm = gate_lm or lm
        self.tokenizer = lm.tokenizer
        self.run = run
        # every gate of the run ("binary", and "kway" for a k-way run): a request may name the one that decides it
        self._use_gates(run.gates if run is not None else {"kway" if gate.config.classes else "binary": gate},
                        run.routing if run is not None else None)
        self.adapter = adapter
        names = {name: name for name in adapter.peft_config} if adapter is not None else {}
        unnamed = [n for n in names if not is_adapter_key(n)]
        if unnamed:
            raise PrismError(f"the PeftModel's adapters {unnamed} need PRISM's names: load the binary adapter with "
                             f"adapter_name={ADAPTER!r} and a k-way persona's with adapter_name='{ADAPTER}-<persona>'")
        self._adapters = AdapterSet(names)
        self._active = next(iter(names.values()), None)  # the adapter PEFT's plain path runs
        self._lora_layers = [m for m in lm.model.modules() if isinstance(m, LoraLayer)] if adapter is not None else []
        context = getattr(lm.model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(max_model_len or context, context)
        self.eos_ids = stop_token_ids(lm)
        self._cache_argument = cache_argument(lm.model)
        self._adapter_enabled = True
        self._lock = threading.Lock()
        # submit's requests: one thread decodes them, each joining the running batch at the next step with room
        self.decoder = DecodeThread(DecodeBatch(self._decode_pass, self.eos_ids), self._admit, max_num_seqs)
        check_adapter_for_gate(self.gates.get("binary", self.gate), self.has_adapter)

    @classmethod
    def from_run(cls, run: str | Path | FinishedRun, config: LoadConfig | None = None, **options: Any
                 ) -> PrismModel:
        """Load the base model, the adapter(s) and the gate(s) of a finished bootstrap run, once. `config` (or its
        fields as keywords: device, threshold, max_model_len, routing, trust_remote_code) says how: routing
        'binary', 'kway' (a run bootstrapped with --routing kway: its gate over base and one adapter per persona,
        and the binary gate and adapter beside them) or 'auto' (k-way when the run has it)."""
        config = with_options(LoadConfig, config, **options)
        run = run if isinstance(run, FinishedRun) else FinishedRun.open(run, config)
        lm = load_model(run.model, device=config.device, trust_remote_code=config.trust_remote_code,
                        safetensors_only=True)
        run.check_model(lm)
        adapter = None
        for key, directory in run.adapters.items():
            # autocast off: the LoRA weights take the base layers' dtype (bf16 on a GPU) instead of float32, so no
            # LoRA layer casts its input and output at every step
            if adapter is None:
                adapter = PeftModel.from_pretrained(lm.model, str(directory), adapter_name=key,
                                                    autocast_adapter_dtype=False).eval()
            else:
                adapter.load_adapter(str(directory), adapter_name=key, autocast_adapter_dtype=False)
        return cls(lm, run.gate, adapter, run=run, max_model_len=config.max_model_len,
                   gate_lm=gate_feature_model(lm, run.model, config.trust_remote_code, run.gate.config.layer),
                   max_num_seqs=config.max_num_seqs)

    @property
    def adapter_names(self) -> dict[str, str]:
        """Adapter key ("persona", "persona-<k-way persona>") -> its name in the PeftModel now."""
        return self._adapters.names

    @property
    def has_adapter(self) -> bool:
        return ADAPTER in self.adapter_names

    @property
    def personas(self) -> list[str]:
        return [persona_of(key) for key in self.adapter_names if key != ADAPTER]  # type: ignore[misc]

    def decide(self, conversations: Sequence[list[dict[str, str]]], routing: str | None = None
               ) -> list[RouteDecision]:
        """The gate's route for each conversation, without generating (embeddings and blocks up to the gate's)."""
        with self._lock:  # a prefill's gate hook sits on the same block
            return gate_decisions(self.gate_lm, self.gate_for(routing), conversations)

    def reload(self) -> ReloadResult:
        """Read the run's gates, thresholds and adapters again, between forward passes: a stream decoding when it
        happens finishes on the adapters it started with, the next one runs on the new. A reload that fails
        leaves the old run serving. The base model stays as loaded (a run made on another model needs a restart)."""
        run = self._reopen()
        run.check_model(self.lm)
        with self._lock:
            if run.adapters:
                self._swap_adapters(run.adapters)
            return self._reloaded(run)

    def _swap_adapters(self, dirs: dict[str, Path]) -> None:
        """Load every adapter again under a new name, then retire the old set; any failure drops the new ones."""
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
        old, self._adapters = self._adapters, AdapterSet(loaded)
        self._active = None
        self._activate(next(iter(loaded.values())))
        old.retired = True
        self._drop_if_unused(old)
        self.adapter.eval()

    def _drop_if_unused(self, adapters: AdapterSet) -> None:
        if adapters.retired and adapters.users == 0:
            assert self.adapter is not None
            if self._active in adapters.names.values():  # PEFT's active adapter is never one it is deleting
                self._activate(next(iter(self._adapters.names.values())))
            for name in adapters.names.values():
                if name in self.adapter.peft_config:
                    self.adapter.delete_adapter(name)
            adapters.names = {}

    def _activate(self, name: str) -> None:
        """Make `name` the adapter PEFT's plain (one-adapter) path runs."""
        assert self.adapter is not None
        if name != self._active:
            self.adapter.base_model.set_adapter(name, inference_mode=True)
            self._active = name

    @contextlib.contextmanager
    def _routed(self, rows: list[str | None]) -> Iterator[None]:
        """One forward pass with each row on its PEFT adapter (None: no adapter). The pass may change `rows` (the
        gate decides on its layer's output, before the LoRA layers above it run): the hooks read them
        when each layer runs. A batch of one route takes PEFT's plain paths, adapters off or one adapter on for
        every row; only a mixed batch pays for per-row names (gather and scatter in every LoRA layer)."""

        def hand_rows(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if len(set(rows)) < 2:
                return None
            kwargs["adapter_names"] = [name or NO_ADAPTER for name in rows]
            return args, kwargs

        with self._lock:
            handles = [layer.register_forward_pre_hook(hand_rows, with_kwargs=True) for layer in self._lora_layers]
            try:
                self._set_routes(rows)
                yield
            finally:
                for handle in handles:
                    handle.remove()
                self._set_routes(None)

    def _set_routes(self, rows: list[str | None] | None) -> None:
        """PEFT's switches for the rows of a pass: adapter layers on unless every row is on base, and for a batch
        on one adapter that adapter active (None: adapters on, PEFT's default)."""
        if self.adapter is None:
            return
        enable = rows is None or any(name is not None for name in rows)
        if enable != self._adapter_enabled:
            if enable:
                self.adapter.base_model.enable_adapter_layers()
            else:
                self.adapter.base_model.disable_adapter_layers()
            self._adapter_enabled = enable
        if rows and enable and len(set(rows)) == 1:
            self._activate(rows[0])  # type: ignore[arg-type]

    @contextlib.contextmanager
    def _current_adapters(self) -> Iterator[AdapterSet]:
        """The adapter set in force, kept loaded while the caller uses it (a reload meanwhile retires it)."""
        adapters = self._hold_adapters()
        try:
            yield adapters
        finally:
            self._release_adapters(adapters)

    def _hold_adapters(self, users: int = 1) -> AdapterSet:
        with self._lock:
            self._adapters.users += users
            return self._adapters

    def _release_adapters(self, adapters: AdapterSet, users: int = 1) -> None:
        with self._lock:
            adapters.users -= users
            self._drop_if_unused(adapters)

    @torch.no_grad()  # on a generator torch sets it around each step, never between them (the caller's code)
    def stream(self, requests: Sequence[GenerationRequest]) -> Iterator[StreamEvent]:
        """Generate for a batch in the caller's thread, yielding each request's route, then its text deltas, then
        its completion (the batch is the requests given: none joins it later)."""
        if not requests:
            return
        events: list[StreamEvent | BaseException] = []
        batch = DecodeBatch(self._decode_pass, self.eos_ids)
        with self._current_adapters() as adapters:
            self._join(batch, list(requests), [events.append] * len(requests), adapters, range(len(requests)))
            while True:
                ready, events[:] = list(events), []
                yield from ready  # type: ignore[misc]  # stream's rows only emit events: errors are raised
                if not batch.rows:
                    return
                batch.step()

    def submit(self, requests: Sequence[GenerationRequest],
               on_events: Sequence[Callable[[StreamEvent | BaseException], None]]) -> None:
        """Queue requests for the decoding thread and return at once: they join its running batch at the next step
        where it has room (max_num_seqs rows), prefilled and routed together. `on_events[i]` gets request i's route,
        its text deltas and its completion (or the exception that ended or refused it), from that thread. A request
        refused (too long, an unknown persona) does not hold the others back. Cancel one with its request.cancel."""
        waiting = []
        for request, emit in zip(requests, on_events):
            try:
                prompt = self.prompt(request.messages, request.assistant_prefix)
                self._check(request, len(encode(self.tokenizer, prompt)), request.params.max_tokens)
            except Exception as exc:  # noqa: BLE001 - this request's error, not the others'
                emit(exc)
            else:
                waiting.append(Waiting(request, emit))
        if waiting:
            self.decoder.submit(waiting)

    def observe_steps(self, on_step: Callable[[int], None]) -> None:
        self.decoder.on_step = on_step

    def close(self) -> None:
        super().close()
        self.decoder.close()

    @torch.no_grad()
    def next_token_logprobs(self, requests: Sequence[GenerationRequest]) -> tuple[torch.Tensor, list[RouteDecision]]:
        """Log-probabilities of the token after each prompt (n, vocab), each on its request's route:
        one routed prefill, no generation (multiple-choice scoring, verdicts)."""
        with self._current_adapters() as adapters:
            out, decisions, *_ = self._prefill(list(requests), [1] * len(requests), adapters, use_cache=False)
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
        with self._current_adapters() as adapters:
            out, decisions, encoded, *_ = self._prefill(extended, [1] * len(extended), adapters, use_cache=False,
                                                        logits_to_keep=keep)
        logprobs = torch.log_softmax(out.logits.float().cpu(), dim=-1)  # left padded: rows end together
        values = []
        for row, (ids, count) in enumerate(zip(encoded, counts)):
            predicted = logprobs[row, keep - count - 1 : keep - 1]
            values.append((float(predicted.gather(1, torch.tensor(ids[-count:])[:, None]).sum()), count))
        return values, decisions

    @torch.no_grad()
    def score_tokens(self, sequences: Sequence[list[int]], decisions: Sequence[RouteDecision]) -> list[TokenScores]:
        self.check_scorable(sequences, decisions)
        if not sequences:
            return []
        lm = self.lm
        ids, mask = pad_batch(list(sequences), lm.tokenizer.pad_token_id, side="right")  # positions from 0 in every row
        with self._current_adapters() as adapters, self._routed([adapters.row_name(d) for d in decisions]):
            logits = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False).logits
        return [token_scores(logits[row, : len(seq) - 1].cpu(), seq) for row, seq in enumerate(sequences)]

    def _prefill(self, requests: list[GenerationRequest], max_tokens: list[int], adapters: AdapterSet,
                 use_cache: bool = True, logits_to_keep: int = 1) -> tuple:
        lm, tokenizer = self.lm, self.lm.tokenizer
        prompts = [self.prompt(r.messages, r.assistant_prefix) for r in requests]
        encoded = [encode(tokenizer, p) for p in prompts]
        for request, ids, wanted in zip(requests, encoded, max_tokens):
            self._check(request, len(ids), wanted)

        decisions = self._early_decisions(requests, prompts)
        in_prefill = [i for i, d in enumerate(decisions) if d is None]
        rows = [adapters.row_name(d) for d in decisions]
        ids, mask = pad_batch(encoded, tokenizer.pad_token_id, side="left")
        positions = (mask.cumsum(1) - 1).clamp(min=0)

        def gate_on_its_layer(_module: torch.nn.Module, _inputs: object, output: object) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            pooled = pool_mask([encoded[i] for i in in_prefill], hidden.shape[1], "left", self.gate.config.pool,
                               template_prefix_ids(tokenizer))
            features = pool_states(hidden[in_prefill], pooled)
            for i, decision in zip(in_prefill, self._gate_rows([requests[i] for i in in_prefill], features)):
                decisions[i] = decision
                rows[i] = adapters.row_name(decision)
            self._set_routes(rows)  # before the blocks above the gate's layer (the adapters') run

        with self._routed(rows):
            hook = decoder_layers(lm.model)[self.gate_layer].register_forward_hook
            handle = hook(gate_on_its_layer) if in_prefill else None
            try:
                out = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                               position_ids=positions.to(lm.device), use_cache=use_cache,
                               logits_to_keep=logits_to_keep)
            finally:
                if handle is not None:
                    handle.remove()
        return out, decisions, encoded, mask, positions, rows

    def _check(self, request: GenerationRequest, prompt_tokens: int, max_tokens: int) -> None:
        """Refuse what this request asks that cannot be served: its length, a persona route the run lacks."""
        self.check_length(prompt_tokens, max_tokens)
        if request.route == "persona":
            self.check_persona_route(request.persona)

    def _join(self, batch: DecodeBatch, requests: list[GenerationRequest],
              emits: Sequence[Callable[[StreamEvent | BaseException], None]], adapters: AdapterSet,
              indices: Sequence[int], release: Callable[[], None] | None = None) -> None:
        """Prefill `requests` together (the gate deciding their routes on its layer), tell each its route, and
        have them join `batch`."""
        out, decisions, encoded, mask, positions, names = self._prefill(
            requests, [r.params.max_tokens for r in requests], adapters)
        rows = [Row(index, request, decision, name, len(ids), emit, TextStream(self.tokenizer, request.params.stop),
                    release)
                for index, request, decision, name, ids, emit in zip(indices, requests, decisions, names, encoded,
                                                                     emits)]
        for row in rows:
            row.emit(StreamEvent(row.index, decision=row.decision))
        batch.join(rows, output_cache(out), mask, positions, out.logits[:, -1])

    def _admit(self, batch: DecodeBatch, waiting: list[Waiting]) -> None:
        """The decoding thread's admission: each row holds the adapter set it started on until it leaves."""
        adapters = self._hold_adapters(len(waiting))
        try:
            self._join(batch, [w.request for w in waiting], [w.emit for w in waiting], adapters, [0] * len(waiting),
                       release=lambda: self._release_adapters(adapters))
        except BaseException:
            self._release_adapters(adapters, len(waiting))
            raise

    def _decode_pass(self, adapters: list[str | None], tokens: torch.Tensor, mask: torch.Tensor,
                     positions: torch.Tensor, cache: Any) -> Any:
        lm = self.lm
        with self._routed(adapters):
            return lm.model(input_ids=tokens.to(lm.device)[:, None], attention_mask=mask.to(lm.device),
                            position_ids=positions[:, None].to(lm.device), use_cache=True,
                            **{self._cache_argument: cache})

    def _early_decisions(self, requests: list[GenerationRequest], prompts: list[str]) -> list[RouteDecision | None]:
        """Routes known before the prefill: forced ones, a constant gate, and conversations whose prompt is
        not the gate's prompt (multi-turn or a custom system message), or every one when the model is not
        float32: those get a float32 pass over the gate prompt, up to the gate's layer. None = decided by the gate
        during this batch's own prefill."""
        decisions: list[RouteDecision | None] = []
        separate: dict[int, str] = {}  # row -> its gate prompt
        for i, (request, prompt) in enumerate(zip(requests, prompts)):
            gate = self.gate_for(request.routing)
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
            with self._lock:  # the gate's own pass: no prefill hook may fire on it
                features = gate_features(self.gate_lm, list(separate.values()), self.gate_layer, self.gate.config.pool)
            for i, decision in zip(separate, self._gate_rows([requests[i] for i in separate], features)):
                decisions[i] = decision
        return decisions

    def _gate_rows(self, requests: list[GenerationRequest], features: torch.Tensor) -> list[RouteDecision]:
        """The decision for each request from its block-0 features, each by its own gate."""
        decided: dict[int, RouteDecision] = {}
        gates = [self.gate_for(r.routing) for r in requests]
        for gate in {id(g): g for g in gates}.values():
            members = [j for j, g in enumerate(gates) if g is gate]
            decided.update(zip(members, gate_decisions_on(gate, features[members])))
        return [decided[j] for j in range(len(requests))]
