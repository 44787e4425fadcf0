"""The run-level endpoints `prism serve` and the sidecar share: POST /v1/route (the gate's route for one
conversation or a batch, without generating, for gateways that pick a backend themselves) and
POST /admin/reload (the run read again, as SIGHUP does)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from prism.inference.base import RouteDecider, RouteDecision
from prism.routes import AUTO
from prism.serving.metrics import ServingMetrics
from prism.serving.observe import note_decision, request_record
from prism.serving.protocol import (
    PrismInfo,
    Reloaded,
    RouteList,
    RouteOne,
    RouteRequest,
    check_model,
    decision_info,
    errors,
    reply,
    up_to_last_user_turn,
)
from prism.serving.reload import reload_run


async def route_conversations(body: RouteRequest, request: Request, models: list[str],
                              decide: Callable[[list[list[dict[str, str]]]], list[RouteDecision]],
                              threshold: Callable[[], float], metrics: ServingMetrics | None) -> JSONResponse:
    """POST /v1/route on both servers: the gate's decision for each conversation, without generating."""
    record = request_record(request)
    record["model"] = body.model
    route, persona = check_model(body.model, models)
    conversations = [up_to_last_user_turn(c) for c in body.conversations()]
    if route == AUTO:
        decisions = await asyncio.to_thread(decide, conversations)
    else:
        decisions = [RouteDecision(route, None, forced=True, persona=persona) for _ in conversations]
    infos = [decision_info(d, threshold()) for d in decisions]
    for info in infos:
        note_decision({}, metrics, "route", info)
    if isinstance(body, RouteOne):
        note_decision(record, None, "route", infos[0])
        return reply(infos[0])
    record.update(route="batch", requests=len(infos), threshold=infos[0].threshold)
    return reply(RouteList(data=infos))


def install_route_and_reload(app: FastAPI, target: RouteDecider, models: list[str],
                             metrics: ServingMetrics | None) -> None:
    """/v1/route and /admin/reload for `target` (a served model, or the sidecar's router); app.state.reload
    is what SIGHUP calls."""
    app.state.reload = lambda: reload_run(target, metrics)

    @app.post("/admin/reload", response_model=Reloaded, responses=errors(401, 409))
    async def admin_reload() -> JSONResponse:
        return reply(await asyncio.to_thread(app.state.reload))

    @app.post("/v1/route", response_model=PrismInfo | RouteList, responses=errors(400, 401, 404, 422))
    async def route(body: RouteRequest, request: Request) -> Any:
        return await route_conversations(body, request, models, target.decide, lambda: target.threshold, metrics)
