"""What `prism serve`, the sidecar, `prism chat` and `prism export` are asked for, as configs made with
`config.option` (the CLI generates their flags from these, so every default lives here once): `ServeConfig`
(the server), `SidecarConfig` (its upstream, for `--upstream`), `ChatConfig` (the terminal chat) and
`ExportConfig` (`prism export gguf|vllm`). How a run is loaded is `inference.config.LoadConfig`."""

from __future__ import annotations

from dataclasses import dataclass

from prism.config import option
from prism.errors import PrismError
from prism.inference.gguf_export import DEFAULT_MERGED_TYPE, MERGED_TYPES
from prism.lm.decoding import SamplingParams

DEFAULT_MAX_TOKENS = 512  # a reply's length when neither the request nor the chat names one
DEFAULT_PORT = 8000
DEFAULT_MAX_WAITING = 128  # with the default batch of 32, the server holds at most 160 requests


@dataclass
class ServeConfig:
    host: str = option("interface to bind (127.0.0.1: this machine only)", default="127.0.0.1")
    port: int = option("TCP port", default=DEFAULT_PORT)
    api_key: str | None = option("require 'Authorization: Bearer KEY' on /v1/, /metrics and /admin/ (none: open)",
                                 env="PRISM_API_KEY", default=None)
    max_batch_size: int = option("requests generated together", default=32)
    max_waiting: int = option("requests held beyond --max-batch-size, waiting for a place in the batch; one more "
                              "is refused at once with 429 and Retry-After (a load balancer's cue to try another "
                              "replica)", default=DEFAULT_MAX_WAITING)
    request_timeout: float | None = option("seconds a chat request may take, waiting included: past it the request "
                                           "is aborted, its place freed, and the client gets 503 with Retry-After "
                                           "(none: no limit)", default=None)
    default_max_tokens: int = option("completion length when a request gives no max_tokens",
                                     default=DEFAULT_MAX_TOKENS)
    request_log: str | None = option("append one JSON line per request (route, gate probability, threshold, tokens, "
                                     "latency, status) to this file, for audits and recalibration", default=None)
    log_prompts: bool = option("with --request-log: also log each request's messages (off by default: prompts may "
                               "hold private data)", default=False)

    def __post_init__(self) -> None:
        for name in ("port", "max_batch_size", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise PrismError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_waiting < 0:
            raise PrismError(f"max_waiting must be 0 or more (0: refuse what the batch cannot take), got "
                             f"{self.max_waiting}")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise PrismError(f"request_timeout must be a positive number of seconds, got {self.request_timeout}")
        if self.log_prompts and not self.request_log:
            raise PrismError("--log-prompts writes the messages into the request log: add --request-log FILE")


@dataclass
class SidecarConfig:
    upstream: str | None = option("an OpenAI-compatible server's /v1 URL: load only the gate's inputs here and "
                                  "forward each request there under the route's model name", default=None)
    upstream_base_model: str | None = option("the base model's name on the upstream server", default=None)
    upstream_adapter_model: str | None = option("the adapter's name on the upstream server (its LoRA module); a "
                                                "k-way run's persona adapters are NAME-<persona> there", default=None)
    upstream_api_key: str | None = option("the upstream server's API key", env="PRISM_UPSTREAM_API_KEY", default=None)
    upstream_timeout: float = option("seconds an upstream request may take", default=600.0)

    def check(self) -> None:
        """A sidecar needs both upstream model names."""
        if not (self.upstream_base_model and self.upstream_adapter_model):
            raise PrismError("--upstream needs --upstream-base-model and --upstream-adapter-model: the names the "
                             "upstream server gives the base model and the adapter (`prism export vllm RUN` prints "
                             "them)")


@dataclass
class ChatConfig:
    route: str = option("start pinned to a route: auto, base, persona, or a k-way persona's name", default="auto")
    system: str | None = option("a system message for the whole conversation", default=None)
    max_tokens: int = option("longest answer in tokens", default=DEFAULT_MAX_TOKENS)
    temperature: float = option("0 = greedy", default=0.7)
    top_p: float = option("nucleus sampling mass", default=0.9)
    seed: int | None = option("sampling seed, for reproducible answers", default=None)

    def sampling(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              seed=self.seed)


@dataclass
class ExportConfig:
    gguf: str | None = option("gguf: the base model's GGUF (default: the embedded model's own file)", default=None)
    merged: bool = option("gguf: also write the persona model with the adapter merged in (no LoRA cost per token)",
                          default=False)
    merged_type: str = option("gguf: the merged tensors' type (the other tensors keep the base's)",
                              choices=MERGED_TYPES, default=DEFAULT_MERGED_TYPE)
    port: int = option("vllm: the sidecar's port (vLLM gets port + 1)", default=DEFAULT_PORT)
