"""The llama.cpp runtime (llama-cpp-python on GGUF weights): which backend a model gets, opening a build
that passed its start-up probe, and one context fed token ids. Both the bootstrap's llama.cpp engine and
the llama.cpp inference backend run on `LlamaContext`; prompts are rendered and tokenized by the run's own
tokenizer, so llama.cpp and PyTorch see the same token ids."""

from __future__ import annotations

import atexit
import logging
import os
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prism.errors import PrismError
from prism.lm.decoding import SamplingParams, sample_token
from prism.lm.llama_probe import REBUILD_HINT, probe_failure
from prism.lm.models import EMBEDDED, embedded_gguf_path, encode

log = logging.getLogger("prism")
BACKENDS = ("auto", "llamacpp", "transformers")
INSTALL_HINT = "pip install llama-cpp-python (it compiles llama.cpp: about 10 minutes on 2 cores)"
_warned: set[str] = set()


def llama_cpp_missing() -> str | None:
    """Why llama-cpp-python cannot be used here, or None when it can."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as exc:  # ImportError, or OSError when its shared library failed to build or load
        return f"{type(exc).__name__}: {exc}"
    return None


def resolve_backend(requested: str, model: str, gguf: str | None) -> str:
    """'llamacpp' or 'transformers' for a run's model. 'auto' takes llama.cpp when the model is GGUF (the
    embedded default, or --gguf given) and the llama.cpp build loads and passes its start-up probe; otherwise
    transformers, with one warning saying why. A missing llama-cpp-python falls back whichever was asked for;
    an installed build that fails its probe is an error when llama.cpp was asked for by name."""
    if requested not in BACKENDS:
        raise PrismError(f"unknown engine {requested!r}: choose one of {', '.join(BACKENDS)}")
    if requested == "transformers":
        return "transformers"
    is_gguf = model == EMBEDDED or gguf is not None
    if not is_gguf:
        if requested == "llamacpp":
            raise PrismError(f"--engine llamacpp needs a GGUF of the model {model!r}: convert it with llama.cpp's "
                             "convert_hf_to_gguf.py and pass it with --gguf")
        return "transformers"
    missing = llama_cpp_missing()
    if missing:
        _warn_once(f"llama-cpp-python is unavailable ({missing}): using transformers, several times slower on a "
                   f"CPU. To get the fast engine: {INSTALL_HINT}")
        return "transformers"
    broken = build_failure(Path(gguf) if gguf is not None else embedded_gguf_path())
    if broken:
        if requested == "llamacpp":
            raise PrismError(broken + "; or pass --engine transformers")
        _warn_once(f"{broken}. Using transformers meanwhile, several times slower on a CPU.")
        return "transformers"
    return "llamacpp"


def build_failure(gguf: Path) -> str | None:
    """Why this llama.cpp build cannot run `gguf` here (its start-up probe failed), with how to rebuild it."""
    failure = probe_failure(gguf)
    if failure is None:
        return None
    return f"this llama.cpp build cannot run {gguf.name} on this machine ({failure}): {REBUILD_HINT}"


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_open_models: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_models() -> None:
    # llama-cpp-python frees its models in __del__, which at interpreter exit runs after its own module
    # globals are gone and prints a traceback; closing them first keeps the exit quiet.
    for llm in list(_open_models):
        llm.close()


def open_llama(path: Path, *, lora: Path | None = None, n_ctx: int, n_threads: int | None = None) -> Any:
    import llama_cpp
    from llama_cpp import Llama

    broken = build_failure(path)  # a build that dies on this model must not take this process down
    if broken:
        raise PrismError(broken)
    threads = n_threads or default_threads()
    try:
        # An F32 KV cache (llama.cpp defaults to F16) keeps the engine closer to PyTorch: on the embedded
        # model teacher-forced greedy agreement went from 96-97% to 97.5-98% (16 queries x 32 positions).
        llm = Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=n_ctx, n_batch=512,
                    n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False,
                    type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    except (ValueError, RuntimeError) as exc:
        what = f"{path} with the LoRA {lora}" if lora else str(path)
        raise PrismError(f"llama.cpp cannot load {what}: {exc}") from None
    _open_models.add(llm)
    return llm


class LlamaContext:
    """One llama.cpp context fed token ids: a prompt reuses whatever prefix the previous one left in the
    KV cache, then each step evaluates one token and returns the next-token logits."""

    def __init__(self, llm: Any):
        import llama_cpp

        self.llm = llm
        self._get_logits = llama_cpp.llama_get_logits_ith
        self.n_vocab = llm.n_vocab()

    @property
    def n_ctx(self) -> int:
        return self.llm.n_ctx()

    def logits(self) -> torch.Tensor:
        pointer = self._get_logits(self.llm.ctx, -1)
        return torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy())

    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        cached = self.llm.input_ids[: self.llm.n_tokens]
        reuse = 0
        limit = min(len(cached), len(ids) - 1)  # at least one token is evaluated, for fresh logits
        while reuse < limit and cached[reuse] == ids[reuse]:
            reuse += 1
        self.llm.n_tokens = reuse  # eval() drops the cache from here on
        self.llm.eval(list(ids[reuse:]))
        return self.logits()

    def step(self, token: int) -> torch.Tensor:
        self.llm.eval([token])
        return self.logits()

    def sample(self, ids: Sequence[int], params: SamplingParams) -> Iterator[tuple[int, torch.Tensor]]:
        """Tokens sampled after the prompt `ids`, each with the logits it was drawn from. A token is evaluated
        only when the caller asks for the next one, so stopping costs nothing."""
        generator = params.generator()
        logits = self.prefill(ids)
        while True:
            token = sample_token(logits, params, generator)
            yield token, logits
            logits = self.step(token)

    def stop_ids(self, tokenizer: Any) -> set[int]:
        """The tokens that end a reply: the run's tokenizer's EOS and the GGUF's own."""
        return {tokenizer.eos_token_id, self.llm.token_eos()} - {None, -1}

    def forget(self) -> None:
        self.llm.n_tokens = 0

    def teacher_forced_logits(self, prompt: Sequence[int], continuation: Sequence[int]) -> torch.Tensor:
        """Next-token logits after the prompt and after each continuation token but the last: (len, vocab)."""
        rows = [self.prefill(prompt)]
        rows += [self.step(token) for token in continuation[:-1]]
        return torch.stack(rows)


def check_vocabulary(context: LlamaContext, tokenizer: Any, source: Path) -> None:
    """The GGUF must tokenize like the run's tokenizer: PRISM hands llama.cpp token ids, not text."""
    probe = "PRISM probe: Hello, world! 123 <|im_start|>"
    ours = encode(tokenizer, probe)
    theirs = context.llm.tokenize(probe.encode(), add_bos=False, special=True)
    if ours != theirs or context.n_vocab < len(tokenizer):
        raise PrismError(f"{source} does not share the run's tokenizer (token ids differ): it is a GGUF of another "
                         "model; pass the GGUF of the run's base model with --gguf")


def base_gguf_for(config: dict[str, Any], base_gguf: str | Path | None) -> Path:
    """The GGUF of the run's base model: the one given, else the embedded model's own file."""
    if base_gguf is not None:
        path = Path(base_gguf).expanduser()
        if not path.is_file():
            raise PrismError(f"the base GGUF {path} does not exist: pass the GGUF file of the run's base model")
        return path.resolve()
    if config.get("model") == EMBEDDED:
        return embedded_gguf_path()
    raise PrismError(f"the run's model {config.get('model')!r} is not a GGUF model: convert it with llama.cpp's "
                     "convert_hf_to_gguf.py and pass the file with --gguf")

