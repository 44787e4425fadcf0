"""How a finished run is loaded for inference (`LoadConfig`): the backend and its files, the device, the
context window, the routing and the threshold. `prism chat`, `prism serve`, `prism export` and the sidecar
generate their loading flags from it, and `load_gated_model` and the backends' `from_run` read it: its
defaults are the only ones."""

from __future__ import annotations

from dataclasses import dataclass

from prism.config import DEFAULT_DEVICE, DEFAULT_GGUF_WEIGHTS, GGUF_WEIGHTS, GGUF_WEIGHTS_HELP, option
from prism.errors import PrismError
from prism.lm.gate import check_threshold
from prism.lm.llama import BACKENDS

ROUTING_CHOICES = ("auto", "binary", "kway")
PERSONA_MODELS = ("auto", "merged", "lora")
KV_CACHE_DTYPES = ("f16", "f32")


@dataclass
class LoadConfig:
    engine: str = option("auto: llama.cpp when the model is GGUF (the embedded default, or --gguf) and "
                         "llama-cpp-python is installed, else transformers", choices=BACKENDS, default="auto")
    gguf: str | None = option("llamacpp: the GGUF of the run's base model (default: the embedded model's, or the "
                              "one `prism export gguf --gguf` recorded)", default=None)
    threshold: float | None = option("route to the adapter when P(persona) >= this (default: the run's saved "
                                     "threshold)", default=None)
    device: str = option("'auto', 'cpu', 'cuda', ...", default=DEFAULT_DEVICE)
    max_model_len: int | None = option("context window in tokens (default: the model's; llama.cpp: at most 2048, "
                                       "which every sequence it decodes at once reserves)", default=None)
    max_num_seqs: int = option(
        "requests decoded together as they come (`submit`): on llamacpp per route, each with its own KV cache of "
        "--max-model-len tokens; on transformers the rows of the running batch (prism serve sets it to its "
        "--max-batch-size, prism chat to 1)", cli=False, default=8)
    kv_cache_dtype: str = option(
        "llamacpp: the KV cache's type, and with it the attention: f16 under flash attention (llama.cpp's "
        "defaults, faster) or f32 without it (twice the memory; attention in full precision, as PyTorch's); either "
        "way a request gets the same tokens whatever is decoded beside it",
        choices=KV_CACHE_DTYPES, default="f16")
    gguf_weights: str = option(f"llamacpp: {GGUF_WEIGHTS_HELP}", choices=GGUF_WEIGHTS,
                              default=DEFAULT_GGUF_WEIGHTS)
    threads: int | None = option("llamacpp: CPU threads (default: every core this process may use)", default=None)
    persona_model: str = option("llamacpp: the persona route on the merged persona GGUF (`prism export gguf "
                                "--merged`) or on the base GGUF with the LoRA; auto takes the merged one when it "
                                "exists", choices=PERSONA_MODELS, default="auto")
    routing: str = option("which gate routes: binary (base or the adapter), kway (base or one persona's adapter; a "
                          "run bootstrapped with --routing kway) or auto (kway when the run has it)",
                          choices=ROUTING_CHOICES, default="auto")
    trust_remote_code: bool = option("allow the model's own code from the Hub (only if you trust it)", default=False)

    def __post_init__(self) -> None:
        for name, allowed in (("engine", BACKENDS), ("persona_model", PERSONA_MODELS), ("routing", ROUTING_CHOICES),
                              ("kv_cache_dtype", KV_CACHE_DTYPES), ("gguf_weights", GGUF_WEIGHTS)):
            if getattr(self, name) not in allowed:
                raise PrismError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.threshold is not None:
            check_threshold(self.threshold)
        for name in ("max_model_len", "threads", "max_num_seqs"):  # None where the option allows it
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise PrismError(f"{name} must be at least 1, got {getattr(self, name)}")
