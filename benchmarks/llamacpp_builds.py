"""Decode speed of two llama.cpp builds on the embedded GGUF, side by side: plain llama-cpp-python, greedy,
128 tokens after a short prompt, 2 threads, each build in its own subprocess (LLAMA_CPP_LIB_PATH points
llama-cpp-python at a build's shared libraries), rounds interleaved, best round kept.

    .venv/bin/python benchmarks/llamacpp_builds.py --build portable=.venv/lib/python3.11/site-packages/llama_cpp/lib \
        --build native=/path/to/other/build/lib [--rounds 3]

A build that dies (SIGILL on a CPU that advertises instructions it cannot run) is reported, not fatal.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

DECODE = """
import time
import numpy as np
from llama_cpp import Llama
from prism.lm.models import embedded_gguf_path
llm = Llama(model_path=str(embedded_gguf_path()), n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False)
prompt = llm.tokenize(b"Write a short story about a lighthouse keeper.", add_bos=True)
llm.eval(prompt)
started = time.perf_counter()
for _ in range(128):
    llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
print(128 / (time.perf_counter() - started))
"""


def decode_rate(lib_path: str) -> float | str:
    done = subprocess.run([sys.executable, "-c", DECODE], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "LLAMA_CPP_LIB_PATH": lib_path})
    if done.returncode != 0:
        return f"failed (exit {done.returncode})"
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", action="append", required=True, help="NAME=PATH of a build's lib folder")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    builds = dict(item.split("=", 1) for item in args.build)
    rates: dict[str, list[float | str]] = {name: [] for name in builds}
    for _ in range(args.rounds):
        for name, path in builds.items():
            rates[name].append(decode_rate(path))
    best = {}
    for name, values in rates.items():
        numbers = [v for v in values if isinstance(v, float)]
        best[name] = max(numbers) if numbers else None
        shown = ", ".join(f"{v:.1f}" if isinstance(v, float) else v for v in values)
        print(f"{name:<12} rounds: {shown}   best {'n/a' if best[name] is None else f'{best[name]:.1f}'} tok/s")
    names = list(builds)
    if len(names) == 2 and all(best[n] for n in names):
        print(f"ratio {names[0]} / {names[1]}: {best[names[0]] / best[names[1]]:.3f}")


if __name__ == "__main__":
    main()
