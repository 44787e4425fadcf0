"""Continuous batching on transformers (`PrismModel.submit`): a request joins the batch already decoding at its
next step, not after it, and gets the tokens it gets alone, also after the rows it was padded to have left; a
cancelled request leaves at the next step, one cancelled while it waits never starts."""

import asyncio
import threading
import time

import pytest

from helpers import BASE_QUERIES, PERSONA_QUERIES
from prism.inference.base import GenerationRequest
from prism.inference.transformers import PrismModel
from prism.inference.transformers_decode import RequestCancelled
from prism.lm.decoding import SamplingParams

LONG_PROMPT = " ".join([PERSONA_QUERIES[1]] * 6)  # pads every row that joins beside it


def request(text: str, route: str, max_tokens: int) -> GenerationRequest:
    return GenerationRequest([{"role": "user", "content": text}], route,
                             SamplingParams(max_tokens=max_tokens, ignore_eos=True), cancel=threading.Event())


class Received:
    """One request's events, in order, with the time each came."""

    def __init__(self):
        self.events: list = []
        self.done = threading.Event()

    def put(self, event) -> None:
        self.events.append((time.monotonic(), event))
        if isinstance(event, BaseException) or event.completion is not None:
            self.done.set()

    @property
    def deltas(self) -> int:
        return sum(1 for _, e in self.events if not isinstance(e, BaseException) and e.delta)

    @property
    def completion(self):
        return self.events[-1][1].completion

    def first_text_at(self) -> float:
        return next(t for t, e in self.events if e.delta)

    def wait(self) -> None:
        assert self.done.wait(120), "the request never ended"


@pytest.fixture()
def model(tiny_run):
    model = PrismModel.from_run(tiny_run, device="cpu", max_num_seqs=4)
    yield model
    model.close()


def submit(model, *requests) -> list[Received]:
    received = [Received() for _ in requests]
    model.submit(list(requests), [r.put for r in received])
    return received


def test_a_request_joins_the_running_batch_and_gets_what_it_gets_alone(model):
    """The first request (a long prompt) decodes; two more join it at a step, padded to its length; it leaves
    before them, and its padding columns are cut; each still gets the same tokens as alone."""
    long_one = request(LONG_PROMPT, "persona", 16)
    joining = [request(BASE_QUERIES[0], "base", 40), request(PERSONA_QUERIES[0], "auto", 40)]
    alone = [model.generate_batch([r])[0] for r in [long_one, *joining]]
    steps: list[int] = []
    model.observe_steps(steps.append)

    first = submit(model, long_one)[0]
    while first.deltas < 3:
        assert not first.done.is_set(), "the first request ended before the others could join"
        time.sleep(0.001)
    others = submit(model, *joining)
    for received in [first, *others]:
        received.wait()

    finished_at = first.events[-1][0]
    assert all(other.first_text_at() < finished_at for other in others), "they waited for the batch to finish"
    deadline = time.monotonic() + 30
    while steps[-1] != 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert max(steps) == 3 and steps[-1] == 0, "after the last row left the engine says nothing runs"
    for received, reference in zip([first, *others], alone):
        assert (received.completion.text, received.completion.route) == (reference.text, reference.route)
    assert model.decoder.batch.rows == [] and model.decoder.batch.cache is None


def test_a_cancelled_request_leaves_at_the_next_step_and_one_cancelled_while_waiting_never_starts(model):
    model.decoder.max_rows = 1
    running, waiting = request(BASE_QUERIES[1], "base", 200), request(BASE_QUERIES[0], "base", 4)
    first, second = submit(model, running, waiting)
    while first.deltas < 2:
        time.sleep(0.001)
    waiting.cancel.set()
    running.cancel.set()
    first.wait()
    second.wait()
    assert first.completion.finish_reason == "cancelled" and first.completion.completion_tokens < 200
    assert isinstance(second.events[-1][1], RequestCancelled) and len(second.events) == 1
    again = submit(model, request(BASE_QUERIES[0], "base", 4))[0]
    again.wait()
    assert again.completion.completion_tokens == 4


def test_a_request_the_model_cannot_serve_is_refused_alone(model):
    too_long, fine = request(BASE_QUERIES[0], "base", 10_000), request(BASE_QUERIES[0], "base", 3)
    refused, served = submit(model, too_long, fine)
    served.wait()
    assert "maximum context length" in str(refused.events[-1][1])
    assert served.completion.completion_tokens == 3


def test_generate_async_is_one_request_as_an_async_stream_and_abort_stops_it(model):
    async def run():
        whole = [event async for event in model.generate_async(request(BASE_QUERIES[0], "base", 5))]
        long = model.generate_async(request(BASE_QUERIES[1], "base", 500))
        started = [await long.next(), await long.next()]  # its route, its first text
        model.abort(long)
        return whole, started, [event async for event in long]

    whole, started, rest = asyncio.run(run())
    assert whole[0].decision.route == "base" and whole[-1].completion.completion_tokens == 5
    assert "".join(e.delta for e in whole) == whole[-1].completion.text
    assert started[0].decision is not None and started[1].delta
    assert rest[-1].completion.finish_reason == "cancelled" and rest[-1].completion.completion_tokens < 500
