"""A start-up probe of the llama.cpp build, in a subprocess, so a build that cannot run here never takes
the calling process down.

pip compiles llama.cpp with the build machine's native flags by default. Some virtual machines advertise
instructions (AMX on recent Xeons) that a process may not use, and such a build dies with SIGILL on its
first matrix product: no Python exception, no message. The probe loads a GGUF and decodes a few tokens in a
child process; its verdict is cached per build (hash of the shared libraries) and GGUF file, so it costs a
second once and nothing after.

`python -m prism.lm.llama_probe MODEL.gguf` is the probe itself.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

from prism.lm.models import cache_dir
from prism.runs import write_json_atomic

PROBE_TIMEOUT_S = 300
REBUILD_HINT = ("rebuild it without -march=native: `make llamacpp` in a PRISM checkout, or "
                "CMAKE_ARGS=\"$(scripts/llamacpp-cmake-args)\" pip install --no-cache-dir --force-reinstall --no-deps "
                "llama-cpp-python")


def library_files() -> list[Path]:
    """llama-cpp-python's shared libraries (or those $LLAMA_CPP_LIB_PATH points it to), found without
    importing the package."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    spec = importlib.util.find_spec("llama_cpp")
    if override:
        folder = Path(override)
    elif spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations)))
    else:
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and (".so" in p.name or p.suffix in (".dylib", ".dll")))


@lru_cache(maxsize=8)
def _hash_files(stamps: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _size, _mtime in stamps:
        digest.update(name.encode())
        digest.update(Path(name).read_bytes())
    return digest.hexdigest()


def build_fingerprint() -> str:
    """sha256 over the build's shared libraries (recomputed only when one changes on disk)."""
    stamps = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in library_files())
    return _hash_files(stamps)


def probe_command(gguf: Path) -> list[str]:
    return [sys.executable, "-m", "prism.lm.llama_probe", str(gguf)]


def _cache_path(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{build_fingerprint()}:{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache_dir() / "llamacpp-probe" / f"{key.hexdigest()[:32]}.json"


def describe_failure(returncode: int, stderr: str, process: str = "the probe process") -> str:
    """How a llama.cpp child process ended: the signal that killed it, or its exit code and last message."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"{process} was killed by {name} ({signal.strsignal(-returncode) or 'unknown signal'})"
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "no message")
    return f"{process} failed with exit code {returncode}: {last[:300]}"


def probe_failure(gguf: str | Path) -> str | None:
    """Why this llama.cpp build cannot run `gguf` on this machine, or None when it can."""
    gguf = Path(gguf)
    if not gguf.is_file():
        return None  # nothing to probe: loading it will fail with its own clear error
    cached = _cache_path(gguf)
    if cached.is_file():
        try:
            return json.loads(cached.read_text())["failure"]
        except (OSError, ValueError, KeyError):
            pass  # an unreadable verdict: probe again
    try:
        done = subprocess.run(probe_command(gguf), capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"the probe did not finish within {PROBE_TIMEOUT_S} s"  # not cached: a busy machine may be why
    failure = None if done.returncode == 0 else describe_failure(done.returncode, done.stderr)
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cached, {"gguf": str(gguf), "failure": failure})
    return failure


def main(argv: list[str]) -> int:
    """Load the GGUF, prefill a short prompt and decode four tokens greedily: the matrix kernels a chat uses."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=argv[0], n_ctx=64, n_batch=64, verbose=False)
    tokens = llm.tokenize(b"The capital of France is", add_bos=True)
    llm.eval(tokens)
    for _ in range(4):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
