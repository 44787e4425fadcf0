"""Admission control of `prism serve`: a bounded number of requests held (--max-batch-size running plus
--max-waiting queued), one more refused at once with 429 and Retry-After, a per-request deadline that aborts
the request and frees its place, and the queue's depth in /metrics and /health. The engine is the real
transformers PrismModel whose stream is held open by the test, so which request runs and which waits is known."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import pytest

from helpers import BASE_QUERIES, LiveServer, samples
from prism.inference.base import Completion, RouteDecision, StreamEvent
from prism.inference.transformers import PrismModel
from prism.serving.server import create_app


class HeldStream:
    """A batch's stream that routes every request at once and then holds it until the test releases the batch or
    every request in it is cancelled (a cancelled one ends as the engines end it: finish reason 'cancelled'), unless
    `deaf` (an engine that is slow to notice)."""

    def __init__(self):
        self.release = threading.Event()
        self.batches: list[int] = []
        self.deaf = False

    def __call__(self, requests):
        self.batches.append(len(requests))
        for index in range(len(requests)):
            yield StreamEvent(index, decision=RouteDecision("base", None, forced=True))
        while not self.release.is_set() and (self.deaf or not all(r.cancel.is_set() for r in requests)):
            time.sleep(0.01)
        for index, request in enumerate(requests):
            reason = "cancelled" if request.cancel.is_set() else "stop"
            yield StreamEvent(index, delta="ok", completion=Completion("ok", "base", None, True, 3, 1, reason))


@pytest.fixture()
def serve_held(tiny_run, monkeypatch):
    started = []

    def start(**config):
        model = PrismModel.from_run(tiny_run, device="cpu", max_model_len=256)
        held = HeldStream()
        monkeypatch.setattr(model, "stream", held)
        app = create_app(model, default_max_tokens=4, **config)
        live = LiveServer(app).start()
        http = httpx2.Client(base_url=live.url, timeout=60)
        started.append((live, http, held))
        return app.state.batcher, http, held

    yield start
    for live, http, held in started:
        held.release.set()
        http.close()
        live.stop()


def chat(http, stream=False):
    return http.post("/v1/chat/completions", json={
        "model": "prism", "messages": [{"role": "user", "content": BASE_QUERIES[0]}], "stream": stream})


def wait_for(condition, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


def test_a_full_server_refuses_at_once_with_429_and_retry_after_and_serves_again_after(serve_held):
    batcher, http, held = serve_held(max_batch_size=2, max_waiting=1)
    with ThreadPoolExecutor(3) as pool:
        running = [pool.submit(chat, http) for _ in range(2)]
        wait_for(lambda: batcher.running == 2, "two requests in the batch")
        waiting = pool.submit(chat, http)
        wait_for(lambda: batcher.in_flight == 3, "a third request held")
        assert (batcher.running, batcher.queued) == (2, 1)
        health = http.get("/health").json()
        assert (health["running"], health["waiting"]) == (2, 1)

        started = time.monotonic()
        refused = chat(http)
        assert time.monotonic() - started < 5, "refused at once, not after a wait"
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["Retry-After"]) >= 1
        error = refused.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "server_at_capacity"
        assert "--max-waiting" in error["message"]
        streamed = chat(http, stream=True)  # refused before any event: a plain 429, not a stream
        assert streamed.status_code == 429 and streamed.headers["content-type"].startswith("application/json")

        metrics = samples(http)
        assert metrics[("prism_requests_running", ())] == 2 and metrics[("prism_requests_waiting", ())] == 1
        assert metrics[("prism_requests_refused_total", (("reason", "at_capacity"),))] == 2
        assert metrics[("prism_requests_total", (("endpoint", "chat"), ("model", "prism"), ("route", "none"),
                                                 ("status", "429")))] == 2
        held.release.set()
        replies = [future.result() for future in running + [waiting]]
    assert [r.status_code for r in replies] == [200, 200, 200]
    wait_for(lambda: batcher.in_flight == 0, "every place freed")
    assert chat(http).status_code == 200  # room again
    assert held.batches == [2, 1, 1]


def test_a_request_past_its_deadline_is_aborted_with_503_and_its_place_freed(serve_held):
    batcher, http, held = serve_held(max_batch_size=1, max_waiting=4, request_timeout=0.5)
    reply = chat(http)
    assert reply.status_code == 503, reply.text
    assert reply.json()["error"]["code"] == "request_timeout" and int(reply.headers["Retry-After"]) >= 1
    wait_for(lambda: batcher.in_flight == 0, "the engine told to stop, and the place freed")

    held.deaf = True  # the running request outlives its deadline: the one queued behind it times out while waiting
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(chat, http)
        wait_for(lambda: batcher.running == 1, "the first request in the batch")
        queued = pool.submit(chat, http)
        replies = [first.result(), queued.result()]
    assert [r.status_code for r in replies] == [503, 503]
    assert batcher.in_flight == 2, "the client has its answer; the engine still holds the first, the queue the second"
    held.release.set()
    wait_for(lambda: batcher.in_flight == 0, "both places freed")
    assert held.batches == [1, 1], "the request that timed out while it waited never started"

    held.release.clear()
    held.deaf = False
    streamed = chat(http, stream=True)  # a stream already begun ends with the error event, then [DONE]
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert streamed.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "request_timeout"
    wait_for(lambda: batcher.in_flight == 0, "the stream's place freed")
    assert samples(http)[("prism_requests_refused_total", (("reason", "timeout"),))] == 4


@pytest.mark.parametrize("flags, needle", [({"max_waiting": -1}, "max_waiting must be 0 or more"),
                                           ({"request_timeout": 0}, "request_timeout must be a positive")])
def test_bad_admission_settings_are_refused_by_name(flags, needle):
    from prism.errors import PrismError
    from prism.serving.config import ServeConfig

    with pytest.raises(PrismError, match=needle):
        ServeConfig(**flags)
