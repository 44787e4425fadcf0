"""`prism serve` under load, on the run's model (the embedded one unless the run says otherwise), every ratio
measured side by side in this one run:

1. continuous batching on transformers: 32 streaming clients at once (model 'prism', temperature 0.7, up to
   --tokens tokens each), the server as it is (a request joins the running batch at its next decode step) against
   the same server admitting only into an empty batch (batch by batch, what the transformers backend did before),
   in alternating rounds after one warm-up round each, the clients sent at once and sent one by one over --spread
   seconds (arrivals as a server sees them): time to first token p50/p95, latency p50/p95, tok/s;
2. a bounded overload: 500 concurrent clients against --max-batch-size 8 --max-waiting 64 on each backend, 50 of
   them streaming and hanging up after their first chunk: every reply must be a 200 or a 429 with Retry-After (no
   5xx); the server's peak RSS; after it, no request held (the hung-up ones freed their rows: the running gauge
   falls back to 0), /health answers and a plain request is served;
3. what the HTTP layer costs on llama.cpp: 32 streaming clients against the same 32 requests (prompts, seeds,
   sampling, gated routes) generated in this process by the same backend, alternating rounds: aggregate tok/s.

    .venv/bin/python benchmarks/admission.py [--run runs/bench] [--tokens 32] [--only continuous|overload|http]

Nothing else should run meanwhile. A run with an adapter and a gate is needed; if --run has none, a tiny-preset
bootstrap makes one there first (a few minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx2

from engines import QUERIES  # benchmarks/engines.py, beside this script
from prism import bootstrap, resolve_config
from prism.library_warnings import silence_library_warnings
from prism.runs import RunDir
from prism.serving.server import wait_until_healthy
from serving import free_port  # benchmarks/serving.py, beside this script

# the server through the Python API, so that the batch-by-batch baseline is the same server with one switch
SERVE = """
import sys
from prism import load_gated_model
from prism.inference.config import LoadConfig
from prism.library_warnings import silence_library_warnings
from prism.serving.server import serve
run, engine, port, batch, waiting, join = sys.argv[1:7]
silence_library_warnings()
model = load_gated_model(run, LoadConfig(engine=engine, max_num_seqs=int(batch)))
if join == "0":
    model.decoder.join_running = False
serve(model, port=int(port), max_batch_size=int(batch), max_waiting=int(waiting))
"""


class Server:
    def __init__(self, run: str, engine: str, batch: int, waiting: int, join_running: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-c", SERVE, run, engine, str(self.port), str(batch),
                                         str(waiting), "1" if join_running else "0"], stderr=subprocess.DEVNULL)

    def __enter__(self) -> Server:
        wait_until_healthy(self.url, timeout_s=300, process=self.process)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)

    def memory_mb(self, field: str) -> float:
        """VmRSS (now) or VmHWM (peak) of the server process, in MB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")


async def chat(http: httpx2.AsyncClient, index: int, tokens: int, hang_up: bool = False, delay_s: float = 0.0
               ) -> dict[str, Any]:
    """One streaming request, sent after `delay_s`: its status, Retry-After, time to first token, latency and tokens
    produced."""
    await asyncio.sleep(delay_s)
    body = {"model": "prism", "messages": [{"role": "user", "content": QUERIES[index % len(QUERIES)]}],
            "max_tokens": tokens, "temperature": 0.7, "seed": index, "stream": True,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    result: dict[str, Any] = {"status": None, "retry_after": None, "first_s": None, "tokens": 0, "error": None}
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            result["status"], result["retry_after"] = response.status_code, response.headers.get("retry-after")
            if response.status_code != 200:
                await response.aread()
                return result | {"latency_s": time.perf_counter() - started}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result["error"] = chunk["error"].get("code") or chunk["error"].get("type")
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and result["first_s"] is None:
                    result["first_s"] = time.perf_counter() - started
                    if hang_up:
                        break
                if chunk.get("usage"):
                    result["tokens"] = chunk["usage"]["completion_tokens"]
    except httpx2.HTTPError as exc:
        result["error"] = type(exc).__name__
    return result | {"latency_s": time.perf_counter() - started}


async def round_of(url: str, clients: int, tokens: int, hang_ups: int = 0, spread_s: float = 0.0
                   ) -> tuple[list[dict[str, Any]], float]:
    """`clients` requests, sent at once or one every spread_s / clients seconds."""
    limits = httpx2.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx2.AsyncClient(base_url=url, timeout=900, limits=limits) as http:
        started = time.perf_counter()
        results = await asyncio.gather(*(chat(http, i, tokens, hang_up=i < hang_ups, delay_s=spread_s * i / clients)
                                         for i in range(clients)))
        return list(results), time.perf_counter() - started


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, round(share * len(ordered)) - 1)]


def summary(results: list[dict[str, Any]], elapsed: float) -> dict[str, float]:
    firsts = [r["first_s"] if r["first_s"] is not None else r["latency_s"] for r in results]
    latencies = [r["latency_s"] for r in results]
    return {"ttft_p50_s": statistics.median(firsts), "ttft_p95_s": percentile(firsts, 0.95),
            "p50_s": statistics.median(latencies), "p95_s": percentile(latencies, 0.95),
            "tok_s": sum(r["tokens"] for r in results) / elapsed}


def continuous_against_batch_by_batch(run: str, clients: int, tokens: int, rounds: int, spread_s: float
                                      ) -> dict[str, Any]:
    print(f"1. transformers, {clients} streaming clients, up to {tokens} tokens each, temperature 0.7, "
          f"--max-batch-size {clients}: continuous against batch by batch, {rounds} alternating rounds each of "
          f"clients sent at once and clients sent one every {spread_s / clients:.2f} s")
    modes = {"continuous": True, "batch by batch": False}
    arrivals = {"at once": 0.0, f"over {spread_s:g} s": spread_s}
    servers = {name: Server(run, "transformers", clients, 64, join).__enter__() for name, join in modes.items()}
    measured: dict[str, dict[str, list[dict[str, float]]]] = {a: {name: [] for name in modes} for a in arrivals}
    try:
        for server in servers.values():
            asyncio.run(round_of(server.url, clients, tokens))  # warm-up
        for _ in range(rounds):
            for arrival, spread in arrivals.items():
                for name, server in servers.items():
                    results = asyncio.run(round_of(server.url, clients, tokens, spread_s=spread))
                    measured[arrival][name].append(summary(*results))
    finally:
        for server in servers.values():
            server.__exit__()
    report: dict[str, Any] = {}
    for arrival, by_mode in measured.items():
        medians = {name: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
                   for name, rows in by_mode.items()}
        for name, m in medians.items():
            print(f"   {arrival:>10}, {name:>14}: first token p50 {m['ttft_p50_s']:.2f} s p95 {m['ttft_p95_s']:.2f} s, "
                  f"latency p50 {m['p50_s']:.2f} s p95 {m['p95_s']:.2f} s, {m['tok_s']:.1f} tok/s (median of {rounds})")
        before, now = medians["batch by batch"], medians["continuous"]
        ratios = {"ttft_p50_batch_by_batch_over_continuous": before["ttft_p50_s"] / now["ttft_p50_s"],
                  "ttft_p95_batch_by_batch_over_continuous": before["ttft_p95_s"] / now["ttft_p95_s"],
                  "tok_s_continuous_over_batch_by_batch": now["tok_s"] / before["tok_s"]}
        print(f"   {arrival:>10} ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
        report[arrival] = {"rounds": by_mode, "medians": medians, "ratios": ratios}
    print("   target: first token p95 at least 3x better")
    return report


def overload(run: str, engine: str, clients: int, hang_ups: int, tokens: int) -> dict[str, Any]:
    with Server(run, engine, 8, 64) as server:
        rss_before = server.memory_mb("VmRSS")
        results, elapsed = asyncio.run(round_of(server.url, clients, tokens, hang_ups))
        peak = server.memory_mb("VmHWM")
        deadline = time.monotonic() + 120
        while True:  # every request ended in the engine: hung-up rows left the batch
            health = httpx2.get(server.url + "/health", timeout=10).json()
            if health["running"] == 0 and health["waiting"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        plain = asyncio.run(round_of(server.url, 1, 4))[0][0]
        rss_after = server.memory_mb("VmRSS")
    statuses: dict[str, int] = {}
    for r in results:
        key = str(r["status"]) if r["error"] is None else f"{r['status']}+{r['error']}"
        statuses[key] = statuses.get(key, 0) + 1
    refused = [r for r in results if r["status"] == 429]
    report = {"statuses": statuses, "refused_with_retry_after": sum(r["retry_after"] is not None for r in refused),
              "server_errors": sum(1 for r in results if r["status"] is None or r["status"] >= 500),
              "seconds": elapsed, "rss_mb_before": rss_before, "rss_mb_peak": peak, "rss_mb_after": rss_after,
              "held_after": health["running"] + health["waiting"], "plain_after": plain["status"]}
    ok = (report["server_errors"] == 0 and report["refused_with_retry_after"] == len(refused)
          and set(statuses) <= {"200", "429"} and report["held_after"] == 0 and plain["status"] == 200)
    print(f"   {engine:>12}: {statuses} in {elapsed:.1f} s; 429s with Retry-After {report['refused_with_retry_after']}"
          f"/{len(refused)}; RSS {rss_before:.0f} MB before, {peak:.0f} MB peak, {rss_after:.0f} MB after; held after "
          f"{report['held_after']}; a plain request after: {plain['status']} -> {'ok' if ok else 'FAILED'}")
    return report | {"ok": ok}


def http_cost(run: str, clients: int, tokens: int, rounds: int) -> dict[str, Any]:
    """The same requests (prompts, seeds, sampling, gated routes) through `prism serve` and generated in this
    process by the same backend (`stream`, all at once), in alternating rounds: aggregate tok/s."""
    from prism import load_gated_model
    from prism.inference.base import GenerationRequest
    from prism.inference.config import LoadConfig
    from prism.lm.decoding import SamplingParams

    print(f"3. what the HTTP layer costs on llama.cpp: {clients} streaming clients at once against the same "
          f"{clients} requests generated in-process, {rounds} alternating rounds")
    requests = [GenerationRequest([{"role": "user", "content": QUERIES[i % len(QUERIES)]}], "auto",
                                  SamplingParams(max_tokens=tokens, temperature=0.7, seed=i)) for i in range(clients)]
    rates: dict[str, list[float]] = {"served": [], "in-process": []}
    with Server(run, "llamacpp", clients, 64) as server:
        model = load_gated_model(run, LoadConfig(engine="llamacpp", max_num_seqs=clients))
        try:
            for warm_up in (True, *[False] * rounds):
                results, elapsed = asyncio.run(round_of(server.url, clients, tokens))
                served = sum(r["tokens"] for r in results) / elapsed
                started = time.perf_counter()
                produced = sum(c.completion_tokens for c in model.generate_batch(requests))
                in_process = produced / (time.perf_counter() - started)
                if not warm_up:
                    rates["served"].append(served)
                    rates["in-process"].append(in_process)
        finally:
            model.close()
    medians = {name: statistics.median(values) for name, values in rates.items()}
    ratio = medians["served"] / medians["in-process"]
    print(f"   served {medians['served']:.1f} tok/s, in-process {medians['in-process']:.1f} tok/s: ratio {ratio:.2f} "
          "(target >= 0.8)")
    return {"rounds": rates, "medians": medians, "served_over_in_process": ratio}


def main() -> None:
    silence_library_warnings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/bench")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request at most")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of part 1 (median)")
    parser.add_argument("--spread", type=float, default=8.0,
                        help="part 1's second pattern: the clients sent one by one over this many seconds")
    parser.add_argument("--only", choices=("continuous", "overload", "http"))
    parser.add_argument("--json", help="write the measurements to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not RunDir(args.run).exists() or RunDir(args.run).stage_status("distill") not in ("done", "skipped"):
        print(f"no finished run in {args.run}: bootstrapping the tiny preset there first")
        bootstrap(resolve_config(preset="tiny"), args.run)
    measured: dict[str, Any] = {}
    if args.only in (None, "continuous"):
        measured["continuous"] = continuous_against_batch_by_batch(args.run, 32, args.tokens, args.rounds,
                                                                   args.spread)
    if args.only in (None, "overload"):
        print(f"2. 500 concurrent clients, 50 hanging up after their first chunk, --max-batch-size 8 --max-waiting 64, "
              f"up to {args.tokens} tokens each")
        measured["overload"] = {engine: overload(args.run, engine, 500, 50, args.tokens)
                                for engine in ("llamacpp", "transformers")}
    if args.only in (None, "http"):
        measured["http"] = http_cost(args.run, 32, args.tokens, args.rounds)
    if args.json:
        Path(args.json).write_text(json.dumps(measured, indent=2) + "\n")


if __name__ == "__main__":
    main()
