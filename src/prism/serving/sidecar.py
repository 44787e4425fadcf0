"""A routing sidecar in front of an OpenAI-compatible server that holds the base model and the adapter
(vLLM with `--enable-lora --lora-modules NAME=RUN/adapter`).

The sidecar loads only what the gate reads (tokenizer, embeddings, decoder blocks up to the gate's layer, the
gate), decides each request's route, and forwards the request, streaming included, to the upstream server under the
base or the adapter model name. Replies come back as the upstream wrote them, with the model name the
client asked for, a `prism` object and an `x-prism-route` header, as `prism serve` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from prism.inference.base import RouteDecision
from prism.inference.config import LoadConfig
from prism.inference.router import Router
from prism.routes import AUTO, BASE, adapter_key, route_key, served_names
from prism.serving.config import ServeConfig, SidecarConfig
from prism.serving.metrics import ServingMetrics
from prism.serving.observe import install_observability, note_decision, note_first_token, request_record
from prism.serving.protocol import (
    ApiError,
    ChatCompletion,
    ChatCompletionRequest,
    Health,
    PrismInfo,
    as_dicts,
    chat_responses,
    check_model,
    decision_info,
    install_openai_edges,
    up_to_last_user_turn,
)
from prism.serving.reload import reload_on_sighup
from prism.serving.request_log import RequestLog
from prism.serving.route_api import install_route_and_reload

log = logging.getLogger("prism")


def create_sidecar_app(router: Router, sidecar: SidecarConfig, config: ServeConfig | None = None, *,
                       metrics: bool = True, request_log: RequestLog | None = None) -> FastAPI:
    """The sidecar's app: `router` decides, `sidecar` names the upstream and its model names, `config` is how it
    serves (its API key, ...); `request_log` is the opened log."""
    sidecar.check()
    config = config or ServeConfig()
    assert sidecar.upstream and sidecar.upstream_base_model and sidecar.upstream_adapter_model  # check() did
    upstream = sidecar.upstream.rstrip("/")
    headers = {"Authorization": f"Bearer {sidecar.upstream_api_key}"} if sidecar.upstream_api_key else {}
    client = httpx2.AsyncClient(base_url=upstream, headers=headers, timeout=sidecar.upstream_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = FastAPI(title="PRISM routing sidecar", lifespan=lifespan)
    models = served_names(router.has_adapter, router.personas)
    observed = ServingMetrics(sidecar=True) if metrics else None
    install_openai_edges(app, config.api_key, models)
    install_observability(app, observed, request_log, lambda: router.threshold)
    upstream_names = upstream_model_names(sidecar.upstream_base_model, sidecar.upstream_adapter_model,
                                          router.personas)

    forwarder = Forwarder(router, client, upstream, upstream_names, models, observed, request_log)

    install_route_and_reload(app, router, models, observed)

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        return Health(run=str(router.run_path), upstream=upstream, threshold=router.threshold, models=upstream_names,
                      loaded_share_of_model=router.loaded_share, routing=router.routing)

    # the body is read as sent (and forwarded so): its schema is prism serve's, documented here
    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=chat_responses(502),
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}}})
    async def chat_completions(request: Request) -> Any:
        return await forwarder.chat(request)

    def openapi() -> dict[str, Any]:
        """FastAPI's document, with the chat request's schema the handler validates by hand."""
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            request_schema = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(request_schema.pop("$defs", {}))
            schemas["ChatCompletionRequest"] = request_schema
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    return app


@dataclass
class Forwarder:
    """The sidecar's chat endpoint: route here, generate upstream under the route's model name."""

    router: Router
    client: httpx2.AsyncClient
    upstream: str
    upstream_names: dict[str, str]  # base or adapter key -> the model name upstream
    models: list[str]
    metrics: ServingMetrics | None
    request_log: RequestLog | None

    async def chat(self, request: Request) -> Any:
        body, parsed = await _parse_chat(request)
        record = request_record(request)
        record["model"] = parsed.model
        route, persona = check_model(parsed.model, self.models)
        decision = await asyncio.to_thread(_route, self.router, parsed, route, persona)
        upstream_model = self.upstream_names[route_key(decision.route, decision.persona)]
        info = decision_info(decision, self.router.threshold)
        info.upstream_model = upstream_model
        note_decision(record, self.metrics, "chat", info)
        if self.request_log is not None and self.request_log.log_prompts:
            record["messages"] = as_dicts(parsed.messages)
        forwarded = {**body, "model": upstream_model}
        route_header = {"x-prism-route": decision.route}
        try:
            reply = await self.client.send(self.client.build_request("POST", "/chat/completions", json=forwarded),
                                           stream=bool(parsed.stream))
        except httpx2.RequestError as exc:
            self._failed("unreachable")
            raise ApiError(502, f"the upstream server at {self.upstream} is unreachable: {type(exc).__name__}: "
                           f"{exc}", "upstream_error", code="upstream_unreachable") from None
        if reply.status_code >= 400:
            self._failed(str(reply.status_code))
            await reply.aread()
            await reply.aclose()
            return _upstream_error(reply, route_header)
        if parsed.stream:
            return StreamingResponse(_relay(reply, parsed.model, info, record, self.metrics),
                                     media_type="text/event-stream", headers=route_header)
        data = reply.json()
        usage = data.get("usage") or {}
        if usage.get("prompt_tokens") is not None:
            record.update(prompt_tokens=usage["prompt_tokens"], completion_tokens=usage.get("completion_tokens", 0))
        return JSONResponse({**data, "model": parsed.model, "prism": info.model_dump(mode="json")},
                            headers=route_header)

    def _failed(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.upstream_errors.labels(kind).inc()


async def _parse_chat(request: Request) -> tuple[dict[str, Any], ChatCompletionRequest]:
    """The body as sent (forwarded as it is) and as validated, with prism serve's checks and errors."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON body: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    try:  # the same checks as prism serve, and the same 422 when they fail
        return body, ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def upstream_model_names(base_model: str, adapter_model: str, personas: Sequence[str]) -> dict[str, str]:
    """The upstream's model name of each route: base, the binary adapter, and each k-way adapter as
    `<adapter model>-<persona>` (the names `prism export vllm` gives its LoRA modules)."""
    return {BASE: base_model, adapter_key(None): adapter_model,
            **{adapter_key(p): f"{adapter_model}-{p}" for p in personas}}


def _route(router: Router, body: ChatCompletionRequest, route: str, persona: str | None) -> RouteDecision:
    if route != AUTO:
        return RouteDecision(route, None, forced=True, persona=persona)
    return router.decide([up_to_last_user_turn(as_dicts(body.messages))])[0]


def _upstream_error(reply: httpx2.Response, headers: dict[str, str]) -> JSONResponse:
    """The upstream's error as it sent it when it is in the OpenAI format, else wrapped in it."""
    try:
        payload = reply.json()
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return JSONResponse(payload, status_code=reply.status_code, headers=headers)
    text = reply.text.strip()[:500] or reply.reason_phrase
    return ApiError(reply.status_code, f"the upstream server answered {reply.status_code}: {text}",
                    "upstream_error").response(headers)


async def _relay(reply: httpx2.Response, model: str, info: PrismInfo, record: dict[str, Any],
                 metrics: ServingMetrics | None) -> AsyncIterator[str]:
    """The upstream's server-sent events, each chunk renamed to the client's model; the first carries `prism`."""
    first = True
    try:
        async for line in reply.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[len("data:"):].strip()
            if payload == "[DONE]":
                yield "data: [DONE]\n\n"
                continue
            try:
                chunk = json.loads(payload)
            except json.JSONDecodeError:
                yield f"data: {payload}\n\n"
                continue
            if isinstance(chunk, dict) and "error" not in chunk:
                chunk["model"] = model
                if first:
                    chunk["prism"], first = info.model_dump(mode="json"), False
                if any((choice.get("delta") or {}).get("content") for choice in chunk.get("choices") or []):
                    note_first_token(record, metrics)
            yield f"data: {json.dumps(chunk)}\n\n"
    finally:
        await reply.aclose()


def serve_sidecar(run: str, load: LoadConfig, sidecar: SidecarConfig, config: ServeConfig) -> None:
    """Route for an upstream server until interrupted: the run's Router loaded as `load` says, forwarding to the
    upstream `sidecar` names, serving as `config` says; SIGHUP reloads the run."""
    import uvicorn

    sidecar.check()
    router = Router.from_run(run, load)
    share = router.loaded_share
    loaded = router.lm.identity["loaded_parameters"]
    log.info("sidecar holds the gate's inputs only: %s parameters%s of the model", f"{loaded:,}",
             f" = {100 * share:.1f}%" if share else "")
    assert sidecar.upstream_base_model and sidecar.upstream_adapter_model  # check() did
    names = upstream_model_names(sidecar.upstream_base_model, sidecar.upstream_adapter_model, router.personas)
    log.info("routing %s (%s) on http://%s:%d/v1 to %s (upstream models: %s)", run, router.routing, config.host,
             config.port, sidecar.upstream, ", ".join(f"{route} -> {name}" for route, name in names.items()))
    requests = RequestLog(config.request_log, log_prompts=config.log_prompts) if config.request_log else None
    app = create_sidecar_app(router, sidecar, config, request_log=requests)
    reload_on_sighup(app.state.reload)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
