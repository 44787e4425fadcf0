"""The replies of `prism serve` and the sidecar as models: what the OpenAPI document shows and what the
handlers send (the chat completion, its stream chunks, usage, the route decision, the model list, health,
reload, and OpenAI's error format for every failure)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field


def _none(value: Any) -> bool:
    return value is None


def absent(description: str | None = None) -> Any:
    """An optional field that a reply leaves out rather than sending as null."""
    return Field(None, exclude_if=_none, description=description)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error format, for every failure."""
    error: ErrorDetail


class PrismInfo(BaseModel):
    """The route a request took: the reply's `prism` object, and what POST /v1/route answers."""
    route: Literal["base", "persona"]
    gate_probability: float | None = Field(description="the gate's P(an adapter); null when the route was forced")
    forced: bool
    threshold: float
    persona: str | None = absent("the k-way adapter that answered (absent: base or the binary adapter)")
    upstream_model: str | None = absent("the sidecar: the upstream model name it forwarded to")


class RouteList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PrismInfo]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    model_config = ConfigDict(extra="allow")
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletion(BaseModel):
    model_config = ConfigDict(extra="allow")  # an upstream server behind the sidecar may send more
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None
    prism: PrismInfo


class ChunkDelta(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["assistant"] | None = absent()
    content: str | None = absent()


class ChunkChoice(BaseModel):
    model_config = ConfigDict(extra="allow")
    index: int
    delta: ChunkDelta
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed reply (`data: {...}`); the first carries `prism`, the last with
    stream_options.include_usage carries `usage` and no choices; the stream ends with `data: [DONE]`."""
    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = absent()
    prism: PrismInfo | None = absent()


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "prism"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    """GET /health (no key needed): what is served. `prism serve` and the sidecar each fill their own fields."""
    model_config = ConfigDict(extra="allow")
    status: Literal["ok"] = "ok"
    run: str
    threshold: float
    routing: str
    engine: str | None = absent()
    adapter: bool | None = absent()
    personas: list[str] | None = absent()
    waiting: int | None = absent()
    batches: int | None = absent()
    upstream: str | None = absent()
    models: dict[str, str] | None = absent()
    loaded_share_of_model: float | None = absent()


class Reloaded(BaseModel):
    """POST /admin/reload: what the reload read."""
    status: Literal["reloaded"] = "reloaded"
    run: str
    threshold: float
    adapter: bool
    personas: list[str]
    reloads: int
    persona_model: str | None = absent("llama.cpp: what the binary adapter's route runs on, merged or lora")


# the header every routed reply carries (documented on the endpoints that send it)
ROUTE_HEADER = {"x-prism-route": {"description": "the route the request took: base or persona",
                                  "schema": {"type": "string", "enum": ["base", "persona"]}}}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of an endpoint's error statuses, each in OpenAI's error format."""
    why = {400: "a request the model cannot serve (context window, stop strings, roles) or malformed JSON",
           401: "a missing or wrong API key", 404: "an unknown model name", 409: "a reload that failed",
           422: "a request the schema rejects", 500: "a failure while generating",
           502: "the sidecar's upstream is unreachable"}
    return {status: {"model": ErrorResponse, "description": why[status]} for status in statuses}


def reply(model: BaseModel, headers: dict[str, str] | None = None) -> JSONResponse:
    """A reply model as JSON (its absent fields left out)."""
    return JSONResponse(model.model_dump(mode="json"), headers=headers)


def chat_responses(*more_errors: int) -> dict[int | str, dict[str, Any]]:
    """POST /v1/chat/completions: a ChatCompletion, or with stream true server-sent ChatCompletionChunk events;
    the route header either way; and its errors."""
    stream = {"type": "string", "description": "with stream true: server-sent events, each `data: "
              "<ChatCompletionChunk as JSON>`, the last `data: [DONE]`"}
    return {200: {"content": {"text/event-stream": {"schema": stream}}, "headers": ROUTE_HEADER},
            **errors(400, 401, 404, 422, *more_errors)}
