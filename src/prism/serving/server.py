"""`prism serve`: an OpenAI-compatible HTTP server for a run's gated model, PrismModel or LlamaCppModel
(FastAPI + uvicorn). The server admits requests (or refuses them: 429) and streams: each admitted request is one
async stream from the model (`GatedModel.generate_async`), which joins the backend's running batch at its next
decode step; the backend batches, the server never does."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import subprocess
import threading
import time
import urllib.request
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from prism.config import with_options
from prism.errors import ContextLengthError, PrismError, RequestError
from prism.inference.base import Completion, GatedModel, GenerationRequest, StreamEvent
from prism.inference.streams import RequestStream, RequestTimedOut
from prism.library_warnings import silence_library_warnings
from prism.lm.decoding import SamplingParams
from prism.routes import served_names
from prism.serving.config import ServeConfig
from prism.serving.metrics import ServingMetrics
from prism.serving.observe import install_observability, note_decision, note_first_token, request_record
from prism.serving.protocol import (
    ApiError,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    ChunkDelta,
    ErrorDetail,
    ErrorResponse,
    Health,
    PrismInfo,
    Usage,
    chat_responses,
    check_model,
    decision_info,
    install_openai_edges,
    reply,
)
from prism.serving.reload import reload_on_sighup
from prism.serving.request_log import RequestLog
from prism.serving.route_api import install_route_and_reload

log = logging.getLogger("prism")
T = TypeVar("T")


class Admission:
    """What the server holds: at most max_batch_size + max_waiting requests, from arrival until the engine is done
    with them (`submit` refuses one more: `QueueFull`). The server does not batch: each admitted request is one
    async stream from the model (`generate_async`), scheduled by the backend's own decoding thread."""

    def __init__(self, model: GatedModel, max_batch_size: int, on_batch: Callable[[int], None] | None = None,
                 max_waiting: int | None = None, request_timeout: float | None = None):
        self.model = model
        self.on_batch = on_batch  # told each decode step's size (the batch-size histogram)
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting  # None: no limit
        self.request_timeout = request_timeout
        self.in_flight = 0  # submitted, and not yet ended by the engine
        self.recent_seconds: deque[float] = deque(maxlen=32)  # how long the last requests held their place
        self._count_lock = threading.Lock()

    @property
    def running(self) -> int:
        """The last decode step's size."""
        return self.model.intake.running

    @property
    def batches(self) -> int:
        """Decode steps that decoded something."""
        return self.model.intake.steps

    @property
    def queued(self) -> int:
        """Requests held that are not in the running batch."""
        return max(0, self.in_flight - self.running)

    def start(self) -> None:
        self.model.intake.on_step = self.on_batch

    def stop(self) -> None:
        self.model.intake.on_step = None

    def submit(self, request: GenerationRequest) -> RequestStream:
        with self._count_lock:
            if self.max_waiting is not None and self.in_flight >= self.max_batch_size + self.max_waiting:
                raise QueueFull(self.in_flight, self.retry_after())
            self.in_flight += 1
        deadline = None if self.request_timeout is None else time.monotonic() + self.request_timeout
        return self.model.generate_async(request, on_end=self._ended, deadline=deadline)

    def retry_after(self) -> int:
        """Seconds a refused client should wait: how long the recent requests held their place (1 to 60)."""
        if not self.recent_seconds:
            return 1
        return min(60, max(1, math.ceil(sum(self.recent_seconds) / len(self.recent_seconds))))

    def _ended(self, stream: RequestStream) -> None:
        with self._count_lock:
            self.in_flight -= 1
            self.recent_seconds.append(time.monotonic() - stream.submitted)


class QueueFull(Exception):
    def __init__(self, held: int, retry_after: int):
        super().__init__(f"the server is at capacity ({held} requests held: --max-batch-size plus --max-waiting); "
                         f"retry in {retry_after} s or send it to another replica")
        self.retry_after = retry_after


def create_app(model: GatedModel, config: ServeConfig | None = None, *, metrics: bool = True,
               request_log: RequestLog | None = None, **options: Any) -> FastAPI:
    """The app of `prism serve` for a loaded run; `config` (or its fields as keywords: api_key, max_batch_size,
    default_max_tokens, ...) says how it serves, `request_log` is the opened log (ServeConfig's path is opened by
    `serve`)."""
    config = with_options(ServeConfig, config, **options)
    observed = ServingMetrics() if metrics else None
    admission = Admission(model, max_batch_size=config.max_batch_size,
                          on_batch=observed.batch_size.observe if observed is not None else None,
                          max_waiting=config.max_waiting, request_timeout=config.request_timeout)
    if observed is not None:
        observed.running.set_function(lambda: admission.running)
        observed.waiting.set_function(lambda: admission.queued)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        admission.start()
        yield
        admission.stop()

    app = FastAPI(title="PRISM", lifespan=lifespan)
    app.state.admission = admission
    models = served_names(model.has_adapter, model.personas)
    install_openai_edges(app, config.api_key, models)
    install_observability(app, observed, request_log, lambda: model.threshold)

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        status = Health(run=str(model.run_path), engine=model.engine, adapter=model.has_adapter,
                        threshold=model.threshold, waiting=admission.queued, running=admission.running,
                        batches=admission.batches,
                        routing=model.routing)
        if model.personas:
            status.personas = list(model.personas)
        return status

    install_route_and_reload(app, model, models, observed)
    served = Served(model, admission, models, config.default_max_tokens, observed, request_log)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=chat_responses(429, 500, 503))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await complete_chat(served, body, request)

    return app


@dataclass
class Served:
    """What the chat endpoint of `prism serve` works with."""

    model: GatedModel
    admission: Admission
    models: list[str]
    default_max_tokens: int
    metrics: ServingMetrics | None
    request_log: RequestLog | None


async def complete_chat(served: Served, body: ChatCompletionRequest, request: Request) -> Any:
    """POST /v1/chat/completions: the request joins the engine's running batch; its route comes first, then its text,
    whole or streamed."""
    model, observed = served.model, served.metrics
    record = request_record(request)
    record["model"] = body.model
    route, persona = check_model(body.model, served.models)
    generation = to_generation_request(model, body, served.default_max_tokens, route, persona)
    if served.request_log is not None and served.request_log.log_prompts:
        record["messages"] = generation.messages
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"  # also the id a failure's reply and log line carry
    try:
        stream = served.admission.submit(generation)
    except QueueFull as full:
        if observed is not None:
            observed.refused.labels("at_capacity").inc()
        raise ApiError(429, str(full), "rate_limit_error", code="server_at_capacity",
                       headers={"Retry-After": str(full.retry_after)}) from None
    hangup = asyncio.ensure_future(_until_disconnected(request))
    try:
        first = await _unless_hung_up(stream.next(), hangup, stream, completion_id, served)
        prism = _prism_info(first, model.threshold)
        note_decision(record, observed, "chat", prism)
        headers = {"x-prism-route": prism.route}
        if body.stream:  # from here on the streaming response notices a hang-up itself
            chunks = _sse_chunks(stream, body, completion_id, prism, record, served)
            return StreamingResponse(chunks, media_type="text/event-stream", headers=headers)
        text, event = await _unless_hung_up(_whole_text(stream, record, observed), hangup, stream, completion_id,
                                            served)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    finally:
        hangup.cancel()
    done = event.completion
    note_usage(record, done)
    choice = Choice(index=0, message=AssistantMessage(content="".join(text)),
                    logprobs=None if done.logprobs is None else {"content": done.logprobs},
                    finish_reason=_finish_reason(done.finish_reason))
    return reply(ChatCompletion(id=completion_id, created=int(time.time()), model=body.model, choices=[choice],
                                usage=_usage(done), prism=prism), headers)


CLIENT_CLOSED = 499  # nginx's status for a client that closed the connection before its reply: in the request log


class ClientGone(Exception):
    """The client closed the connection before its reply."""


async def _until_disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body was read already: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_hung_up(work: Awaitable[T], hangup: asyncio.Future[None], stream: RequestStream,
                          completion_id: str, served: Served) -> T:
    """`work`'s result, or ClientGone with the request aborted (a waiting one never starts, a running one leaves
    the batch at the next step) when the client hangs up first; an error of the engine as the API error it is."""
    task = asyncio.ensure_future(work)
    await asyncio.wait({task, hangup}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        task.cancel()
        stream.abort()
        raise ClientGone
    try:
        return task.result()
    except Exception as exc:
        raise _as_api_error(exc, completion_id, served) from None


async def _whole_text(stream: RequestStream, record: dict[str, Any], observed: ServingMetrics | None
                      ) -> tuple[list[str], StreamEvent]:
    """A non-streaming reply's text deltas, up to and with the event that completes it."""
    text = []
    while True:
        event = await stream.next()
        text.append(event.delta)
        note_first_token(record, observed)
        if event.completion is not None:
            return text, event


def to_generation_request(model: GatedModel, body: ChatCompletionRequest, default_max_tokens: int, route: str,
                          persona: str | None) -> GenerationRequest:
    """Validate what the schema cannot (context window, stop strings) before the request joins a batch."""
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prefix = ""
    if body.continue_final_message:
        if messages[-1]["role"] != "assistant" or body.add_generation_prompt:
            raise ApiError(400, "continue_final_message needs the last message to be the assistant's, and "
                           "add_generation_prompt false", param="messages")
        prefix = messages.pop()["content"]
    elif messages[-1]["role"] != "user":
        raise ApiError(400, f"the last message is from the {messages[-1]['role']}: end with a user message, or "
                       "send continue_final_message true (and add_generation_prompt false) to continue an "
                       "assistant message", param="messages")
    if body.logprobs and body.stream:
        raise ApiError(400, "logprobs are returned only without streaming: send stream false", param="logprobs")
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs true", param="top_logprobs")
    try:
        prompt_tokens = model.prompt_tokens(messages)
        requested = body.max_completion_tokens or body.max_tokens
        if requested is not None:
            model.check_length(prompt_tokens, requested)
            max_tokens = requested
        else:
            model.check_length(prompt_tokens, 1)
            max_tokens = min(default_max_tokens, model.max_model_len - prompt_tokens)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                seed=body.seed, stop=stop,
                                logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    except ContextLengthError as exc:
        raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from None
    except RequestError as exc:
        raise ApiError(400, str(exc)) from None
    # no cancel event of its own: generate_async gives every request one
    return GenerationRequest(messages, route, params, assistant_prefix=prefix, persona=persona)


def _as_api_error(exc: Exception, request_id: str, served: Served) -> ApiError:
    """A failure while generating, typed by whose fault it is: past --request-timeout, 503 with Retry-After (the
    request was aborted); a RequestError says what the request asked that cannot be served (400); anything else,
    a PrismError of the engine's included, is the server's fault (500), logged with its traceback under the
    request's id, and the reply names only that id (what failed inside the server is not the client's to read)."""
    if isinstance(exc, RequestTimedOut):
        if served.metrics is not None:
            served.metrics.refused.labels("timeout").inc()
        admission = served.admission
        return ApiError(503, f"the request took longer than the server's --request-timeout "
                        f"({admission.request_timeout:g} s) and was aborted", "server_error", code="request_timeout",
                        headers={"Retry-After": str(admission.retry_after())})
    if isinstance(exc, RequestError):
        code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else None
        return ApiError(400, str(exc), param="messages" if code else None, code=code)
    log.error("request %s failed while generating", request_id, exc_info=exc)
    return ApiError(500, f"the server failed while generating this reply (request id {request_id}; the server log "
                    "has the details)", "server_error")


def _prism_info(event: StreamEvent, threshold: float) -> PrismInfo:
    assert event.decision is not None, "the first event of a request is its route"
    return decision_info(event.decision, threshold)


def note_usage(record: dict[str, Any], done: Completion) -> None:
    record.update(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens)


def _finish_reason(reason: str) -> Literal["stop", "length"]:
    return "length" if reason == "length" else "stop"


def _usage(done: Completion) -> Usage:
    return Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                 total_tokens=done.prompt_tokens + done.completion_tokens)


def server_sent(model: BaseModel) -> str:
    return f"data: {json.dumps(model.model_dump(mode='json'))}\n\n"


async def _sse_chunks(stream: RequestStream, body: ChatCompletionRequest, completion_id: str, prism: PrismInfo,
                      record: dict[str, Any], served: Served) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(delta: ChunkDelta, finish: Literal["stop", "length"] | None = None, **extra: Any) -> str:
        choice = ChunkChoice(index=0, delta=delta, logprobs=None, finish_reason=finish)
        return server_sent(ChatCompletionChunk(id=completion_id, created=created, model=body.model, choices=[choice],
                                               **extra))

    try:
        yield chunk(ChunkDelta(role="assistant", content=""), prism=prism)
        while True:
            try:
                event = await stream.next()
            except Exception as exc:
                error = _as_api_error(exc, completion_id, served)
                yield server_sent(ErrorResponse(error=ErrorDetail(message=error.message, type=error.type,
                                                                  code=error.code)))
                break
            if event.delta:
                note_first_token(record, served.metrics)
                yield chunk(ChunkDelta(content=event.delta))
            if event.completion is not None:
                note_usage(record, event.completion)
                yield chunk(ChunkDelta(), _finish_reason(event.completion.finish_reason))
                if body.stream_options and body.stream_options.include_usage:
                    yield server_sent(ChatCompletionChunk(id=completion_id, created=created, model=body.model,
                                                          choices=[], usage=_usage(event.completion)))
                break
        yield "data: [DONE]\n\n"
    finally:
        stream.abort()  # a client that hangs up stops its row at the next step


def wait_until_healthy(base_url: str, timeout_s: float = 120.0, process: subprocess.Popen | None = None) -> None:
    """Block until `base_url`/health answers (a server started in another process), or raise."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2):
                return
        except OSError:
            if process is not None and process.poll() is not None:
                raise PrismError(f"the server process exited with code {process.returncode}") from None
            if time.monotonic() > deadline:
                raise PrismError(f"no server answered at {base_url}/health within {timeout_s:.0f} s") from None
            time.sleep(0.2)


def serve(model: GatedModel, config: ServeConfig | None = None, **options: Any) -> None:
    """Serve a loaded run (`prism.load_gated_model`) until interrupted, as `config` (or its fields as keywords:
    host, port, api_key, ...) says; SIGHUP reloads the run."""
    import uvicorn

    config = with_options(ServeConfig, config, **options)
    silence_library_warnings()
    requests = RequestLog(config.request_log, log_prompts=config.log_prompts) if config.request_log else None
    app = create_app(model, config, request_log=requests)
    reload_on_sighup(app.state.reload)
    log.info("serving %s on http://%s:%d/v1 with %s (%s routing; models: %s)", model.run_path, config.host,
             config.port, model.engine, model.routing, ", ".join(served_names(model.has_adapter, model.personas)))
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
