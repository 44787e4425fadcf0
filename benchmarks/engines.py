"""llama.cpp's batched decoding against llama.cpp one request at a time and against transformers, on the
embedded model, every ratio measured side by side in this one run:

1. aggregate decode tok/s at 1, 8 and 32 concurrent streams (greedy, base route, end-of-text ignored):
   N * (T - 1) / (W(T) - W(1)), where W(n) is the wall time of N requests of n new tokens each, so prefill
   and the first token are left out. Systems: llama.cpp batched (`max_num_seqs` = 32), llama.cpp one at a
   time (`max_num_seqs` = 1, what `prism chat` uses) and transformers batched (PrismModel); llama.cpp batched
   decodes with `--gguf-weights auto` (the Q4_1 file re-encoded to Q8_0), and once more as the file is (as-is);
2. `prism serve` in its own process under 32 and 64 concurrent streaming clients (model 'prism', gated,
   temperature 0.7), each engine in turn, after one warm-up round of the same clients (a server that has been
   up: each route's context open): tok/s in all, p50/p95 latency, p50/p95 time to first token;
3. the tiny and small presets end to end (`prism bootstrap`) on each engine (full mode only).

    .venv/bin/python benchmarks/engines.py [--run runs/bench] [--tokens 64] [--quick] [--json FILE]

Nothing else should run meanwhile: llama.cpp's threads wait for each other at every layer, and another
process on the same cores slowed one stream from 109 to under 5 tok/s here. --quick measures only the two
headline ratios (llama.cpp at 32 streams over one at a time, and prism serve on llama.cpp over transformers
at 32 clients). The run needs an adapter and a gate; if --run has none, a
tiny-preset bootstrap makes one there first (a few minutes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prism import bootstrap, load_gated_model, resolve_config
from prism.inference.base import GatedModel, GenerationRequest
from prism.library_warnings import silence_library_warnings
from prism.lm.decoding import SamplingParams
from prism.runs import RunDir
from prism.serving.server import wait_until_healthy
from serving import free_port  # benchmarks/serving.py, beside this script

QUERIES = [
    "Write a short poem about the sea at night.",
    "What is the capital of Australia?",
    "How should I store household chemicals safely?",
    "Explain recursion to a ten-year-old.",
    "Give me three tips for a job interview.",
    "Why is the sky blue?",
    "Summarise the plot of Romeo and Juliet.",
    "How do I make a cup of green tea?",
]


def queries(count: int) -> list[str]:
    # distinct prompts, so no stream reuses another's cached prefix
    return [f"{QUERIES[i % len(QUERIES)]} (request {i})" for i in range(count)]


def wall(model: GatedModel, prompts: list[str], tokens: int) -> float:
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    requests = [GenerationRequest([{"role": "user", "content": q}], "base", params) for q in prompts]
    started = time.perf_counter()
    done = model.generate_batch(requests)
    elapsed = time.perf_counter() - started
    assert all(c.completion_tokens == tokens for c in done), [c.completion_tokens for c in done]
    return elapsed


def decode_rate(model: GatedModel, streams: int, tokens: int) -> float:
    prompts = queries(streams)
    wall(model, prompts, 2)  # warm-up: the same prompts, so both timed calls find them in the prompt cache alike
    short, long = wall(model, prompts, 1), wall(model, prompts, tokens)
    return streams * (tokens - 1) / max(long - short, 1e-9)


def median_rates(models: dict[str, GatedModel], streams: int, tokens: int, rounds: int) -> dict[str, float]:
    """Each system's median over `rounds`, the systems taking turns within each round."""
    measured: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            measured[name].append(decode_rate(model, streams, tokens))
    return {name: statistics.median(values) for name, values in measured.items()}


def decode_speeds(run: str, stream_counts: list[int], tokens: int, rounds: int) -> dict[str, dict[int, float]]:
    systems = {"llama.cpp batched": dict(engine="llamacpp", max_num_seqs=max(stream_counts)),
               "llama.cpp batched as-is": dict(engine="llamacpp", max_num_seqs=max(stream_counts),
                                               gguf_weights="as-is"),
               "llama.cpp one at a time": dict(engine="llamacpp", max_num_seqs=1),
               "transformers batched": dict(engine="transformers")}
    models = {name: load_gated_model(run, **options) for name, options in systems.items()}
    rates: dict[str, dict[int, float]] = {name: {} for name in systems}
    print(f"1. aggregate decode tok/s, base route, greedy, {tokens} tokens per stream, median of {rounds} rounds; "
          "llama.cpp weights: " + ", ".join(f"{name} {model.weights_type}" for name, model in models.items()
                                              if hasattr(model, "weights_type")))
    for streams in stream_counts:
        for name, rate in median_rates(models, streams, tokens, rounds).items():
            rates[name][streams] = rate
        print(f"   {streams:>2} streams: " + ", ".join(f"{name} {rates[name][streams]:6.1f}" for name in systems))
    for model in models.values():
        model.close()
    return rates


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, round(share * len(ordered)) - 1)]


def serve_load(run: str, engine: str, clients: int, tokens: int) -> dict[str, float]:
    import openai

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "prism.cli", "serve", run, "--port", str(port),
                               "--engine", engine, "--max-batch-size", "32"], stderr=subprocess.DEVNULL)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", timeout_s=300, process=server)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=900)
        prompts = queries(clients)

        def one(index: int) -> tuple[float, float, int]:
            started = time.perf_counter()
            first, produced = None, 0
            chunks = client.chat.completions.create(
                model="prism", messages=[{"role": "user", "content": prompts[index]}], max_tokens=tokens,
                temperature=0.7, seed=index, stream=True, stream_options={"include_usage": True})
            for chunk in chunks:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - started
                if chunk.usage is not None:
                    produced = chunk.usage.completion_tokens
            latency = time.perf_counter() - started
            return latency, latency if first is None else first, produced

        with ThreadPoolExecutor(clients) as pool:  # warm-up: every route the gate picks has its context open
            list(pool.map(one, range(clients)))
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(one, range(clients)))
        elapsed = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(timeout=60)
    latencies, ttft = [r[0] for r in results], [r[1] for r in results]
    return {"tok_s": sum(r[2] for r in results) / elapsed, "p50_s": statistics.median(latencies),
            "p95_s": percentile(latencies, 0.95), "ttft_p50_s": statistics.median(ttft),
            "ttft_p95_s": percentile(ttft, 0.95)}


def serve_loads(run: str, client_counts: list[int], tokens: int) -> dict[str, dict[int, dict[str, float]]]:
    print(f"2. prism serve, model 'prism', streaming clients, up to {tokens} tokens each, temperature 0.7, "
          "--max-batch-size 32")
    results: dict[str, dict[int, dict[str, float]]] = {"llamacpp": {}, "transformers": {}}
    for clients in client_counts:
        for engine in results:
            r = results[engine][clients] = serve_load(run, engine, clients, tokens)
            print(f"   {engine:>12}, {clients} clients: {r['tok_s']:6.1f} tok/s, latency p50 {r['p50_s']:.1f} s "
                  f"p95 {r['p95_s']:.1f} s, first token p50 {r['ttft_p50_s']:.2f} s p95 {r['ttft_p95_s']:.2f} s")
    return results


def preset_times(presets: list[str]) -> dict[str, dict[str, float]]:
    print("3. prism bootstrap end to end (default domains), wall time")
    times: dict[str, dict[str, float]] = {}
    for preset in presets:
        times[preset] = {}
        for engine in ("llamacpp", "transformers"):
            out = Path(tempfile.mkdtemp(prefix=f"prism-{preset}-{engine}-"))
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "prism.cli", "bootstrap", "--preset", preset, "--engine", engine,
                            "--out", str(out / "run")], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            times[preset][engine] = time.perf_counter() - started
            stages = json.loads((out / "run" / "manifest.json").read_text()).get("stages", {})
            seconds = {name: round(s.get("seconds", 0.0)) for name, s in stages.items() if isinstance(s, dict)}
            print(f"   {preset:>5} on {engine:>12}: {times[preset][engine] / 60:.1f} min  {seconds}")
            shutil.rmtree(out)
    return times


def main() -> None:
    silence_library_warnings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/bench")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per stream or request")
    parser.add_argument("--quick", action="store_true", help="only the two headline ratios (under 10 minutes)")
    parser.add_argument("--json", help="write the measurements and ratios to this file")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each decode measurement (median)")
    parser.add_argument("--only", choices=("decode", "serve", "presets"), help="one part only (no ratios across parts)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    run = RunDir(args.run)
    if not run.exists() or run.stage_status("distill") not in ("done", "skipped"):
        print(f"no finished run in {args.run}: bootstrapping the tiny preset there first")
        bootstrap(resolve_config(preset="tiny"), args.run)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores")

    wanted = {args.only} if args.only else {"decode", "serve", "presets"} - ({"presets"} if args.quick else set())
    ratios: dict[str, float] = {}
    rates = decode_speeds(args.run, [32] if args.quick else [1, 8, 32], args.tokens, args.rounds) \
        if "decode" in wanted else {}
    if rates:
        batched = rates["llama.cpp batched"]
        ratios["llamacpp_batched_32_over_single"] = batched[32] / rates["llama.cpp one at a time"][32]
        ratios["llamacpp_batched_32_over_transformers_32"] = batched[32] / rates["transformers batched"][32]
    loads = serve_loads(args.run, [32] if args.quick else [32, 64], args.tokens) if "serve" in wanted else {}
    for clients in loads.get("llamacpp", {}):
        ratios[f"serve_llamacpp_over_transformers_{clients}"] = (loads["llamacpp"][clients]["tok_s"]
                                                                 / loads["transformers"][clients]["tok_s"])
    presets = preset_times(["tiny", "small"]) if "presets" in wanted else {}
    for preset, times in presets.items():
        ratios[f"{preset}_transformers_over_llamacpp"] = times["transformers"] / times["llamacpp"]
    print("ratios: " + ", ".join(f"{name} {value:.2f}" for name, value in ratios.items()))
    print("targets: llamacpp_batched_32_over_single >= 4, serve_llamacpp_over_transformers_32 >= 3, "
          "small preset <= 5 min")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "tokens": args.tokens, "decode_tok_s": rates,
                                               "serve": loads, "bootstrap_s": presets, "ratios": ratios},
                                              indent=2) + "\n")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    main()
