"""POST /v1/route on `prism serve` and the sidecar: the gate's route for one conversation or a batch,
without generating, for gateways that pick a backend themselves."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import Request

from prism.inference.base import RouteDecision
from prism.serving.metrics import ServingMetrics
from prism.serving.observe import note_decision, request_record
from prism.serving.protocol import MODEL_ROUTES, RouteRequest, check_model, decision_info, up_to_last_user_turn


async def route_conversations(body: RouteRequest, request: Request, models: list[str],
                              decide: Callable[[list[list[dict[str, str]]]], list[RouteDecision]],
                              threshold: Callable[[], float], metrics: ServingMetrics | None) -> dict[str, Any]:
    """POST /v1/route on both servers: the gate's decision for each conversation, without generating."""
    record = request_record(request)
    record["model"] = body.model
    check_model(body.model, models)
    conversations = [up_to_last_user_turn(c) for c in body.conversations()]
    route = MODEL_ROUTES[body.model]
    if route == "auto":
        decisions = await asyncio.to_thread(decide, conversations)
    else:
        decisions = [RouteDecision(route, None, forced=True) for _ in conversations]
    infos = [decision_info(d, threshold()) for d in decisions]
    for info in infos:
        note_decision({}, metrics, "route", info)
    if body.messages is not None:
        record.update({k: infos[0][k] for k in ("route", "gate_probability", "forced", "threshold")})
        return infos[0]
    record.update(route="batch", requests=len(infos), threshold=infos[0]["threshold"])
    return {"object": "list", "data": infos}
