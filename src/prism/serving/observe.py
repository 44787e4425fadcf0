"""What `prism serve` and the sidecar record about each request: Prometheus metrics (`GET /metrics`) and
the optional request log. A handler fills `request.state.record` (model, route, tokens, ...); an ASGI
middleware adds the status and the latency to the last byte, streamed replies included, and writes both."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import PlainTextResponse

from prism.routes import adapter_key
from prism.serving.metrics import ServingMetrics
from prism.serving.protocol import PrismInfo, errors
from prism.serving.request_log import RequestLog

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/route": "route"}


def request_record(request: Request) -> dict[str, Any]:
    """The request's record, which its handler fills in as it learns the model, route and tokens (a dict
    that is not recorded anywhere when observability is off)."""
    if not hasattr(request.state, "record"):
        request.state.record = {}
    return request.state.record


def install_observability(app: FastAPI, metrics: ServingMetrics | None, request_log: RequestLog | None,
                          threshold: Callable[[], float]) -> None:
    if metrics is not None:
        @app.get("/metrics", response_class=PlainTextResponse, responses={
            200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus's text format"},
            401: {"description": errors(401)[401]["description"], "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}})  # not in /metrics' own text type
        async def prometheus_metrics() -> Response:
            metrics.threshold.set(threshold())
            body, content_type = metrics.render()
            return Response(body, media_type=content_type)

    if metrics is None and request_log is None:
        return

    def finish(endpoint: str, status: int, seconds: float, record: dict[str, Any]) -> None:
        record.pop("started", None)
        route = record.get("route") or "none"
        if metrics is not None:
            metrics.requests.labels(endpoint, record.get("model", "unknown"), route, str(status)).inc()
            metrics.latency.labels(endpoint).observe(seconds)
            if record.get("prompt_tokens") is not None:
                metrics.prompt_tokens.labels(route).inc(record["prompt_tokens"])
                metrics.completion_tokens.labels(route).inc(record["completion_tokens"])
        if request_log is not None:
            request_log.write({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "endpoint": endpoint,
                               "model": record.get("model"), "route": record.get("route"),
                               **({"persona": record["persona"]} if "persona" in record else {}),
                               "gate_probability": record.get("gate_probability"), "forced": record.get("forced"),
                               "threshold": record.get("threshold"), "prompt_tokens": record.get("prompt_tokens"),
                               "completion_tokens": record.get("completion_tokens"),
                               "latency_s": round(seconds, 4), "status": status,
                               **({"requests": record["requests"]} if "requests" in record else {}),
                               **({"messages": record["messages"]} if "messages" in record else {})})

    app.add_middleware(ObserveRequests, finish=finish)


class ObserveRequests:
    """ASGI middleware (lighter than Starlette's BaseHTTPMiddleware, which runs every request in a task of
    its own): hands `finish` the status and the seconds to the last byte of each chat or route request."""

    def __init__(self, app: Any, finish: Callable[[str, int, float, dict[str, Any]], None]):
        self.app, self.finish = app, finish

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        endpoint = ENDPOINTS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        record: dict[str, Any] = {"started": started}
        scope.setdefault("state", {})["record"] = record  # what request_record(request) returns
        status, finished, length, sent = 500, False, None, 0

        async def observed_send(message: dict[str, Any]) -> None:
            nonlocal status, finished, length, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                length = next((int(v) for k, v in message.get("headers", []) if k.lower() == b"content-length"), None)
            elif message["type"] == "http.response.body" and not finished:
                sent += len(message.get("body", b""))
                # recorded before the last byte leaves (a client holding its reply finds it logged); a reply
                # of known length may end before its final empty message
                if not message.get("more_body", False) or (length is not None and sent >= length):
                    finished = True
                    self.finish(endpoint, status, time.perf_counter() - started, record)
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            if not finished:  # the client went away, or the app failed before answering
                self.finish(endpoint, status, time.perf_counter() - started, record)

def note_decision(record: dict[str, Any], metrics: ServingMetrics | None, endpoint: str, info: PrismInfo) -> None:
    """A route decision into the request's record and the gate-probability histogram. A k-way adapter's route
    is recorded (and counted in the metrics) as its adapter, `persona-<persona>`."""
    record.update(route=info.route, gate_probability=info.gate_probability, forced=info.forced,
                  threshold=info.threshold)
    if info.persona is not None:
        record.update(route=adapter_key(info.persona), persona=info.persona)
    if metrics is not None and not info.forced and info.gate_probability is not None:
        metrics.gate_probability.labels(endpoint).observe(info.gate_probability)


def note_first_token(record: dict[str, Any], metrics: ServingMetrics | None) -> None:
    if metrics is not None and "started" in record and not record.get("first_token_seen"):
        record["first_token_seen"] = True
        metrics.first_token.observe(time.perf_counter() - record["started"])
