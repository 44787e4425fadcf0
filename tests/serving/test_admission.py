"""Admission control of `prism serve`: a bounded number of requests held (--max-batch-size running plus
--max-waiting queued), one more refused at once with 429 and Retry-After, a per-request deadline that aborts
the request and frees its place, and the queue's depth in /metrics and /health. The engine is the real
transformers PrismModel whose decode passes are held by the test, so which request runs and which waits is known."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import pytest

from helpers import BASE_QUERIES, LiveServer, samples
from prism.inference.transformers import PrismModel
from prism.serving.server import create_app


class HeldDecoding:
    """Holds the real engine's decode passes: the rows in the batch are reported running (as a finished step
    reports them), then the pass waits until the test releases it, every row in it is cancelled (a cancelled one
    then ends as the engine ends it: finish reason 'cancelled'), unless `deaf` (an engine slow to notice), or a
    request waits while the batch has room (it joins at the next step).
    `prefilled` counts the requests that started (joined the batch)."""

    def __init__(self, model: PrismModel):
        self.release = threading.Event()
        self.deaf = False
        self.prefilled = 0
        decoder, decode_pass, prefill = model.decoder, model.decoder.batch.decode_pass, model._prefill

        def held_prefill(requests, *args, **kwargs):
            self.prefilled += len(requests)
            return prefill(requests, *args, **kwargs)

        def held_pass(*args):
            rows = decoder.batch.rows
            decoder.on_step(len(rows))
            while not self.release.is_set() and (self.deaf or not all(r.request.cancel.is_set() for r in rows)):
                if decoder.waiting and len(rows) < decoder.max_rows:
                    break  # room for a request that arrived meanwhile: it joins at the next step
                time.sleep(0.01)
            return decode_pass(*args)

        model._prefill = held_prefill
        decoder.batch.decode_pass = held_pass


@pytest.fixture()
def serve_held(tiny_run):
    started = []

    def start(**config):
        model = PrismModel.from_run(tiny_run, device="cpu", max_model_len=256, max_num_seqs=config["max_batch_size"])
        held = HeldDecoding(model)
        app = create_app(model, default_max_tokens=4, **config)
        live = LiveServer(app).start()
        http = httpx2.Client(base_url=live.url, timeout=60)
        started.append((live, http, held, model))
        return app.state.admission, http, held

    yield start
    for live, http, held, model in started:
        held.release.set()
        http.close()
        live.stop()
        model.close()


def chat(http, stream=False):
    return http.post("/v1/chat/completions", json={
        "model": "prism", "messages": [{"role": "user", "content": BASE_QUERIES[0]}], "stream": stream})


def wait_for(condition, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


def test_a_full_server_refuses_at_once_with_429_and_retry_after_and_serves_again_after(serve_held):
    admission, http, held = serve_held(max_batch_size=2, max_waiting=1)
    with ThreadPoolExecutor(3) as pool:
        running = [pool.submit(chat, http) for _ in range(2)]
        wait_for(lambda: admission.running == 2, "two requests in the batch")
        waiting = pool.submit(chat, http)
        wait_for(lambda: admission.in_flight == 3, "a third request held")
        assert (admission.running, admission.queued) == (2, 1)
        assert held.prefilled == 2, "the third waits for a free row: it has not started"
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
    wait_for(lambda: admission.in_flight == 0, "every place freed")
    assert chat(http).status_code == 200  # room again
    assert held.prefilled == 4


def test_a_request_past_its_deadline_is_aborted_with_503_and_its_place_freed(serve_held):
    admission, http, held = serve_held(max_batch_size=1, max_waiting=4, request_timeout=0.5)
    reply = chat(http)
    assert reply.status_code == 503, reply.text
    assert reply.json()["error"]["code"] == "request_timeout" and int(reply.headers["Retry-After"]) >= 1
    wait_for(lambda: admission.in_flight == 0, "the engine told to stop, and the place freed")

    held.deaf = True  # the running request outlives its deadline: the one queued behind it times out while waiting
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(chat, http)
        wait_for(lambda: admission.running == 1, "the first request in the batch")
        queued = pool.submit(chat, http)
        replies = [first.result(), queued.result()]
    assert [r.status_code for r in replies] == [503, 503]
    assert admission.in_flight == 2, "the client has its answer; the engine still holds the first, the queue the second"
    held.release.set()
    wait_for(lambda: admission.in_flight == 0, "both places freed")
    assert held.prefilled == 2, "the request that timed out while it waited never started"

    held.release.clear()
    held.deaf = False
    streamed = chat(http, stream=True)  # a stream already begun ends with the error event, then [DONE]
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert streamed.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "request_timeout"
    wait_for(lambda: admission.in_flight == 0, "the stream's place freed")
    assert samples(http)[("prism_requests_refused_total", (("reason", "timeout"),))] == 4


def send_then_hang_up(http, until):
    """A non-streaming chat request on a raw connection, closed once `until()` holds (before any reply)."""
    body = json.dumps({"model": "prism", "messages": [{"role": "user", "content": BASE_QUERIES[0]}]}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((http.base_url.host, http.base_url.port)) as connection:
        connection.sendall(head + body)
        wait_for(until, "the request admitted")


def test_a_client_that_hangs_up_is_aborted_running_or_waiting(serve_held):
    """A non-streaming request whose client closes the connection leaves the batch at the next step (the held pass
    ends only when its row is cancelled) or, waiting, never starts; both are logged as 499."""
    admission, http, held = serve_held(max_batch_size=1, max_waiting=2)

    def hung_up() -> int:
        return sum(value for (name, labels), value in samples(http).items()
                   if name == "prism_requests_total" and ("status", "499") in labels)

    send_then_hang_up(http, lambda: admission.running == 1)
    wait_for(lambda: admission.in_flight == 0, "the running request aborted and its place freed", timeout=15)
    assert hung_up() == 1
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(chat, http)
        wait_for(lambda: admission.running == 1, "a request in the batch")
        send_then_hang_up(http, lambda: admission.queued == 1)
        wait_for(lambda: hung_up() == 2, "the waiting request's hang-up noticed", timeout=15)
        held.release.set()
        assert running.result().status_code == 200
    wait_for(lambda: admission.in_flight == 0, "every place freed")
    assert held.prefilled == 2, "the request that waited never started"


@pytest.mark.parametrize("flags, needle", [({"max_waiting": -1}, "max_waiting must be 0 or more"),
                                           ({"request_timeout": 0}, "request_timeout must be a positive")])
def test_bad_admission_settings_are_refused_by_name(flags, needle):
    from prism.errors import PrismError
    from prism.serving.config import ServeConfig

    with pytest.raises(PrismError, match=needle):
        ServeConfig(**flags)
