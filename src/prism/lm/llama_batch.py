"""Continuous batching on llama.cpp: many sequences decoded by one `llama_decode` per step, as llama.cpp's own
batched and server examples do.

A GGUF's weights are loaded once; each route (base, a LoRA adapter on the same weights, or another GGUF such
as a merged persona model) gets one context with `slots` sequences. llama.cpp applies a LoRA adapter to a whole
context, not to a sequence, so sequences of different routes cannot share a decode: the worker thread steps
the busy routes' contexts one after the other. Each slot has its own KV cells (llama.cpp's non-unified cache):
a sequence's logits do not depend on what else is in the batch (measured: identical to decoding it alone, where
the unified cache moved logits by up to 0.5 on the embedded model; under flash attention with the two rules at
PREFILL_CHUNK and LONE_SPLIT_FROM), a prompt longer than a slot is refused before
it reaches llama.cpp, and it can never take another sequence's cells. A busy slot range is kept compact (the
lowest free slot first): llama.cpp attends over every slot between the lowest and the highest one in a batch.

A `Sequence` is a prompt plus what to do with its next-token logits: `on_logits` returns the next token to feed,
or None when the sequence is done; its slot is then free for the next waiting sequence of that route, and keeps
its tokens so that the next prompt sharing a prefix (a system prompt, a judge's instructions) skips it.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prism.errors import ContextLengthError, PrismError, RequestError
from prism.lm.llama import build_failure, warn_if_openmp
from prism.lm.llama_weights import prefills_together

log = logging.getLogger("prism")
N_BATCH = 512  # tokens per llama_decode (prefill chunks share it with the decoding sequences' one token each)
# The KV cache's type, and with it the attention: F16 under flash attention (llama.cpp's defaults; 32 streams
# decoded 418 tok/s against 319 with F32 and without it, on the embedded model), or F32 without flash
# attention (full-precision attention as PyTorch computes it: flash attention would cast F32 keys and values
# to F16 anyway)
KV_TYPES = {"f16": 1, "f32": 0}  # GGML_TYPE_F16, GGML_TYPE_F32
# Two of llama.cpp's CPU flash-attention kernels round otherwise than its row kernel, so a sequence's logits
# would depend on the batch (9 of 32 greedy MT-Bench replies of the embedded model changed; with both rules,
# none did). A tiled kernel takes 64 query rows of a sequence or more (GGML_FA_TILE_Q): prompts prefill in
# chunks of at most 63 tokens, so every position is computed alike, whether its prompt comes whole, after a
# cached prefix or beside others.
PREFILL_CHUNK = 63
# And one query row of one sequence is split over the KV cells once it attends over 512 of them (llama.cpp pads
# the cells attended to 256): from this many cached tokens on, a sequence decoding alone gets a neighbour
# decoding a placeholder (always giving one cost a stream 26% of its speed on the embedded model).
LONE_SPLIT_FROM = 256


@dataclass(eq=False)
class Sequence:
    """A prompt decoded on one route. `on_logits` gets the next-token logits (rows, vocab: one row, or one per
    prompt position from `logits_from` on) and returns the token to feed next, or None: done. `max_new_tokens`
    is how many tokens it may feed after its prompt. `on_end` is told when it ends (with the error, if any)."""

    ids: list[int]
    on_logits: Callable[[torch.Tensor], int | None]
    max_new_tokens: int = 0
    logits_from: int | None = None  # the first prompt position whose logits on_logits gets (default: the last)
    on_end: Callable[[BaseException | None], None] | None = None
    stop: threading.Event | None = None  # the caller's own cancel flag, checked with cancel()'s at every step
    cancelled: bool = False
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop at the next step and free the slot (or never start, when it is still waiting)."""
        self.cancelled = True

    def is_cancelled(self) -> bool:
        return self.cancelled or (self.stop is not None and self.stop.is_set())

    def end(self, error: BaseException | None = None) -> None:
        self.error = error
        self.done.set()
        if self.on_end is not None:
            self.on_end(error)

    @property
    def first_logits(self) -> int:
        return len(self.ids) - 1 if self.logits_from is None else self.logits_from


@dataclass
class _Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # the tokens whose keys and values are in this slot's cells
    sequence: Sequence | None = None
    feed: list[int] = field(default_factory=list)  # tokens still to evaluate
    rows: list[np.ndarray] = field(default_factory=list)  # logits gathered for the sequence's next call


def _quiet_logs() -> None:
    from llama_cpp import _logger

    _logger.set_verbose(False)  # llama.cpp logs every adapter change and graph reservation otherwise


def load_weights(path: Path) -> Any:
    """A GGUF's weights, behind the build's start-up probe: a build that would die on them raises instead."""
    import llama_cpp
    from llama_cpp import _internals
    from llama_cpp._utils import suppress_stdout_stderr

    broken = build_failure(path)
    if broken:
        raise PrismError(broken)
    warn_if_openmp()
    _quiet_logs()
    try:
        with suppress_stdout_stderr(disable=False):
            return _internals.LlamaModel(path_model=str(path), params=llama_cpp.llama_model_default_params(),
                                         verbose=False)
    except ValueError as exc:
        raise PrismError(f"llama.cpp cannot load {path}: {exc}") from None

EAGER_ROUTE = "base"  # the route whose context opens with the engine; the others open at their first sequence


class RouteContext:
    """One llama.cpp context: a model's weights (with a LoRA adapter, or none) and `slots` sequences of at most
    `slot_tokens` tokens each."""

    def __init__(self, weights: Any, *, lora: Path | None, slots: int, slot_tokens: int, threads: int,
                 kv_type: str, shared_prefill: bool = False):
        import llama_cpp

        if not 1 <= slots <= N_BATCH:
            raise PrismError(f"a llama.cpp context holds 1 to {N_BATCH} sequences, got {slots}")
        self._llama = llama_cpp
        self.weights, self.lora_path = weights, lora
        self.shared_prefill = shared_prefill  # prompts prefill in one decode (see step)
        self.slot_tokens = -(-slot_tokens // 256) * 256  # llama.cpp rounds a slot up to 256 cells
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_seq_max, params.kv_unified = self.slot_tokens * slots, slots, False
        params.n_batch = params.n_ubatch = N_BATCH
        params.n_threads = params.n_threads_batch = threads
        self.flash_attention = kv_type == "f16"  # see KV_TYPES; AUTO: wherever the build runs it (a CPU does)
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if self.flash_attention
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        params.type_k = params.type_v = KV_TYPES[kv_type]
        self._params, self.context, self.adapter = params, None, None
        if lora is not None:
            self.adapter = llama_cpp.llama_adapter_lora_init(weights.model, str(lora).encode())
            if not self.adapter:
                raise PrismError(f"llama.cpp cannot load the LoRA {lora} on {weights.path_model}: export it again "
                                 "with `prism export gguf RUN`")
        self.n_vocab = weights.n_vocab()
        self.slots = [_Slot(i) for i in range(slots)]
        self.waiting: deque[Sequence] = deque()
        self.batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)

    def open(self) -> None:
        """Allocate the context and its KV cache (slots x slot_tokens cells): at a route's first sequence, so a
        route nobody asks for (a k-way persona without traffic) costs no memory."""
        if self.context is not None:
            return
        from llama_cpp import _internals
        from llama_cpp._utils import suppress_stdout_stderr

        try:
            with suppress_stdout_stderr(disable=False):
                self.context = _internals.LlamaContext(model=self.weights, params=self._params, verbose=False)
        except ValueError as exc:
            raise PrismError(f"llama.cpp cannot make a context of {len(self.slots)} x {self.slot_tokens} tokens: "
                             f"{exc}; lower --max-batch-size or --max-model-len") from None
        if self.adapter:
            adapters = (self._llama.llama_adapter_lora_p_ctypes * 1)(self.adapter)
            self._llama.llama_set_adapters_lora(self.context.ctx, adapters, 1, (ctypes.c_float * 1)(1.0))

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(s.sequence is not None for s in self.slots)

    def active(self) -> int:
        return sum(s.sequence is not None for s in self.slots)

    def admit(self) -> None:
        """Waiting sequences into free slots: the lowest ones, and among those the one sharing the longest prefix."""
        if self.waiting and self.context is None:
            try:
                self.open()
            except PrismError as exc:  # out of memory, say: these sequences fail, the other routes go on
                while self.waiting:
                    self.waiting.popleft().end(exc)
                return
        while self.waiting:
            sequence = self.waiting[0]
            if sequence.is_cancelled():
                self.waiting.popleft().end()
                continue
            free = [s for s in self.slots if s.sequence is None]
            if not free:
                return
            busy_top = max((s.seq_id for s in self.slots if s.sequence is not None), default=-1)
            candidates = [s for s in free if s.seq_id <= max(busy_top, free[0].seq_id)]
            # a prompt feeds two tokens at least: llama.cpp's attention takes another kernel for one query row of
            # one sequence than for several rows, which rounds differently (see _decode)
            limit = max(0, min(len(sequence.ids) - 2, sequence.first_logits))
            slot = max(candidates, key=lambda s: (_common_prefix(s.cached, sequence.ids, limit), -s.seq_id))
            keep = _common_prefix(slot.cached, sequence.ids, limit)
            if keep < len(slot.cached):
                self._llama.llama_memory_seq_rm(self.context.memory, slot.seq_id, keep, -1)
                del slot.cached[keep:]
            slot.sequence, slot.feed, slot.rows = self.waiting.popleft(), list(sequence.ids[keep:]), []
        if not self.waiting:
            self._compact()

    def _compact(self) -> None:
        """With nobody waiting, move the highest busy slot's sequence into the lowest free slot below it, until
        the busy slots are consecutive: a free slot between busy ones would decode a placeholder at every step
        (see _decode), where a move copies the slot's cells once (llama.cpp copies a whole slot between
        non-unified streams). The moved sequence attends over the same cells as before, at the same positions;
        the free slot it leaves keeps them for a prompt with the same prefix."""
        while True:
            free = [s for s in self.slots if s.sequence is None]
            busy = [s for s in self.slots if s.sequence is not None]
            if not free or not busy or free[0].seq_id > busy[-1].seq_id:
                return
            hole, top = free[0], busy[-1]
            self._llama.llama_memory_seq_cp(self.context.memory, top.seq_id, hole.seq_id, -1, -1)
            hole.cached, hole.sequence, hole.feed, hole.rows = top.cached, top.sequence, top.feed, top.rows
            # the cells stay where they were as well: a later prompt with the same prefix may start from them
            top.cached, top.sequence, top.feed, top.rows = list(top.cached), None, [], []

    def step(self) -> int:
        """One llama_decode over every sequence feeding one token, then prompts in chunks (of PREFILL_CHUNK tokens
        at most under flash attention), up to N_BATCH prompt tokens in all (in one decode with shared_prefill,
        else each chunk in a decode of its own); returns the tokens decoded."""
        for slot in self.slots:
            if slot.sequence is not None and slot.sequence.is_cancelled():
                self._finish(slot)
        busy = [s for s in self.slots if s.sequence is not None]
        decoded = self._decode([(s, 1) for s in busy if len(s.feed) == 1], fill_gaps=True)
        budget, shared = N_BATCH, []
        for slot in (s for s in busy if len(s.feed) > 1 and s.sequence is not None):
            # alone, a prompt's chunks are the same whatever else runs; shared, they fill the decode
            count = min(len(slot.feed), PREFILL_CHUNK if self.flash_attention else N_BATCH,
                        budget if self.shared_prefill else N_BATCH)
            count -= len(slot.feed) - count == 1  # never a chunk of one token (see admit)
            if budget <= 0 or count < 2:
                break
            if self.shared_prefill:
                shared.append((slot, count))
            else:
                decoded += self._decode([(slot, count)])
            budget -= count
        return decoded + self._decode(shared)

    def _decode(self, feeds: list[tuple[_Slot, int]], fill_gaps: bool = False) -> int:
        """One llama_decode of these (slot, token count) feeds, in slot order. llama.cpp computes a batch as one
        graph only over consecutive sequence ids (split_equal, sequential): with `fill_gaps` each slot between
        two feeding ones decodes a placeholder token, dropped after, instead of the batch splitting in two (32
        streams with some finished: 10 tokens took 77 ms against 56 for 14 unbroken, on the embedded model). A
        long sequence feeding one token alone gets a neighbour decoding a placeholder as well (LONE_SPLIT_FROM):
        llama.cpp's flash attention splits one query row of one sequence over its KV cells, which rounds
        otherwise than one row of each of several sequences."""
        batch, n, taken, placeholders = self.batch, 0, [], []
        feeding = {slot.seq_id: count for slot, count in feeds}
        low, high = (min(feeding), max(feeding)) if feeding else (0, -1)
        if fill_gaps and self.flash_attention and len(feeds) == 1 and len(feeds[0][0].cached) >= LONE_SPLIT_FROM:
            for neighbour in (high + 1, low - 1):  # one with a free cell for the placeholder
                if 0 <= neighbour < len(self.slots) and len(self.slots[neighbour].cached) < self.slot_tokens:
                    low, high = min(low, neighbour), max(high, neighbour)
                    break
        for slot in self.slots[low:high + 1]:
            count = feeding.get(slot.seq_id, 0)
            start = len(slot.cached)
            if not count:
                if fill_gaps and start < self.slot_tokens:
                    batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = 0, start, 1, False
                    batch.seq_id[n][0] = slot.seq_id
                    placeholders.append((slot.seq_id, start))
                    n += 1
                continue
            first = slot.sequence.first_logits  # type: ignore[union-attr]
            for k in range(count):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = slot.feed[k], start + k, 1
                batch.seq_id[n][0] = slot.seq_id
                batch.logits[n] = start + k >= first
                n += 1
            taken.append((slot, count, n - count))
        if not taken:
            return 0
        batch.n_tokens = n
        status = self._llama.llama_decode(self.context.ctx, batch)
        for seq_id, position in placeholders:
            self._llama.llama_memory_seq_rm(self.context.memory, seq_id, position, -1)
        if status != 0:
            error = PrismError(f"llama.cpp failed to decode a batch of {n} tokens (status {status})")
            for slot, _count, _at in taken:
                self._llama.llama_memory_seq_rm(self.context.memory, slot.seq_id, -1, -1)
                slot.cached.clear()
                self._finish(slot, error)
            return 0
        for slot, count, at in taken:
            self._advance(slot, count, at)
        return n - len(placeholders)

    def _advance(self, slot: _Slot, count: int, at: int) -> None:
        sequence = slot.sequence
        assert sequence is not None
        start = len(slot.cached)
        for k in range(count):
            if start + k >= sequence.first_logits:
                pointer = self._llama.llama_get_logits_ith(self.context.ctx, at + k)
                slot.rows.append(np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy())
        slot.cached.extend(slot.feed[:count])
        del slot.feed[:count]
        if slot.feed:
            return
        rows, slot.rows = slot.rows, []
        logits = torch.from_numpy(rows[0][None] if len(rows) == 1 else np.stack(rows))  # a decode step: no copy
        try:
            token = sequence.on_logits(logits)
        except Exception as exc:  # the caller's own failure ends its sequence, not the others
            self._finish(slot, exc)
            return
        if token is None:
            self._finish(slot)
        elif len(slot.cached) >= min(self.slot_tokens, len(sequence.ids) + sequence.max_new_tokens):
            self._finish(slot, ContextLengthError(f"the sequence outgrew its {self.slot_tokens}-token slot"))
        else:
            slot.feed = [token]

    def _finish(self, slot: _Slot, error: BaseException | None = None) -> None:
        sequence, slot.sequence, slot.feed, slot.rows = slot.sequence, None, [], []
        if sequence is not None:
            sequence.end(error)

    def close(self) -> None:
        for slot in self.slots if hasattr(self, "slots") else []:
            self._finish(slot, PrismError("the llama.cpp engine was closed"))
        for sequence in getattr(self, "waiting", ()):
            sequence.end(PrismError("the llama.cpp engine was closed"))
        if getattr(self, "batch", None) is not None:
            self._llama.llama_batch_free(self.batch)
            self.batch = None
        if self.context is not None:
            self.context.close()
            self.context = None
        if self.adapter:
            self._llama.llama_adapter_lora_free(self.adapter)
            self.adapter = None


def _common_prefix(cached: list[int], ids: list[int], limit: int) -> int:
    n = 0
    for a, b in zip(cached[:limit], ids):
        if a != b:
            break
        n += 1
    return n


_open_engines: weakref.WeakSet = weakref.WeakSet()
@atexit.register
def _close_open_engines() -> None:
    # llama-cpp-python frees its models in __del__, which at interpreter exit runs after its own module
    # globals are gone and prints a traceback; closing them first keeps the exit quiet.
    for engine in list(_open_engines):
        engine.close()


@dataclass(frozen=True)
class RouteSpec:
    """What a route runs on: a GGUF, and optionally a LoRA GGUF applied to it."""

    model: Path
    lora: Path | None = None


class BatchedLlama:
    """GGUF weights loaded once, one context per route, and a worker thread that steps the busy ones.
    `submit` queues a sequence on a route and returns at once; `run` waits for a list of them."""

    def __init__(self, routes: dict[str, RouteSpec], *, slots: int, slot_tokens: int, threads: int, kv_type: str):
        self.slots, self.slot_tokens, self.threads, self.kv_type = slots, slot_tokens, threads, kv_type
        self._weights: dict[Path, Any] = {}
        self._shared_prefill: dict[Path, bool] = {}  # per GGUF, read with its weights
        self.routes: dict[str, RouteContext] = {}
        self._retired: list[RouteContext] = []
        self._cond = threading.Condition()
        self._stepping = threading.Lock()  # held by the worker while it steps: nothing closes a context meanwhile
        self._closed = False
        self._thread: threading.Thread | None = None
        # told after each route's step, in the worker thread, how many sequences it decoded (0: none)
        self.on_step: Callable[[int], None] | None = None
        _open_engines.add(self)
        try:
            self.routes = self._open(routes)
        except BaseException:
            self.close()
            raise

    @property
    def weights(self) -> Any:
        """The first route's weights (the base model): its vocabulary is the engine's."""
        return next(iter(self._weights.values()))

    def _open(self, routes: dict[str, RouteSpec], slot_tokens: int | None = None) -> dict[str, RouteContext]:
        opened: dict[str, RouteContext] = {}
        try:
            for name, spec in routes.items():
                if spec.model not in self._weights:
                    self._weights[spec.model] = load_weights(spec.model)
                    self._shared_prefill[spec.model] = prefills_together(spec.model)
                opened[name] = RouteContext(self._weights[spec.model], lora=spec.lora, slots=self.slots,
                                            slot_tokens=slot_tokens or self.slot_tokens, threads=self.threads,
                                            kv_type=self.kv_type, shared_prefill=self._shared_prefill[spec.model])
                if name == EAGER_ROUTE:  # every request may land there: a context too big fails at start-up
                    opened[name].open()
        except BaseException:
            for context in opened.values():
                context.close()
            raise
        return opened

    def kv_bytes(self) -> int:
        """The KV cache of every route's context once each is in use, in bytes (what --max-batch-size and
        --max-model-len cost; a route's context is allocated at its first request)."""
        import llama_cpp

        total = 0
        for context in self.routes.values():
            model = context.weights.model
            kv_width = (llama_cpp.llama_model_n_embd(model) * llama_cpp.llama_model_n_head_kv(model)
                        // llama_cpp.llama_model_n_head(model))
            per_token = 2 * llama_cpp.llama_model_n_layer(model) * kv_width * (2 if self.kv_type == "f16" else 4)
            total += per_token * context.slot_tokens * len(context.slots)
        return total

    def capacity(self, route: str) -> int:
        return self.route(route).slot_tokens

    def route(self, name: str) -> RouteContext:
        try:
            return self.routes[name]
        except KeyError:
            raise PrismError(f"no llama.cpp route {name!r}; this engine has {', '.join(self.routes)}") from None

    def grow(self, tokens: int) -> None:
        """Make every slot hold `tokens` tokens (the bootstrap sizes slots to each stage's prompts), between runs."""
        if tokens <= self.slot_tokens:
            return
        with self._cond:
            if any(c.busy for c in self.routes.values()):
                raise PrismError("the llama.cpp engine cannot grow its slots while it decodes")
            specs = {n: RouteSpec(Path(c.weights.path_model), c.lora_path) for n, c in self.routes.items()}
        grown = self._open(specs, tokens)
        with self._stepping, self._cond:
            old, self.routes, self.slot_tokens = self.routes, grown, grown[next(iter(grown))].slot_tokens
            for context in old.values():
                context.close()

    def replace_routes(self, routes: dict[str, RouteSpec], keep: tuple[str, ...] = ()) -> None:
        """Open these routes anew (a reload) and swap them in between steps, with the routes named in `keep`
        as they are and every other one gone: a sequence decoding on a replaced context finishes there, new
        ones go to the new; a replaced context closes once it is idle."""
        opened = self._open(routes)
        with self._cond:
            kept = {name: context for name, context in self.routes.items() if name in keep and name not in opened}
            self._retired += [c for name, c in self.routes.items() if name not in kept]  # the worker closes them
            self.routes = {**kept, **opened}
            self._cond.notify()

    def submit(self, route: str, sequence: Sequence) -> Sequence:
        context = self.route(route)
        needed = len(sequence.ids) + sequence.max_new_tokens
        if needed > context.slot_tokens:
            raise ContextLengthError(f"a prompt of {len(sequence.ids)} tokens and {sequence.max_new_tokens} new ones "
                                     f"do not fit llama.cpp's {context.slot_tokens}-token sequences: shorten it, ask "
                                     "for fewer tokens, or raise --max-model-len")
        if not sequence.ids:
            raise RequestError("an empty prompt has nothing to decode")
        with self._cond:
            if self._closed:
                raise PrismError("the llama.cpp engine was closed")
            context.waiting.append(sequence)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="prism-llamacpp", daemon=True)
                self._thread.start()
            self._cond.notify()
        return sequence

    def run(self, route: str, sequences: Iterable[Sequence]) -> list[Sequence]:
        """Submit the sequences and wait for all; the first error is raised. Interrupted, it cancels them."""
        return self.run_routed((route, sequence) for sequence in sequences)

    def run_routed(self, work: Iterable[tuple[str, Sequence]]) -> list[Sequence]:
        """`run` for (route, sequence) pairs: every route's context decodes its own batch meanwhile."""
        submitted = []
        try:
            for route, sequence in work:
                submitted.append(self.submit(route, sequence))
            for sequence in submitted:
                sequence.done.wait()
        finally:
            for sequence in submitted:
                sequence.cancel()
        for sequence in submitted:
            if sequence.error is not None:
                raise sequence.error
        return submitted

    def logits(self, route: str, ids: list[int], logits_from: int | None = None) -> torch.Tensor:
        """Next-token logits after `ids` (rows from prompt position `logits_from` on; default the last)."""
        rows: list[torch.Tensor] = []

        def keep(logits: torch.Tensor) -> None:
            rows.append(logits)

        self.run(route, [Sequence(list(ids), keep, logits_from=logits_from)])
        return rows[0]

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._retired and not any(c.busy for c in self.routes.values()):
                    self._cond.wait()
                if self._closed:
                    return
                busy = [c for c in self._contexts() if c.busy]
                for context in busy:
                    context.admit()
            with self._stepping:  # outside the condition: a submit never waits for a decode
                for context in busy:
                    running = context.active()
                    decoded = context.step()
                    if self.on_step is not None:
                        self.on_step(running if decoded else 0)
                with self._cond:
                    idle = [c for c in self._retired if not c.busy]
                    self._retired = [c for c in self._retired if c.busy]
                    done = not any(c.busy for c in self._contexts())
                if done and self.on_step is not None:
                    self.on_step(0)  # the last rows left: nothing runs until the next submit
                for context in idle:
                    context.close()

    def _contexts(self) -> list[RouteContext]:
        return [*self.routes.values(), *self._retired]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
        for context in self._contexts():
            context.close()
        self.routes, self._retired = {}, []
        for weights in self._weights.values():
            weights.close()
        self._weights, self._shared_prefill = {}, {}
