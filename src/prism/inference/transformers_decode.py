"""The transformers backend's decode loop, apart from its adapters and routing (`PrismModel`): the rows decoding
together (`DecodeBatch`: their KV cache, attention mask, positions and each row's sampling state) and the thread
that lets waiting requests join that batch between two decode steps (`DecodeThread`, continuous batching as on
llama.cpp: a request never waits for the batch in front of it to finish).

Rows join with their own prefill: its KV cache and mask are left-padded to the running batch's length and
concatenated to it (each row keeps its own positions, so the padding changes no row's attention). Columns that
only padding uses are cut when the rows that needed them leave. A model whose cache is not a plain growing one
(sliding windows, recurrent states) cannot be padded this way: its requests are admitted when the batch is empty.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from prism.errors import PrismError
from prism.inference.base import GenerationRequest, RouteDecision, StreamEvent, decode_step
from prism.lm.decoding import TextStream, sample_tokens
from prism.lm.models import output_cache

# one decode pass: (each row's PEFT adapter name, each row's next token, attention mask, each row's position, cache)
DecodePass = Callable[[list[str | None], torch.Tensor, torch.Tensor, torch.Tensor, Any], Any]


class RequestCancelled(PrismError):
    """A request cancelled (client gone, deadline passed) before it left the queue: it never ran."""


@dataclass
class Row:
    """One request in the batch: where its events go and what it has decoded so far."""

    index: int  # the request's index in its stream (0 for a request submitted alone)
    request: GenerationRequest
    decision: RouteDecision
    adapter: str | None  # the PEFT adapter name it runs with (None: base)
    prompt_tokens: int
    emit: Callable[[StreamEvent | BaseException], None]
    text: TextStream
    release: Callable[[], None] | None = None  # told once when the row leaves (its adapter set is free to drop)
    logprobs: list[dict[str, Any]] | None = field(init=False)
    generator: torch.Generator | None = field(init=False)

    def __post_init__(self) -> None:
        self.logprobs = [] if self.request.params.logprobs is not None else None
        self.generator = self.request.params.generator()

    def leave(self, error: BaseException | None = None) -> None:
        if error is not None:
            self.emit(error)
        if self.release is not None:
            self.release()
            self.release = None


def paddable(cache: Any) -> bool:
    """Whether rows of another prefill can be left-padded into this cache (every layer a plain growing one)."""
    return all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))


def _pad_left(values: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - values.shape[dim]
    if missing == 0:
        return values
    shape = list(values.shape)
    shape[dim] = missing
    return torch.cat([values.new_zeros(shape), values], dim=dim)


class DecodeBatch:
    """The rows decoding together and their shared state; `step` decodes one token for every row."""

    def __init__(self, decode_pass: DecodePass, eos_ids: set[int]):
        self.decode_pass = decode_pass
        self.eos_ids = eos_ids
        self.rows: list[Row] = []
        self.cache: Any = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.last_position = torch.zeros(0, dtype=torch.long)
        self.logits = torch.zeros(0, 0)  # each row's next-token logits, not sampled yet

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def joinable(self) -> bool:
        """Whether rows may join now: the batch is empty, or its cache can be padded to theirs."""
        return not self.rows or paddable(self.cache)

    def join(self, rows: list[Row], cache: Any, mask: torch.Tensor, positions: torch.Tensor,
             logits: torch.Tensor) -> None:
        """Rows just prefilled (left-padded, `positions` their position ids) join with their cache and logits."""
        if not self.rows:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            self.last_position, self.logits = positions[:, -1], logits
            return
        if not (paddable(self.cache) and paddable(cache)):
            raise PrismError("this model's KV cache cannot take rows of another prefill: admit them when the batch "
                             "is empty")
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width, -2), _pad_left(theirs.keys, width, -2)])
            mine.values = torch.cat([_pad_left(mine.values, width, -2), _pad_left(theirs.values, width, -2)])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.last_position = torch.cat([self.last_position, positions[:, -1]])
        self.logits = torch.cat([self.logits, logits.to(self.logits.dtype)])
        self.rows += rows

    def step(self) -> int:
        """Sample every row's next token and emit its events; finished rows leave, the others decode the token.
        Returns how many rows were sampled."""
        rows = self.rows
        sampled = sample_tokens(self.logits, [row.request.params for row in rows], [row.generator for row in rows])
        keep, tokens = [], []
        for i, (row, token) in enumerate(zip(rows, sampled)):
            events = decode_step(row.index, row.request, row.decision, row.text, row.logprobs, token, self.logits[i],
                                 self.eos_ids, row.prompt_tokens)
            for event in events:
                row.emit(event)
            if events and events[-1].completion is not None:
                row.leave()
            else:
                keep.append(i)
                tokens.append(token)
        self._keep(keep)
        if self.rows:
            self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=self.mask.dtype)], dim=1)
            self.last_position = self.last_position + 1
            out = self.decode_pass([row.adapter for row in self.rows], torch.tensor(tokens), self.mask,
                                   self.last_position, self.cache)
            self.cache, self.logits = output_cache(out), out.logits[:, -1]
        return len(rows)

    def fail(self, error: BaseException) -> None:
        """Every row ends with `error` (a decode pass failed: the batch's state is not to be trusted)."""
        rows, self.rows, self.cache = self.rows, [], None
        for row in rows:
            row.leave(error)

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = None
            return
        index = torch.tensor(keep)
        self.cache.batch_select_indices(index.to(self.logits.device))
        self.mask, self.last_position, self.logits = self.mask[index], self.last_position[index], self.logits[index]
        start = int(self.mask.any(0).int().argmax())  # columns before it are padding in every row left
        if start and paddable(self.cache):
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
            self.mask = self.mask[:, start:]


@dataclass
class Waiting:
    request: GenerationRequest
    emit: Callable[[StreamEvent | BaseException], None]


class DecodeThread:
    """One thread decodes the batch; requests wait in a queue until it has room (`max_rows`), then join it
    between two steps, prefilled together by `admit`. `join_running` False admits only into an empty batch
    (batch by batch: what PrismModel did before, kept to measure against)."""

    def __init__(self, batch: DecodeBatch, admit: Callable[[DecodeBatch, list[Waiting]], None], max_rows: int,
                 join_running: bool = True):
        self.batch = batch
        self.admit = admit
        self.max_rows = max_rows
        self.join_running = join_running
        self.on_step: Callable[[int], None] | None = None
        self.waiting: deque[Waiting] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, items: list[Waiting]) -> None:
        with self._cond:
            if self._closed:
                raise PrismError("this model was closed")
            self.waiting.extend(items)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="prism-transformers", daemon=True)
                self._thread.start()
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)

    def _take(self) -> list[Waiting] | None:
        """The waiting requests that join now (None: closed)."""
        with self._cond:
            while not self._closed and not self.waiting and not self.batch.rows:
                self._cond.wait()
            if self._closed:
                return None
            room = self.max_rows - len(self.batch)
            if self.batch.rows and not (self.join_running and self.batch.joinable):
                room = 0
            return [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]

    @torch.no_grad()
    def _work(self) -> None:
        while (taken := self._take()) is not None:
            live = []
            for item in taken:
                cancel = item.request.cancel
                if cancel is not None and cancel.is_set():
                    item.emit(RequestCancelled("the request was cancelled before it started"))
                else:
                    live.append(item)
            if live:
                try:
                    self.admit(self.batch, live)
                except Exception as exc:  # noqa: BLE001 - these requests' error; the running rows go on
                    for item in live:
                        item.emit(exc)
            size = 0
            if self.batch.rows:
                try:
                    size = self.batch.step()
                except Exception as exc:  # noqa: BLE001 - the batch's error, told to its rows; the thread goes on
                    self.batch.fail(exc)
            if self.on_step is not None:
                self.on_step(size)
                if size and not self.batch.rows:
                    self.on_step(0)
