"""The OpenAI-compatible server, live on loopback, driven by the official openai client and raw HTTP."""

import json
import logging
import subprocess
import sys
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from helpers import BASE_QUERIES, PERSONA_QUERIES, LiveServer, free_port
from prism.errors import ContextLengthError, PrismError
from prism.inference.base import GenerationRequest
from prism.inference.transformers import PrismModel
from prism.lm.decoding import SamplingParams
from prism.serving.server import create_app, wait_until_healthy

API_KEY = "test-key"


@pytest.fixture(scope="module")
def server(tiny_run):
    model = PrismModel.from_run(tiny_run, device="cpu", max_model_len=256)
    app = create_app(model, api_key=API_KEY, max_batch_size=8, default_max_tokens=16)
    live = LiveServer(app).start()
    yield {"url": live.url, "model": model, "app": app}
    live.stop()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=API_KEY, max_retries=0)


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_completion_matches_the_in_process_model_and_reports_the_route(server, client):
    raw = client.chat.completions.with_raw_response.create(
        model="prism", messages=ask(PERSONA_QUERIES[0]), temperature=0, max_tokens=10)
    reply = raw.parse()
    expected = server["model"].generate(PERSONA_QUERIES[0], max_tokens=10)
    assert reply.choices[0].message.content == expected.text
    assert reply.model_extra["prism"]["route"] == "persona" == raw.headers["x-prism-route"]
    assert reply.model_extra["prism"]["gate_probability"] == pytest.approx(expected.gate_probability, abs=1e-5)
    assert reply.usage.completion_tokens == expected.completion_tokens
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")


def test_forced_route_models(client):
    for name, route in (("prism-base", "base"), ("prism-persona", "persona")):
        reply = client.chat.completions.create(model=name, messages=ask(PERSONA_QUERIES[0]), temperature=0,
                                               max_tokens=4)
        assert reply.model_extra["prism"] == {"route": route, "gate_probability": None, "forced": True,
                                              "threshold": 0.5}
    assert {m.id for m in client.models.list()} == {"prism", "prism-base", "prism-persona"}


def test_streaming_gives_the_same_text_and_ends_with_done(server, client):
    chunks = list(client.chat.completions.create(model="prism", messages=ask(BASE_QUERIES[0]), temperature=0,
                                                 max_tokens=10, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == server["model"].generate(BASE_QUERIES[0], max_tokens=10).text
    assert chunks[0].model_extra["prism"]["route"] == "base"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1
    request = urllib.request.Request(server["url"] + "/v1/chat/completions", method="POST", headers={
        "Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        data=json.dumps({"model": "prism", "messages": ask("hi"), "max_tokens": 3, "stream": True}).encode())
    with urllib.request.urlopen(request, timeout=30) as response:
        lines = [line for line in response.read().decode().splitlines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_concurrent_requests_share_batches_with_mixed_routes(server, client, monkeypatch):
    queries = PERSONA_QUERIES + BASE_QUERIES
    steps: list[int] = []  # each decode step's size
    monkeypatch.setattr(server["model"].intake, "on_step", steps.append)

    def one(query: str):
        return client.chat.completions.create(model="prism", messages=ask(query), temperature=0, max_tokens=8)

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(one, queries * 2))
    assert [r.model_extra["prism"]["route"] for r in replies] == ["persona", "persona", "base", "base"] * 2
    assert max(steps) > 1  # decoded together, not one request after another
    expected = {q: server["model"].generate(q, max_tokens=8).text for q in queries}
    assert [r.choices[0].message.content for r in replies] == [expected[q] for q in queries * 2]


def post(server, body: bytes | dict, key: str | None = API_KEY) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(server["url"] + "/v1/chat/completions", data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize(("body", "key", "status", "needle"), [
    ({"model": "gpt-4", "messages": ask("hi")}, API_KEY, 404, "'gpt-4' does not exist"),
    (b'{"model": "prism", "messages": [', API_KEY, 400, "malformed JSON"),
    ({"model": "prism", "messages": ask("hi"), "temperature": 5}, API_KEY, 422, "temperature"),
    ({"model": "prism", "messages": []}, API_KEY, 422, "messages"),
    ({"model": "prism", "messages": [{"role": "robot", "content": "hi"}]}, API_KEY, 422, "role"),
    ({"model": "prism", "messages": ask("hi"), "max_tokens": 1000}, API_KEY, 400, "maximum context length is 256"),
    ({"model": "prism", "messages": ask("word " * 300)}, API_KEY, 400, "maximum context length is 256"),
    ({"model": "prism", "messages": [{"role": "assistant", "content": "hi"}]}, API_KEY, 400, "end with a user"),
    ({"model": "prism", "messages": [*ask("hi"), {"role": "assistant", "content": "Sure"}],
      "continue_final_message": True}, API_KEY, 400, "add_generation_prompt false"),
    ({"model": "prism", "messages": ask("hi"), "logprobs": True, "stream": True}, API_KEY, 400, "stream false"),
    ({"model": "prism", "messages": ask("hi"), "top_logprobs": 3}, API_KEY, 400, "needs logprobs"),
    ({"model": "prism", "messages": ask("hi"), "logprobs": True, "top_logprobs": 21}, API_KEY, 422, "top_logprobs"),
    ({"model": "prism", "messages": ask("hi")}, None, 401, "missing API key"),
    ({"model": "prism", "messages": ask("hi")}, "wrong", 401, "incorrect API key"),
])
def test_errors_use_the_openai_format(server, body, key, status, needle):
    code, payload = post(server, body, key)
    assert code == status
    assert set(payload) == {"error"} and {"message", "type", "param", "code"} <= set(payload["error"])
    assert needle in payload["error"]["message"]


def test_openai_client_raises_its_own_error_types(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=ask("hi"))
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.chat.completions.create(model="prism", messages=ask("hi"), max_tokens=10_000)


def test_a_final_assistant_message_is_continued_like_vllm(server, client):
    prefix = "Verdict:"
    reply = client.chat.completions.create(
        model="prism", messages=[*ask(PERSONA_QUERIES[1]), {"role": "assistant", "content": prefix}],
        temperature=0, max_tokens=6, extra_body={"continue_final_message": True, "add_generation_prompt": False})
    request = GenerationRequest(ask(PERSONA_QUERIES[1]), "auto", SamplingParams(max_tokens=6), assistant_prefix=prefix)
    expected = server["model"].generate_batch([request])[0]
    assert reply.choices[0].message.content == expected.text
    assert reply.model_extra["prism"]["route"] == expected.route


def test_logprobs_are_the_models_own(server, client):
    reply = client.chat.completions.create(model="prism-base", messages=ask(BASE_QUERIES[0]), temperature=0,
                                           max_tokens=3, logprobs=True, top_logprobs=5)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens and len(content[0].top_logprobs) == 5
    logprobs, _ = server["model"].next_token_logprobs([GenerationRequest(ask(BASE_QUERIES[0]), "base")])
    top = logprobs[0].topk(5)
    tokenizer = server["model"].lm.tokenizer
    assert [t.token for t in content[0].top_logprobs] == [tokenizer.decode([i]) for i in top.indices.tolist()]
    assert [t.logprob for t in content[0].top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert content[0].token == content[0].top_logprobs[0].token  # greedy takes the most likely token
    plain = client.chat.completions.create(model="prism-base", messages=ask(BASE_QUERIES[0]), max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_health_needs_no_key(server):
    with urllib.request.urlopen(server["url"] + "/health", timeout=10) as response:
        health = json.loads(response.read())
    assert health["status"] == "ok" and health["adapter"] is True


def test_prism_serve_command_binds_loopback_and_answers(tiny_run):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "prism.cli", "serve", str(tiny_run), "--port", str(port),
                                "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", timeout_s=60, process=process)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="prism", messages=ask(BASE_QUERIES[0]), max_tokens=3)
        assert reply.model_extra["prism"]["route"] == "base" and reply.usage.completion_tokens >= 1
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/v1" in output


def test_prism_serve_refuses_a_directory_that_is_not_a_run(tmp_path):
    result = subprocess.run([sys.executable, "-m", "prism.cli", "serve", str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"prism: error: {tmp_path} is not a PRISM run directory (no manifest.json): "
        f"run `prism bootstrap --out {tmp_path}` first"]


def test_remote_judge_against_the_live_server(server, tiny_run):
    from prism.errors import PrismError
    from prism.evaluation.config import EvalConfig
    from prism.evaluation.judge import Judge

    config = EvalConfig(judge_base_url=server["url"] + "/v1", judge_model="prism-base", judge_api_key=API_KEY)
    judge = Judge(server["model"], config)
    replies = judge.complete([("You judge.", "Rate this answer: 'Paris'. Reply [[rating]].")], prefix="",
                             max_tokens=4)
    assert len(replies) == 1 and isinstance(replies[0], str) and not judge.prefixed
    wrong = Judge(server["model"], EvalConfig(judge_base_url=server["url"] + "/v1", judge_model="prism-base",
                                              judge_api_key="wrong"))
    with pytest.raises(PrismError, match="judge .* failed: .*re-run the same command to resume"):
        wrong.complete([("s", "u")], prefix="", max_tokens=4)


def test_our_calls_raise_no_warning_in_a_chat_turn_and_a_server_request(server, client, caplog):
    """Every warning raised while PRISM generates is an error here (a deprecated transformers argument in our
    decode loop fails this test), and transformers logs no deprecation either. Loading the model, where
    PEFT raises one of its own, happens in the fixture, outside."""
    from helpers import run_chat

    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error")
        text = run_chat(server["model"], [BASE_QUERIES[0], "/route persona", PERSONA_QUERIES[0]])
        reply = client.chat.completions.create(model="prism", messages=ask(BASE_QUERIES[1]), temperature=0,
                                               max_tokens=6)
        chunks = list(client.chat.completions.create(model="prism", messages=ask(PERSONA_QUERIES[1]), stream=True,
                                                     temperature=0, max_tokens=6))
    assert text.count("tok/s)") == 2 and reply.choices[0].message.content and chunks
    assert not [r for r in caplog.records if "deprecat" in r.getMessage().lower()]


def test_the_decoding_threads_events_wait_for_its_flush_and_keep_their_order():
    """EventPost: the thread that flushes (the llama.cpp worker) hands its events to the event loop at its
    flush, in the order it put them; another thread's event is delivered without one."""
    import asyncio
    import queue
    import threading
    import time

    from prism.inference.streams import EventPost

    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    events: asyncio.Queue = asyncio.Queue()
    post = EventPost(loop)

    def received(expected: int) -> list:
        """What the loop has been handed, once `expected` items are there (or 30 s have passed)."""
        deadline = time.monotonic() + 30
        while True:
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(timeout=30)  # earlier deliveries ran
            if events.qsize() >= expected or time.monotonic() > deadline:
                return [events.get_nowait() for _ in range(events.qsize())]
            time.sleep(0.01)

    orders: queue.Queue = queue.Queue()
    done: queue.Queue = queue.Queue()

    def decoding_thread() -> None:
        post.flush()  # from now on this thread's events wait for its flushes
        for item in (1, 2, 3):
            post.put(events, item)
        done.put("put")
        orders.get(timeout=30)
        post.flush()
        done.put("flushed")

    worker = threading.Thread(target=decoding_thread)
    worker.start()
    try:
        assert done.get(timeout=30) == "put"
        time.sleep(0.2)
        assert received(0) == []  # nothing before the flush
        orders.put("flush")
        assert done.get(timeout=30) == "flushed"
        assert received(3) == [1, 2, 3]
        post.put(events, "other")  # from another thread: delivered without a flush
        assert received(1) == ["other"]
    finally:
        worker.join(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        runner.join(timeout=30)


def test_a_failure_inside_the_server_is_a_500_with_a_request_id_the_log_carries(server, client, monkeypatch, caplog):
    """The server's own fault: 500, type server_error, the request id in the reply and in the log line with its
    traceback, and nothing of the exception in the reply; the next request is served as before."""
    model = server["model"]

    def broken(*_args, **_kwargs):
        raise RuntimeError("secret internal state 0xdeadbeef")

    monkeypatch.setattr(model, "_prefill", broken)
    with caplog.at_level(logging.ERROR, logger="prism"), pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model="prism", messages=ask(BASE_QUERIES[0]), max_tokens=4)
    error = failed.value.body
    assert failed.value.status_code == 500 and error["type"] == "server_error"
    assert "0xdeadbeef" not in json.dumps(error) and "RuntimeError" not in json.dumps(error)
    request_id = error["message"].split("request id ")[1].split(";")[0]
    assert request_id.startswith("chatcmpl-")
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and "0xdeadbeef" in str(logged[0].exc_info[1])
    monkeypatch.undo()
    assert client.chat.completions.create(model="prism", messages=ask(BASE_QUERIES[0]), max_tokens=2).choices


@pytest.mark.parametrize("error, status, code", [
    (PrismError("llama.cpp cannot make a context of 32 x 1024 tokens: not enough memory"), 500, None),
    (ContextLengthError("a prompt of 300 tokens and 16 new ones do not fit"), 400, "context_length_exceeded")])
def test_an_engine_failure_is_typed_by_whose_fault_it_is(server, client, monkeypatch, error, status, code):
    """Raised inside the engine while generating: a limit of the request is the client's to fix (400, the
    engine's message); the engine's own trouble is the server's fault (500, the message kept for the log)."""

    def failing(*_args, **_kwargs):
        raise error

    monkeypatch.setattr(server["model"], "_prefill", failing)
    with pytest.raises(openai.APIStatusError) as failed:
        client.chat.completions.create(model="prism", messages=ask(BASE_QUERIES[0]), max_tokens=4)
    body = failed.value.body
    assert failed.value.status_code == status and body["code"] == code
    assert (str(error) in body["message"]) == (status == 400)
