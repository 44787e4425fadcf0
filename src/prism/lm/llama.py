"""The llama.cpp runtime (llama-cpp-python on GGUF weights): which backend a model gets, whether this build
passed its start-up probe, and the checks a GGUF must pass. Both the bootstrap's llama.cpp engine and the
llama.cpp inference backend decode on `prism.lm.llama_batch.BatchedLlama`; prompts are rendered and tokenized
by the run's own tokenizer, so llama.cpp and PyTorch see the same token ids."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from prism.errors import PrismError
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


def warn_if_openmp() -> None:
    """llama.cpp built with OpenMP (pip's default) shares libgomp with PyTorch, and once PyTorch has run a
    parallel op, llama.cpp's threads ran 3x slower: one stream on the embedded model decoded at 31 tok/s instead
    of 105 here (2 cores), with OMP_WAIT_POLICY=PASSIVE or GOMP_SPINCOUNT=0 no better; most likely libgomp's
    throttled waiting once it manages more threads than cores. `make` builds without it
    (scripts/llamacpp-cmake-args)."""
    import llama_cpp

    if "OPENMP = 1" in llama_cpp.llama_print_system_info().decode(errors="replace"):
        _warn_once("this llama-cpp-python build runs llama.cpp's threads on OpenMP, which PyTorch's OpenMP threads "
                   "slow down about 3x in this process: rebuild it with `make llamacpp` (GGML_OPENMP=OFF)")


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_vocabulary(weights: Any, tokenizer: Any, source: Path) -> None:
    """The GGUF must tokenize like the run's tokenizer: PRISM hands llama.cpp token ids, not text."""
    probe = "PRISM probe: Hello, world! 123 <|im_start|>"
    ours = encode(tokenizer, probe)
    theirs = weights.tokenize(probe.encode(), False, True)
    if ours != theirs or weights.n_vocab() < len(tokenizer):
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

