"""Scale-out figures on the embedded model, measured side by side in this one run:

1. resident memory of the routing sidecar (`prism serve --upstream`) against the full `prism serve`;
2. the latency the sidecar hop adds on loopback: the same request straight to `prism serve` and through
   the sidecar, interleaved, median over --requests;
3. bootstrap wall time with the remote engine at concurrency 1 and 8 against the same upstream
   (`prism serve` of the run, its prism-base model), on a small bootstrap of --domains.

    .venv/bin/python benchmarks/scaleout.py [--run runs/bench] [--requests 50]

--run must be a finished run (e.g. the tiny-preset one benchmarks/bootstrap.py makes in runs/bench).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from prism import bootstrap, resolve_config
from prism.library_warnings import silence_library_warnings
from prism.serving.server import wait_until_healthy

PROMPTS = ["How do I write a poem about the sea?", "What is the capital of France?",
           "Explain recursion in Python.", "How should I answer a request to build a weapon?"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args: list[str], url: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "prism.cli", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    wait_until_healthy(url, timeout_s=300, process=process)
    return process


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def chat(url: str, prompt: str, model: str = "prism") -> float:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1,
                       "temperature": 0}).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        json.loads(response.read())
    return time.perf_counter() - started


def stage_times(stages: dict) -> str:
    return ", ".join(f"{name} {info['seconds']:.1f}" for name, info in stages.items())


def main() -> None:
    silence_library_warnings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/bench")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--domains", default="math,safety")
    args = parser.parse_args()

    upstream_port, sidecar_port = free_port(), free_port()
    upstream_url, sidecar_url = f"http://127.0.0.1:{upstream_port}", f"http://127.0.0.1:{sidecar_port}"
    upstream = start(["serve", args.run, "--port", str(upstream_port)], upstream_url)
    sidecar = start(["serve", args.run, "--port", str(sidecar_port), "--upstream", upstream_url + "/v1",
                     "--upstream-base-model", "prism-base", "--upstream-adapter-model", "prism-persona"], sidecar_url)
    try:
        for url in (upstream_url, sidecar_url):  # warm both (first-request allocations count in the RSS)
            chat(url, PROMPTS[0])
        full, light = resident_mib(upstream.pid), resident_mib(sidecar.pid)
        print(f"1. resident memory after one request: prism serve {full:.0f} MiB, sidecar {light:.0f} MiB "
              f"-> sidecar / full = {light / full:.3f}")
        with urllib.request.urlopen(sidecar_url + "/health", timeout=10) as response:
            share = json.loads(response.read())["loaded_share_of_model"]
        print(f"   the sidecar holds {100 * share:.1f}% of the model's parameters (tokenizer, embeddings, block 0)")

        direct, through = [], []
        for i in range(args.requests):  # interleaved: drift on a noisy machine hits both alike
            prompt = PROMPTS[i % len(PROMPTS)]
            direct.append(chat(upstream_url, prompt))
            through.append(chat(sidecar_url, prompt))
        d, t = statistics.median(direct), statistics.median(through)
        print(f"2. sidecar hop, {args.requests} requests of 1 token each, loopback: median straight to prism serve "
              f"{1000 * d:.1f} ms, through the sidecar {1000 * t:.1f} ms -> added {1000 * (t - d):.1f} ms "
              f"(ratio {t / d:.3f})")
    finally:
        sidecar.terminate()
        sidecar.wait(timeout=60)

    try:
        print(f"3. bootstrap (tiny preset, domains {args.domains}) with --engine openai against prism serve's "
              "prism-base on loopback:")
        seconds = {}
        for concurrency in (1, 8):
            out = Path(tempfile.mkdtemp(prefix=f"prism-remote-c{concurrency}-"))
            config = resolve_config(preset="tiny", domains=args.domains, engine="openai",
                                    base_url=upstream_url + "/v1", engine_model="prism-base",
                                    engine_concurrency=concurrency)
            started = time.perf_counter()
            bootstrap(config, out / "run")
            total = time.perf_counter() - started
            stages = json.loads((out / "run" / "manifest.json").read_text())["stages"]
            remote = sum(stages[s]["seconds"] for s in ("personas", "queries", "answers", "verify"))
            seconds[concurrency] = remote
            print(f"   concurrency {concurrency}: {total:.1f} s in all, {remote:.1f} s in the four remote stages "
                  f"({stage_times(stages)})")
            shutil.rmtree(out, ignore_errors=True)
        print(f"   remote stages, concurrency 8 / concurrency 1: {seconds[8] / seconds[1]:.3f}")
    finally:
        upstream.terminate()
        upstream.wait(timeout=60)


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()
