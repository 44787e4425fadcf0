"""The weights llama.cpp decodes with: the GGUF as it is, or its weights re-encoded once by llama.cpp's own
quantizer into a type whose batched kernels this build has.

Decoding many sequences at once turns each layer's matrix-vector products into matrix products, and llama.cpp's
CPU build has fast ones (llamafile's tinyBLAS, or the repacked 8x8 kernels) only for some types. Q4_1, the
embedded model's, has none on x86: measured on the 2-core development machine (BatchedLlama, greedy, 64
tokens per stream), Q4_1 decodes 107 tok/s alone and 224 at 32 streams; the same weights re-encoded to Q8_0
decode 85 alone and 310 at 32, and prefill 553 tok/s against 316. Re-encoding from 4 bits to 8 keeps the model:
against the transformers engine's fp32 weights (the ones the gate and the adapter were trained with), Q8_0
agrees on the greedy token at 95.2% of 1,262 positions of MT-Bench replies and Q4_1 at 95.1% (mean KL 0.0039
and 0.0028); Q4_0, faster still, agreed at 71% only, so it is not offered. `auto` re-encodes to Q8_0 where
it pays: a CPU build, several sequences per context, and a file of a type with no batched kernel.

The re-encoded file is cached under PRISM's cache (`$PRISM_CACHE/gguf/`), keyed by the source file and the
llama.cpp build; the quantizer runs in a child process, so a build that cannot run here fails with a message
instead of killing the caller (as the start-up probe does for decoding).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

from prism.config import GGUF_WEIGHTS
from prism.errors import PrismError
from prism.lm.llama import default_threads
from prism.lm.llama_probe import build_fingerprint, describe_failure
from prism.lm.models import cache_dir

log = logging.getLogger("prism")
# ggml types whose matrix products have no batched kernel in llama.cpp's x86 CPU build (measured: Q4_1);
# Q8_0 holds their values more finely than they do, so re-encoding them loses nothing the model had
NO_BATCHED_KERNEL = {"Q4_1"}
QUANTIZE_TIMEOUT_S = 900
# types whose prompts may prefill in one decode: llama.cpp splits a batch of prompts of unequal lengths into
# ubatches of equal ones, and a row's result must not depend on that split. Measured on the embedded model, three
# prompts of 32, 33 and 34 tokens in one decode: on Q8_0 each got the logits it gets alone, to the bit; on Q4_1 the
# third was 0.46 off in a logit (and F32 matrices round by batch size)
SHARED_PREFILL_TYPES = {"Q8_0"}


def file_types(path: Path) -> set[str]:
    """The ggml types of a GGUF's matrices (vectors such as norms are F32 in every file and say nothing)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf's reader raises what its parsing hits first on a damaged file
        raise PrismError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}): pass the GGUF of the "
                         "run's base model with --gguf") from None
    return {t.tensor_type.name for t in reader.tensors if len(t.shape) > 1}


def prefills_together(path: Path) -> bool:
    """Whether prompts on this GGUF's weights may share a decode (every matrix of a type in SHARED_PREFILL_TYPES)."""
    types = file_types(path)
    return bool(types) and types <= SHARED_PREFILL_TYPES


def has_gpu_offload() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def chosen_type(path: Path, choice: str, sequences: int) -> str | None:
    """The type to re-encode `path` to, or None to decode the file as it is."""
    if choice not in GGUF_WEIGHTS:
        raise PrismError(f"--gguf-weights must be one of {', '.join(GGUF_WEIGHTS)}, got {choice!r}")
    if choice == "as-is":
        return None
    if choice != "auto":
        return choice
    if sequences < 2 or has_gpu_offload():  # one stream is memory-bound: the smaller file is faster (107 vs 85)
        return None
    return "q8_0" if file_types(path) & NO_BATCHED_KERNEL else None


def decode_weights(path: Path, choice: str, sequences: int) -> tuple[Path, str]:
    """(the GGUF llama.cpp should load for `sequences` sequences per context, what it holds: "as-is" or the
    type it was re-encoded to)."""
    target = chosen_type(path, choice, sequences)
    if target is None:
        return path, "as-is"
    return reencoded(path, target), target


def _cache_prefix(path: Path) -> str:
    """What every re-encoding of the file at this path is named after (a re-export overwrites the file there)."""
    return f"{path.stem}.{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}"


def _cached_path(path: Path, target: str) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{build_fingerprint()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{_cache_prefix(path)}.{key}.{target}.gguf"


def reencoded(path: Path, target: str) -> Path:
    """`path` re-encoded to `target` by llama.cpp's quantizer (from the dequantized weights), made once."""
    if not path.is_file():
        raise PrismError(f"the GGUF {path} does not exist")
    out = _cached_path(path, target)
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f"{out.name}.{os.getpid()}.partial")
    log.info("re-encoding %s to %s for llama.cpp's batched kernels (once; cached as %s)", path.name,
             target.upper(), out)
    try:
        done = subprocess.run([sys.executable, "-m", "prism.lm.llama_weights", str(path), str(partial), target],
                              capture_output=True, text=True, timeout=QUANTIZE_TIMEOUT_S)
        if done.returncode != 0 or not partial.is_file():
            failure = describe_failure(done.returncode, done.stderr, "the quantizer")
            raise PrismError(f"llama.cpp could not re-encode {path.name} to {target.upper()}: {failure}; pass "
                             "--gguf-weights as-is to decode the file as it is")
        os.replace(partial, out)  # whole or absent: another process may be making the same file
        for stale in out.parent.glob(f"{_cache_prefix(path)}.*.{target}.gguf"):
            if stale != out:  # an earlier state of the same file (re-exported, or another llama.cpp build)
                stale.unlink(missing_ok=True)
    except subprocess.TimeoutExpired:
        raise PrismError(f"re-encoding {path.name} took over {QUANTIZE_TIMEOUT_S} s; pass --gguf-weights as-is "
                         "to decode the file as it is") from None
    except OSError as exc:
        raise PrismError(f"cannot write the re-encoded GGUF under {out.parent}: {exc}; free some space, set "
                         "PRISM_CACHE to another folder, or pass --gguf-weights as-is") from None
    finally:
        partial.unlink(missing_ok=True)
    return out


FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "f16": "LLAMA_FTYPE_MOSTLY_F16"}


def main(argv: list[str]) -> int:
    """`python -m prism.lm.llama_weights SOURCE OUT TYPE`: the quantizer itself (what `reencoded` runs)."""
    import llama_cpp

    source, out, target = argv
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[target])
    params.allow_requantize = True  # from the dequantized weights, as llama-quantize --allow-requantize does
    params.nthread = default_threads()
    status = llama_cpp.llama_model_quantize(source.encode(), out.encode(), params)
    if status != 0:
        print(f"llama_model_quantize returned {status}", file=sys.stderr)
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
