"""A k-way run behind `prism serve` and behind the sidecar (both live on loopback): model names per persona,
replies naming the persona, and the sidecar forwarding each route to its own upstream model name."""

import json
import urllib.request
from types import SimpleNamespace

import openai
import pytest

from helpers import BASE_QUERIES, KWAY_PERSONAS, REVIEW_QUERY, WRITING_QUERY, LiveServer, upstream_at
from prism.inference.router import Router
from prism.inference.transformers import PrismModel
from prism.serving.server import create_app
from prism.serving.sidecar import create_sidecar_app
from prism.serving.vllm import vllm_commands

EXPECTED = {WRITING_QUERY: "writing", REVIEW_QUERY: "review", BASE_QUERIES[0]: None, BASE_QUERIES[1]: None}


@pytest.fixture(scope="module")
def stack(tiny_kway_run):
    """upstream: `prism serve` of the k-way run, whose prism-base / prism-persona / prism-persona-<persona> models
    stand in for vLLM's base model and LoRA modules; sidecar: the k-way Router of the same run in front of it."""
    model = PrismModel.from_run(tiny_kway_run, device="cpu", max_model_len=256)
    upstream = LiveServer(create_app(model, max_batch_size=8, default_max_tokens=16)).start()
    router = Router.from_run(tiny_kway_run, device="cpu")
    sidecar = LiveServer(create_sidecar_app(router, upstream_at(upstream.url + "/v1"))).start()
    yield SimpleNamespace(model=model, router=router, upstream=upstream, sidecar=sidecar,
                          served=openai.OpenAI(base_url=upstream.url + "/v1", api_key="x", max_retries=0),
                          routed=openai.OpenAI(base_url=sidecar.url + "/v1", api_key="x", max_retries=0))
    sidecar.stop()
    upstream.stop()


def ask(text):
    return [{"role": "user", "content": text}]


def test_prism_serve_lists_a_model_per_persona_and_replies_name_the_persona(stack):
    names = [m.id for m in stack.served.models.list().data]
    assert names == ["prism", "prism-base", "prism-persona", "prism-persona-writing", "prism-persona-review"]
    for query, persona in EXPECTED.items():
        raw = stack.served.chat.completions.with_raw_response.create(model="prism", messages=ask(query),
                                                                     temperature=0, max_tokens=6)
        info = raw.parse().model_extra["prism"]
        assert info.get("persona") == persona and info["route"] == raw.headers["x-prism-route"]
        assert info["route"] == ("base" if persona is None else "persona")
    forced = stack.served.chat.completions.create(model="prism-persona-review", messages=ask(WRITING_QUERY),
                                                  temperature=0, max_tokens=6)
    info = forced.model_extra["prism"]
    assert (info["route"], info["persona"], info["forced"]) == ("persona", "review", True)
    expected = stack.model.generate(WRITING_QUERY, route="persona", persona="review", max_tokens=6)
    assert forced.choices[0].message.content == expected.text
    with pytest.raises(openai.NotFoundError, match="no k-way adapter has that persona"):
        stack.served.chat.completions.create(model="prism-persona-math", messages=ask("hi"), max_tokens=2)
    health = json.loads(urllib.request.urlopen(stack.upstream.url + "/health").read())
    assert health["routing"] == "kway" and health["personas"] == KWAY_PERSONAS


def test_the_route_endpoint_and_the_metrics_name_the_persona(stack):
    body = json.dumps({"batch": [ask(q) for q in EXPECTED]}).encode()
    request = urllib.request.Request(stack.upstream.url + "/v1/route", data=body,
                                     headers={"Content-Type": "application/json"})
    data = json.loads(urllib.request.urlopen(request).read())["data"]
    assert [d.get("persona") for d in data] == list(EXPECTED.values())
    stack.served.chat.completions.create(model="prism", messages=ask(WRITING_QUERY), max_tokens=2)
    metrics = urllib.request.urlopen(stack.upstream.url + "/metrics").read().decode()
    assert 'prism_requests_total{endpoint="chat",model="prism",route="persona-writing",status="200"}' in metrics


def test_the_sidecar_forwards_each_route_to_its_upstream_model_name(stack):
    for query, persona in EXPECTED.items():
        reply = stack.routed.chat.completions.create(model="prism", messages=ask(query), temperature=0, max_tokens=6)
        info = reply.model_extra["prism"]
        upstream = "prism-base" if persona is None else f"prism-persona-{persona}"
        assert info["upstream_model"] == upstream and info.get("persona") == persona and reply.model == "prism"
        route = "base" if persona is None else "persona"
        expected = stack.model.generate(query, route=route, persona=persona, max_tokens=6)
        assert reply.choices[0].message.content == expected.text
    for name, upstream in (("prism-persona-review", "prism-persona-review"), ("prism-persona", "prism-persona"),
                           ("prism-base", "prism-base")):
        reply = stack.routed.chat.completions.create(model=name, messages=ask(WRITING_QUERY), max_tokens=2)
        assert reply.model_extra["prism"]["upstream_model"] == upstream and reply.model_extra["prism"]["forced"]
    health = json.loads(urllib.request.urlopen(stack.sidecar.url + "/health").read())
    assert health["models"] == {"base": "prism-base", "persona": "prism-persona",
                                "persona-writing": "prism-persona-writing", "persona-review": "prism-persona-review"}
    try:
        stack.routed.chat.completions.create(model="prism-persona-math", messages=ask("hi"), max_tokens=2)
    except openai.NotFoundError as exc:
        assert "prism-persona-writing" in str(exc)
    else:
        raise AssertionError("an unknown persona must be a 404")


def test_export_vllm_lists_every_adapter_as_a_lora_module(tiny_kway_run):
    out = vllm_commands(str(tiny_kway_run))
    modules = [f"prism-persona={(tiny_kway_run / 'adapter').resolve()}"] + [
        f"prism-persona-{p}={(tiny_kway_run / 'kway' / 'adapters' / p).resolve()}" for p in KWAY_PERSONAS]
    assert "--lora-modules " + " ".join(modules) in out and "--max-loras 3" in out
    assert "--upstream-adapter-model prism-persona" in out
