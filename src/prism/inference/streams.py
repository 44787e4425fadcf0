"""A request as an async stream of its events (`GatedModel.generate_async`), what `prism serve` awaits once per
request: the backend schedules it into its running batch (`submit`, from its own decoding thread); this module
only carries the events to the event loop.

`Intake` is the one thread per model that hands the backend the requests that arrived meanwhile, together (their
routes come from one gate pass, which would block the event loop), and that delivers a decode step's events to the
loop in one wake-up (`EventPost`)."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# what the engine hands a request's stream: its next event (inference.base.StreamEvent), or the error that ended it
Emit = Callable[[Any], None]


class EventPost:
    """Hands events from other threads to the event loop, with one wake-up for many. The decoding thread's events
    wait for the end of its step (`flush`, from that thread): woken at each one, the loop took the interpreter
    from the decoding thread between any two of its calls into C, and a token's work between two decodes took
    849 us against 314 this way (32 streaming clients on llama.cpp, the 2-core development machine)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._pending: list[tuple[asyncio.Queue, Any]] = []
        self._scheduled = False  # a delivery is on its way: it takes what is pending when it runs
        self._flusher: int | None = None  # the thread whose events wait for its flush (the decoding thread)
        self._lock = threading.Lock()

    def put(self, events: asyncio.Queue, item: Any) -> None:
        with self._lock:
            self._pending.append((events, item))
            if self._scheduled or threading.get_ident() == self._flusher:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def flush(self) -> None:
        """Deliver what is pending; from now on the calling thread's events wait for its next flush."""
        with self._lock:
            self._flusher = threading.get_ident()
            if self._scheduled or not self._pending:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, [], False
        for events, item in pending:
            events.put_nowait(item)


class RequestTimedOut(Exception):
    """A request outlived its deadline (it is aborted: its place in the batch is freed at the next step)."""


@dataclass
class RequestStream:
    """One request's events (its route, its text deltas, its completion) as the engine produces them:
    `async for event in stream`, or `await stream.next()`. `abort()` ends it early; leaving it unread does not."""

    request: Any  # inference.base.GenerationRequest, with its cancel event
    post: EventPost
    on_end: Callable[[RequestStream], None] | None = None  # told once, when the engine is done with the request
    deadline: float | None = None  # time.monotonic() past which the request is aborted
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.monotonic)
    ended: bool = False

    def put(self, item: Any) -> None:
        """From the engine's thread: the next event, or the error that ended or refused the request."""
        if isinstance(item, Exception) or item.completion is not None:
            self.end()
        self.post.put(self.events, item)

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            if self.on_end is not None:
                self.on_end(self)

    def abort(self) -> None:
        """Stop the request: a waiting one never starts, a running one leaves the batch at the next step."""
        self.request.cancel.set()  # Intake.open gives every request one

    async def next(self) -> Any:
        """The request's next event; raises the error that ended it, or RequestTimedOut past its deadline
        (having aborted it)."""
        if self.deadline is None:
            item = await self.events.get()
        else:
            try:
                item = await asyncio.wait_for(self.events.get(), max(0.0, self.deadline - time.monotonic()))
            except TimeoutError:
                self.abort()
                raise RequestTimedOut from None
        if isinstance(item, Exception):
            raise item
        return item

    async def __aiter__(self) -> AsyncIterator[Any]:
        while True:
            event = await self.next()
            yield event
            if event.completion is not None:
                return


class Intake:
    """Hands a model the requests that arrived meanwhile, from one thread of its own, and tells the event loop at
    each decode step. `running` is the last step's size, `steps` the steps that decoded something; `on_step`, when
    set, is told each step's size (a batch-size histogram)."""

    def __init__(self, submit: Callable[[list[Any], Sequence[Emit]], None],
                 observe_steps: Callable[[Callable[[int], None]], None]):
        self.submit = submit  # the model's: requests and, for each, where its events go
        self.observe_steps = observe_steps
        self.waiting: queue.Queue[RequestStream | None] = queue.Queue()
        self.running = 0
        self.steps = 0
        self.on_step: Callable[[int], None] | None = None
        self._post: EventPost | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def open(self, request: Any, on_end: Callable[[RequestStream], None] | None,
             deadline: float | None) -> RequestStream:
        """From the event loop: the request's stream, its request queued for the model."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._post is None or self._post.loop is not loop:  # a server may run again, on another loop
                self._post = EventPost(loop)
            if self._thread is None:
                self.observe_steps(self._observed)
                self._thread = threading.Thread(target=self._work, name="prism-intake", daemon=True)
                self._thread.start()
        if request.cancel is None:
            request.cancel = threading.Event()
        stream = RequestStream(request, self._post, on_end, deadline)
        self.waiting.put(stream)
        return stream

    def close(self) -> None:
        if self._thread is not None:
            self.waiting.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def _work(self) -> None:
        while (first := self.waiting.get()) is not None:
            streams = [first]
            while True:  # the requests that arrived meanwhile go with it: their routes in one gate pass
                try:
                    stream = self.waiting.get_nowait()
                except queue.Empty:
                    break
                if stream is None:
                    self.waiting.put(None)  # stop after these
                    break
                streams.append(stream)
            live = []
            for stream in streams:
                if stream.request.cancel.is_set():  # aborted while it waited
                    stream.end()
                else:
                    live.append(stream)
            try:
                if live:
                    self.submit([s.request for s in live], [s.put for s in live])
            except Exception as exc:  # noqa: BLE001 - told to these requests; the thread goes on
                for stream in live:
                    stream.put(exc)

    def _observed(self, size: int) -> None:
        self.running = size
        if size:  # counted before the step's events go out: a client that has its reply sees its steps counted
            self.steps += 1
            if self.on_step is not None:
                self.on_step(size)
        if self._post is not None:
            self._post.flush()  # the step's events, in one delivery
