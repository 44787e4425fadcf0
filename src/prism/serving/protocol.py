"""The OpenAI chat-completions protocol as PRISM serves it, shared by `prism serve` and the sidecar: the
replies as models (what the OpenAPI document shows and what the handlers send: the chat completion, its
stream chunks, usage, the route decision, the model list, health, reload, and OpenAI's error format for every
failure), request models validated at the edge, the model names that pick a route (`prism` lets the gate
decide, `prism-base`, `prism-persona` and a k-way run's `prism-persona-<persona>` force one), and API-key
checks."""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag
from starlette.datastructures import URL, Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from prism.inference.base import RouteDecision
from prism.routes import PERSONA, route_of


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
    running: int | None = absent()
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
           422: "a request the schema rejects", 429: "the server holds all the requests it may (--max-batch-size "
           "plus --max-waiting): retry after Retry-After seconds, or on another replica",
           500: "the server's own failure while generating (the reply names a request id the server log carries)",
           502: "the sidecar's upstream is unreachable",
           503: "the request outlived --request-timeout and was aborted: retry after Retry-After seconds"}
    retry = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
    return {status: {"model": ErrorResponse, "description": why[status],
                     **({"headers": retry} if status in (429, 503) else {})} for status in statuses}


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


PROTECTED = ("/v1/", "/metrics", "/admin/")  # what the API key guards (/health stays open for probes)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. "name": accepted and ignored
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI fields PRISM does not act on (user, metadata, ...)
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # vLLM's extensions for continuing a final assistant message (a reply prefix), honored the same way
    continue_final_message: bool = False
    add_generation_prompt: bool = True


class RouteOne(BaseModel):
    """POST /v1/route with one conversation."""
    model_config = ConfigDict(extra="forbid")
    model: str = "prism"
    messages: list[ChatMessage] = Field(min_length=1)

    def conversations(self) -> list[list[dict[str, str]]]:
        return [as_dicts(self.messages)]


class RouteBatch(BaseModel):
    """POST /v1/route with a batch of conversations."""
    model_config = ConfigDict(extra="forbid")
    model: str = "prism"
    batch: list[Annotated[list[ChatMessage], Field(min_length=1)]] = Field(min_length=1, max_length=1024)

    def conversations(self) -> list[list[dict[str, str]]]:
        return [as_dicts(c) for c in self.batch]


def _route_request_kind(value: Any) -> str | None:
    if isinstance(value, RouteOne | RouteBatch):
        return "messages" if isinstance(value, RouteOne) else "batch"
    if isinstance(value, dict) and ("messages" in value) != ("batch" in value):
        return "messages" if "messages" in value else "batch"
    return None


# one conversation (`messages`) or several (`batch`), exactly one of them: a oneOf in the OpenAPI document
RouteRequest = Annotated[
    Annotated[RouteOne, Tag("messages")] | Annotated[RouteBatch, Tag("batch")],
    Discriminator(_route_request_kind, custom_error_type="one_of",
                  custom_error_message="send exactly one of messages (one conversation) or batch (a list of them)")]


def as_dicts(messages: list[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.text()} for m in messages]


def up_to_last_user_turn(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation the gate reads: everything up to its last user message (a reply prefix after it
    does not change the route)."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise ApiError(400, "the conversation has no user message to route on", param="messages")
    return messages[: users[-1] + 1]


def decision_info(decision: RouteDecision, threshold: float) -> PrismInfo:
    """The reply's `prism` object; a k-way adapter's answer also names its persona."""
    info = PrismInfo(route=decision.route, gate_probability=decision.gate_probability, forced=decision.forced,
                     threshold=threshold)
    if decision.persona is not None:
        info.persona = decision.persona
    return info


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        body = ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status, headers={**self.headers, **(headers or {})})


def check_model(name: str, models: list[str]) -> tuple[str, str | None]:
    """(route, k-way persona) of a served model name, or 404 for a name this server does not serve."""
    route = route_of(name)
    if name not in models or route is None:
        why = ""
        if route is not None and route[0] == PERSONA:
            why = " (this run has no adapter)" if route[1] is None else " (no k-way adapter has that persona)"
        raise ApiError(404, f"the model {name!r} does not exist{why}; available: {', '.join(models)}",
                       param="model", code="model_not_found")
    return route


def install_openai_edges(app: FastAPI, api_key: str | None, models: list[str]) -> None:
    """OpenAI-format errors for every failure, the optional bearer key on /v1/, /metrics and /admin/, and
    /v1/models (shared by `prism serve` and the routing sidecar)."""

    @app.get("/v1/models", response_model=ModelList, responses=errors(401))
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=name) for name in models])

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        # keep what the exception says in its headers: a 405 names the allowed methods (Allow, RFC 9110)
        return ApiError(exc.status_code, str(exc.detail), code=code).response(exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return ApiError(400, f"malformed JSON body: {errors[0].get('msg')}", code="invalid_json").response()
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in errors)
        param = ".".join(str(p) for p in errors[0]["loc"] if p != "body") if errors else None
        return ApiError(422, f"invalid request: {details}", param=param, code="invalid_value").response()

    if api_key:
        app.add_middleware(ApiKeyCheck, api_key=api_key)


class ApiKeyCheck:
    """ASGI middleware: the protected paths answer 401 without 'Authorization: Bearer <key>'. Plain ASGI, as
    ObserveRequests: Starlette's @app.middleware passes every streamed chunk through a memory stream between
    two tasks."""

    def __init__(self, app: Any, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and URL(scope=scope).path.startswith(PROTECTED):
            given = Headers(scope=scope).get("authorization", "")
            if not secrets.compare_digest(given.encode(), self.expected):
                message = "missing API key" if not given else "incorrect API key"
                refused = ApiError(401, f"{message}: send 'Authorization: Bearer <key>'", "authentication_error",
                                   code="invalid_api_key").response()
                await refused(scope, receive, send)
                return
        await self.app(scope, receive, send)

