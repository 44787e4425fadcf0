"""The routing sidecar in front of a live `prism serve` upstream on loopback (both real servers)."""

import json
import socket
import urllib.error
import urllib.request
from types import SimpleNamespace

import openai
import pytest

from helpers import BASE_QUERIES, PERSONA_QUERIES, LiveServer, upstream_at
from prism.cli import main
from prism.inference.router import Router
from prism.inference.transformers import PrismModel
from prism.serving.config import ServeConfig
from prism.serving.server import create_app
from prism.serving.sidecar import create_sidecar_app

KEY = "sidecar-key"


@pytest.fixture(scope="module")
def stack(tiny_run):
    """upstream: `prism serve` of the tiny run, whose prism-base / prism-persona models stand in for vLLM's
    base model and LoRA module; sidecar: the Router of the same run in front of it."""
    model = PrismModel.from_run(tiny_run, device="cpu", max_model_len=256)
    upstream = LiveServer(create_app(model, max_batch_size=8, default_max_tokens=16)).start()
    router = Router.from_run(tiny_run, device="cpu")
    sidecar = LiveServer(create_sidecar_app(router, upstream_at(upstream.url + "/v1"),
                                            ServeConfig(api_key=KEY))).start()
    client = openai.OpenAI(base_url=sidecar.url + "/v1", api_key=KEY, max_retries=0)
    yield SimpleNamespace(model=model, router=router, upstream=upstream, sidecar=sidecar, client=client)
    sidecar.stop()
    if upstream.thread.is_alive():
        upstream.stop()


def ask(text):
    return [{"role": "user", "content": text}]


def test_the_router_holds_only_the_gates_inputs(stack):
    identity = stack.router.lm.identity
    assert identity["loaded_parameters"] < identity["checkpoint_parameters"] == stack.model.lm.identity["parameters"]
    assert len(list(stack.router.lm.model.layers)) == 1 and 0 < stack.router.loaded_share < 1


def test_routes_and_replies_match_the_in_process_model(stack):
    for query in PERSONA_QUERIES + BASE_QUERIES:
        raw = stack.client.chat.completions.with_raw_response.create(model="prism", messages=ask(query),
                                                                     temperature=0, max_tokens=8)
        reply = raw.parse()
        decision = stack.model.decide([ask(query)])[0]
        assert reply.model_extra["prism"]["route"] == decision.route == raw.headers["x-prism-route"]
        assert reply.model_extra["prism"]["gate_probability"] == pytest.approx(decision.gate_probability, abs=1e-5)
        assert reply.model_extra["prism"]["upstream_model"] == f"prism-{decision.route}"
        expected = stack.model.generate(query, route=decision.route, max_tokens=8)
        assert reply.choices[0].message.content == expected.text and reply.model == "prism"
    forced = stack.client.chat.completions.create(model="prism-base", messages=ask(PERSONA_QUERIES[0]),
                                                  temperature=0, max_tokens=4)
    assert forced.model_extra["prism"]["route"] == "base" and forced.model_extra["prism"]["forced"] is True


def test_streaming_is_relayed(stack):
    whole = stack.client.chat.completions.create(model="prism", messages=ask(PERSONA_QUERIES[0]), temperature=0,
                                                 max_tokens=10)
    chunks = list(stack.client.chat.completions.create(model="prism", messages=ask(PERSONA_QUERIES[0]),
                                                       temperature=0, max_tokens=10, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[0].model_extra["prism"]["route"] == "persona" and {c.model for c in chunks} == {"prism"}


def post(url, body, key=KEY):
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_errors_upstream_and_local_come_back_in_the_openai_format(stack):
    # the upstream's own error, passed through as it wrote it
    status, payload = post(stack.sidecar.url, {"model": "prism", "messages": ask("hi"), "max_tokens": 1000})
    assert status == 400 and payload["error"]["code"] == "context_length_exceeded"
    assert "maximum context length is 256" in payload["error"]["message"]
    # the sidecar's own checks
    assert post(stack.sidecar.url, {"model": "gpt-4", "messages": ask("hi")})[0] == 404
    status, payload = post(stack.sidecar.url, {"model": "prism", "messages": []})
    assert status == 422 and "messages" in payload["error"]["message"]
    assert post(stack.sidecar.url, {"model": "prism", "messages": ask("hi")}, key="wrong")[0] == 401
    # an upstream that is gone
    stack.upstream.stop()
    try:
        status, payload = post(stack.sidecar.url, {"model": "prism", "messages": ask("hi"), "max_tokens": 2})
        assert status == 502 and payload["error"]["code"] == "upstream_unreachable"
        assert stack.upstream.url in payload["error"]["message"]
    finally:
        stack.upstream.start()


def test_export_vllm_prints_both_commands(tiny_run, capsys):
    assert main(["export", "vllm", str(tiny_run), "--port", "9000"]) == 0
    out = capsys.readouterr().out
    assert f"--lora-modules prism-persona={(tiny_run / 'adapter').resolve()}" in out
    assert "--served-model-name prism-base --port 9001" in out
    assert f"prism serve {tiny_run} --port 9000 --upstream http://127.0.0.1:9001/v1" in out


def test_sidecar_flags_need_both_model_names(tiny_run, capsys):
    assert main(["serve", str(tiny_run), "--upstream", "http://127.0.0.1:1/v1"]) == 2
    assert "--upstream-base-model and --upstream-adapter-model" in capsys.readouterr().err


def test_sidecar_refuses_the_generating_servers_flags_by_name(tiny_run, capsys):
    with socket.socket() as taken:  # were the flags let through, the sidecar would fail to bind at once, not serve
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", str(tiny_run), "--upstream", "http://127.0.0.1:1/v1", "--upstream-base-model", "b",
                     "--upstream-adapter-model", "a", "--max-waiting", "4", "--request-timeout", "30",
                     "--port", str(taken.getsockname()[1])]) == 2
    error = capsys.readouterr().err
    assert "--max-waiting, --request-timeout: the sidecar does not generate" in error and "Traceback" not in error


def test_sidecar_route_endpoint_metrics_and_reload(stack, tiny_run, tmp_path):
    """The sidecar's own /v1/route agrees with the route it forwards under; /metrics counts requests by route
    and upstream errors by kind (parsed by prometheus_client); a reload picks up the run's new threshold and a
    bad one keeps the old gate."""
    import shutil

    import httpx2
    from prometheus_client.parser import text_string_to_metric_families

    from prism.lm.gate import save_threshold

    run = shutil.copytree(tiny_run, tmp_path / "run")
    router = Router.from_run(run, device="cpu")
    sidecar = LiveServer(create_sidecar_app(router, upstream_at(stack.upstream.url + "/v1"),
                                            ServeConfig(api_key=KEY))).start()
    broken = LiveServer(create_sidecar_app(router, upstream_at("http://127.0.0.1:9/v1"))).start()
    http = httpx2.Client(base_url=sidecar.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)

    def metrics(client):
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(client.get("/metrics").text) for s in family.samples}

    try:
        for query in PERSONA_QUERIES + BASE_QUERIES:
            decided = http.post("/v1/route", json={"messages": ask(query)}).json()
            taken = http.post("/v1/chat/completions", json={"model": "prism", "messages": ask(query),
                                                             "max_tokens": 3}).json()["prism"]
            assert decided["route"] == taken["route"] and decided["threshold"] == taken["threshold"] == 0.5
        counts = metrics(http)
        assert counts[("prism_requests_total", (("endpoint", "chat"), ("model", "prism"), ("route", "persona"),
                                                ("status", "200")))] == len(PERSONA_QUERIES)
        assert counts[("prism_requests_total", (("endpoint", "route"), ("model", "prism"), ("route", "base"),
                                                ("status", "200")))] == len(BASE_QUERIES)
        assert counts[("prism_completion_tokens_total", (("route", "persona"),))] > 0
        assert httpx2.get(sidecar.url + "/metrics").status_code == 401
        with httpx2.Client(base_url=broken.url, timeout=60) as direct:
            unreachable = direct.post("/v1/chat/completions", json={"model": "prism", "messages": ask("hi")})
            assert unreachable.status_code == 502
            assert metrics(direct)[("prism_upstream_errors_total", (("kind", "unreachable"),))] == 1

        save_threshold(run / "gate", 0.97)
        assert http.post("/admin/reload").json()["threshold"] == 0.97
        assert http.post("/v1/route", json={"messages": ask(PERSONA_QUERIES[0])}).json()["threshold"] == 0.97
        (run / "gate" / "config.json").write_text("{broken")
        failed = http.post("/admin/reload")
        assert failed.status_code == 409 and "keeps serving" in failed.json()["error"]["message"]
        assert router.threshold == 0.97
    finally:
        http.close()
        sidecar.stop()
        broken.stop()
