"""Running `prism serve` in production, against a live server on loopback with real HTTP clients: Prometheus
metrics, the decision-only route endpoint, hot reload under load, and the request log."""

import json
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx2
import pytest
from safetensors.torch import load_file, save_file

from helpers import BASE_QUERIES, PERSONA_QUERIES, LiveServer, samples
from prism.inference.transformers import PrismModel
from prism.lm.gate import save_threshold
from prism.serving.reload import reload_on_sighup
from prism.serving.request_log import RequestLog
from prism.serving.server import create_app

KEY = "ops-key"


def ask(text):
    return [{"role": "user", "content": text}]


def scale_adapter(run, factor):
    """A retrained adapter, as far as the server can tell: every LoRA B matrix scaled."""
    path = run / "adapter" / "adapter_model.safetensors"
    weights = load_file(str(path))
    save_file({k: v * factor if "lora_B" in k else v for k, v in weights.items()}, str(path))


def delta(before, after, name, **labels):
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


@pytest.fixture()
def served(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    model = PrismModel.from_run(run, device="cpu", max_model_len=256)
    log = RequestLog(tmp_path / "requests.jsonl")
    live = LiveServer(create_app(model, api_key=KEY, max_batch_size=8, default_max_tokens=8, request_log=log)).start()
    http = httpx2.Client(base_url=live.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    yield SimpleNamespace(run=run, model=model, live=live, http=http, log=tmp_path / "requests.jsonl")
    http.close()
    live.stop()
    log.close()


def chat(http, query, model="prism", **extra):
    return http.post("/v1/chat/completions", json={"model": model, "messages": ask(query), "temperature": 0,
                                                   "max_tokens": 6, **extra})


def test_metrics_move_by_the_right_amounts_after_known_requests(served):
    http = served.http
    assert httpx2.get(served.live.url + "/metrics").status_code == 401  # the API key guards them too
    before = samples(http)
    replies = [chat(http, q) for q in (PERSONA_QUERIES[0], PERSONA_QUERIES[1], BASE_QUERIES[0])]
    forced = chat(http, PERSONA_QUERIES[0], model="prism-base")
    missing = chat(http, BASE_QUERIES[0], model="no-such-model")
    with http.stream("POST", "/v1/chat/completions", json={
            "model": "prism", "messages": ask(PERSONA_QUERIES[0]), "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}) as streamed:
        events = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: {")]
    after = samples(http)

    assert [r.json()["prism"]["route"] for r in replies] == ["persona", "persona", "base"]
    assert missing.status_code == 404 and forced.json()["prism"]["route"] == "base"
    requests = "prism_requests_total"
    assert delta(before, after, requests, endpoint="chat", model="prism", route="persona", status="200") == 3
    assert delta(before, after, requests, endpoint="chat", model="prism", route="base", status="200") == 1
    assert delta(before, after, requests, endpoint="chat", model="prism-base", route="base", status="200") == 1
    assert delta(before, after, requests, endpoint="chat", model="no-such-model", route="none", status="404") == 1
    assert delta(before, after, "prism_gate_probability_count", endpoint="chat") == 4  # forced routes excluded
    assert delta(before, after, "prism_request_latency_seconds_count", endpoint="chat") == 6
    usage = [r.json()["usage"] for r in replies + [forced]] + [events[-1]["usage"]]
    routes = [r.json()["prism"]["route"] for r in replies + [forced]] + ["persona"]
    for route in ("persona", "base"):
        mine = [u for u, r in zip(usage, routes) if r == route]
        assert delta(before, after, "prism_prompt_tokens_total", route=route) == sum(u["prompt_tokens"] for u in mine)
        assert delta(before, after, "prism_completion_tokens_total", route=route) == sum(
            u["completion_tokens"] for u in mine)
    assert delta(before, after, "prism_time_to_first_token_seconds_count") == sum(u["completion_tokens"] > 0
                                                                                  for u in usage)
    steps = delta(before, after, "prism_batch_size_count")  # one per decode step
    assert steps >= sum(u["completion_tokens"] for u in usage)
    assert delta(before, after, "prism_batch_size_sum") == steps  # one request at a time: every step decoded one
    assert after[("prism_gate_threshold", ())] == 0.5


def test_route_endpoint_agrees_with_the_route_chat_then_takes(served):
    http = served.http
    queries = PERSONA_QUERIES + BASE_QUERIES
    batch = http.post("/v1/route", json={"batch": [ask(q) for q in queries]}).json()["data"]
    for query, batched in zip(queries, batch):
        decided = http.post("/v1/route", json={"messages": ask(query)}).json()
        taken = chat(http, query).json()["prism"]
        assert decided["route"] == taken["route"] == batched["route"]
        assert decided["gate_probability"] == pytest.approx(taken["gate_probability"], abs=1e-5)
        assert decided["threshold"] == taken["threshold"] == 0.5 and decided["forced"] is False
    assert {d["route"] for d in batch} == {"persona", "base"}
    forced = http.post("/v1/route", json={"model": "prism-persona", "messages": ask(BASE_QUERIES[0])}).json()
    assert forced == {"route": "persona", "gate_probability": None, "forced": True, "threshold": 0.5}
    # validated and answered like the chat endpoint
    both = http.post("/v1/route", json={"messages": ask("a"), "batch": [ask("b")]})
    assert both.status_code == 422 and both.json()["error"]["code"] == "invalid_value"
    no_user = http.post("/v1/route", json={"messages": [{"role": "system", "content": "hi"}]})
    assert no_user.status_code == 400 and "no user message" in no_user.json()["error"]["message"]
    assert http.post("/v1/route", json={"model": "nope", "messages": ask("a")}).status_code == 404
    assert httpx2.post(served.live.url + "/v1/route", json={"messages": ask("a")}).status_code == 401


def test_a_reload_under_load_loses_nothing_and_later_requests_use_the_new_run(served):
    http = served.http
    tokens = 32
    old_text = chat(http, PERSONA_QUERIES[0], model="prism-persona", max_tokens=tokens).json()
    old_text = old_text["choices"][0]["message"]["content"]
    scale_adapter(served.run, 4.0)
    save_threshold(served.run / "gate", 0.99)
    new_text = PrismModel.from_run(served.run, device="cpu").generate(PERSONA_QUERIES[0], route="persona",
                                                                       max_tokens=tokens).text
    assert new_text != old_text  # the new adapter visibly changes the reply
    done: list[tuple[float, float, int, dict]] = []
    lock = threading.Lock()

    def one(i):
        started = time.monotonic()
        reply = chat(http, PERSONA_QUERIES[0], model="prism" if i % 2 else "prism-persona", max_tokens=tokens)
        with lock:
            done.append((started, time.monotonic(), reply.status_code, reply.json()))

    with ThreadPoolExecutor(max_workers=16) as pool:  # bounded: 16 requests in flight at most
        futures = [pool.submit(one, i) for i in range(64)]
        while len(done) < 16:
            time.sleep(0.005)
        reload_started = time.monotonic()
        reload = http.post("/admin/reload")
        reload_ended = time.monotonic()
        for future in futures:
            future.result()
    assert reload.status_code == 200 and reload.json()["threshold"] == 0.99
    assert [status for _, _, status, _ in done] == [200] * 64  # no request lost
    in_flight = [r for r in done if r[0] < reload_started and r[1] > reload_started]
    assert len(in_flight) >= 4, "the reload must happen with requests in flight"
    texts = [body["choices"][0]["message"]["content"] for *_, body in done if body["model"] == "prism-persona"]
    assert set(texts) <= {old_text, new_text}  # each request ran on one adapter, never on a mix
    later = [body for started, _, _, body in done if started > reload_ended]
    assert later, "some requests must start after the reload"
    for body in later:
        assert body["prism"]["threshold"] == 0.99
        if body["model"] == "prism-persona":
            assert body["choices"][0]["message"]["content"] == new_text
    gated = chat(http, PERSONA_QUERIES[0]).json()["prism"]
    assert gated["route"] == ("persona" if gated["gate_probability"] >= 0.99 else "base")


def test_a_bad_reload_keeps_the_old_run_serving(served):
    http = served.http
    before = chat(http, PERSONA_QUERIES[0], model="prism-persona").json()["choices"][0]["message"]["content"]
    config = served.run / "gate" / "config.json"
    good_config = config.read_text()
    config.write_text("{not json")
    bad_gate = http.post("/admin/reload")
    config.write_text(good_config)
    weights = served.run / "adapter" / "adapter_model.safetensors"
    good_weights = weights.read_bytes()
    tensors = load_file(str(weights))
    save_file({k: v[:, :-1].contiguous() if "lora_A" in k else v for k, v in tensors.items()}, str(weights))
    bad_adapter = http.post("/admin/reload")
    weights.write_bytes(good_weights)

    for reply, why in ((bad_gate, "cannot load the gate"), (bad_adapter, "does not fit the base model")):
        error = reply.json()["error"]
        assert reply.status_code == 409 and error["type"] == "reload_error"
        assert why in error["message"] and "keeps serving" in error["message"]
    after = chat(http, PERSONA_QUERIES[0], model="prism-persona")
    assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == before
    assert served.model.threshold == 0.5
    assert samples(http)[("prism_reloads_total", (("outcome", "failed"),))] == 2
    assert http.post("/admin/reload").status_code == 200  # the run as it was: reloads again


def test_sighup_reloads_the_run(served):
    save_threshold(served.run / "gate", 0.25)
    previous = signal.getsignal(signal.SIGHUP)
    reload_on_sighup(served.live.app.state.reload)
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 30
        # the reload counts itself last, after the new gates are in: wait for the count, not the threshold
        while served.model.reloads < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert served.model.threshold == 0.25 and served.model.reloads == 1


def test_the_request_log_has_one_line_per_request_without_prompts(served):
    http = served.http
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda q: chat(http, q), (PERSONA_QUERIES + BASE_QUERIES) * 4))
    http.post("/v1/route", json={"messages": ask(BASE_QUERIES[0])})
    chat(http, "hi", model="missing")
    lines = served.log.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line whole, none interleaved
    assert len(records) == 16 + 2
    chats = [r for r in records if r["endpoint"] == "chat" and r["status"] == 200]
    assert len(chats) == 16 and {r["route"] for r in chats} == {"persona", "base"}
    for r in chats:
        assert r["model"] == "prism" and r["threshold"] == 0.5 and r["forced"] is False
        assert r["prompt_tokens"] > 0 and r["completion_tokens"] >= 0 and r["latency_s"] > 0
    assert [r["status"] for r in records if r["endpoint"] == "chat" and r["status"] != 200] == [404]
    assert [r["route"] for r in records if r["endpoint"] == "route"] == ["base"]
    text = served.log.read_text()
    assert all(q not in text for q in PERSONA_QUERIES + BASE_QUERIES) and "messages" not in text


def test_log_prompts_keeps_the_messages(tiny_run, tmp_path):
    model = PrismModel.from_run(tiny_run, device="cpu", max_model_len=256)
    log = RequestLog(tmp_path / "log.jsonl", log_prompts=True)
    live = LiveServer(create_app(model, default_max_tokens=4, request_log=log, metrics=False)).start()
    try:
        reply = httpx2.post(live.url + "/v1/chat/completions", json={"model": "prism", "messages": ask("Hello")},
                            timeout=60)
        assert httpx2.get(live.url + "/metrics").status_code == 404  # metrics off
    finally:
        live.stop()
        log.close()
    record = json.loads((tmp_path / "log.jsonl").read_text())
    assert reply.status_code == 200 and record["messages"] == ask("Hello")


def test_concurrent_writers_never_interleave(tmp_path):
    log = RequestLog(tmp_path / "log.jsonl")
    long = "x" * 5000

    def write(i):
        for j in range(50):
            log.write({"writer": i, "n": j, "pad": long})

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(records) == 400 and {(r["writer"], r["n"]) for r in records} == {(i, j) for i in range(8)
                                                                                for j in range(50)}
