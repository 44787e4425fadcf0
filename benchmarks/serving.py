"""Gated inference speed on the embedded model, every ratio measured side by side in this one run:

1. routing overhead: per-request latency of the gated route (auto) against the forced route, batch 1,
   greedy, equal lengths (end-of-text ignored);
2. mixed-batch throughput: 32 requests, half forced to each route, against 32 base-only requests;
3. the server under load: `prism serve` in its own process, 64 concurrent openai clients on loopback;
4. what the Prometheus metrics cost: requests/s of two in-process servers on the same model, one with
   metrics (and /metrics scraped every second) and one without, in interleaved rounds;
5. on a k-way run (`prism bootstrap --routing kway`): a batch spread over base and several persona adapters
   against base-only, one adapter for every row, and base + the binary adapter.

    .venv/bin/python benchmarks/serving.py [--run runs/bench] [--tokens 32] [--only metrics]

A run directory with a trained adapter and gate is needed; if --run has none, a tiny-preset bootstrap
makes one there first (~5 minutes).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from prism import GenerationRequest, PrismModel, SamplingParams, bootstrap, load_model, resolve_config
from prism.library_warnings import silence_library_warnings
from prism.runs import RunDir
from prism.serving.server import wait_until_healthy


def requests_for(queries: list[str], routes: list[str], tokens: int) -> list[GenerationRequest]:
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    return [GenerationRequest([{"role": "user", "content": q}], r, params) for q, r in zip(queries, routes)]


def timed(model: PrismModel, requests: list[GenerationRequest]) -> tuple[float, int]:
    started = time.perf_counter()
    completions = model.generate_batch(requests)
    return time.perf_counter() - started, sum(c.completion_tokens for c in completions)


def routing_overhead(model: PrismModel, queries: list[str], tokens: int) -> None:
    decisions = model.decide([[{"role": "user", "content": q}] for q in queries])
    gated = [d.route for d in decisions]
    print(f"1. routing overhead: {len(queries)} prompts, batch 1, greedy, {tokens} tokens each; "
          f"the gate sends {gated.count('persona')} to the adapter, {gated.count('base')} to the base model")
    latency: dict[str, list[float]] = {"auto": [], "base": [], "same": []}
    for query, route in zip(queries, gated):  # interleaved, so drift on a noisy machine hits every system alike
        latency["auto"].append(timed(model, requests_for([query], ["auto"], tokens))[0])
        latency["base"].append(timed(model, requests_for([query], ["base"], tokens))[0])
        latency["same"].append(timed(model, requests_for([query], [route], tokens))[0])
    median = {name: statistics.median(values) for name, values in latency.items()}
    print(f"   median latency: prism (auto) {median['auto']:.3f} s, prism-base {median['base']:.3f} s, "
          f"forced to the gate's own choice {median['same']:.3f} s")
    print(f"   ratio auto / prism-base: {median['auto'] / median['base']:.3f} (target <= 1.05)")
    print(f"   ratio auto / forced same route (the cost of routing alone): {median['auto'] / median['same']:.3f}")
    lm = load_model("embedded")
    plain = []
    for query in queries:  # transformers alone, no adapter layers: what the PEFT wrapping costs the base route
        ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": query}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        started = time.perf_counter()
        lm.model.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                          pad_token_id=lm.tokenizer.pad_token_id)
        plain.append(time.perf_counter() - started)
    print(f"   plain transformers generate (no adapter layers at all): median {statistics.median(plain):.3f} s; "
          f"ratio prism-base / plain {median['base'] / statistics.median(plain):.3f}")


def mixed_batch(model: PrismModel, queries: list[str], tokens: int, repeats: int) -> None:
    half = len(queries) // 2
    print(f"2. mixed batch: {len(queries)} requests, greedy, {tokens} tokens each, median of {repeats} rounds")
    systems = {"base-only": ["base"] * len(queries), "mixed": ["base", "persona"] * half,
               "persona-only": ["persona"] * len(queries)}
    rates: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(repeats):  # rounds interleave the systems, so drift on a noisy machine hits each alike
        for name, routes in systems.items():
            seconds, produced = timed(model, requests_for(queries, routes, tokens))
            rates[name].append(produced / seconds)
    rate = {name: statistics.median(values) for name, values in rates.items()}
    for name, values in rates.items():
        print(f"   {name:<13} {rate[name]:.1f} tok/s (rounds: {', '.join(f'{v:.1f}' for v in values)})")
    print(f"   ratio mixed / base-only: {rate['mixed'] / rate['base-only']:.3f} (target >= 0.85); "
          f"persona-only / base-only: {rate['persona-only'] / rate['base-only']:.3f}")


def kway_batch(model: PrismModel, queries: list[str], tokens: int, repeats: int) -> None:
    """Throughput of batches whose rows run on 0, 1, 2 or every k-way adapter (PEFT's mixed-batch LoRA loops over
    the adapters present in a batch, in every LoRA layer)."""
    personas = model.personas
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    n = len(queries)

    def batch(routes: list[tuple[str, str | None]]) -> list[GenerationRequest]:
        return [GenerationRequest([{"role": "user", "content": q}], route, params, persona=persona)
                for q, (route, persona) in zip(queries, routes)]

    spread = [("base", None), *(("persona", p) for p in personas)]
    systems = {"base-only": [("base", None)] * n, "one adapter": [("persona", personas[0])] * n,
               "base + binary adapter": [("base", None), ("persona", None)] * (n // 2),
               "base + 2 adapters": [("base", None), ("persona", personas[0]), ("persona", personas[-1])] * n,
               f"base + {len(personas)} adapters": spread * n}
    print(f"5. k-way batches: {n} requests, greedy, {tokens} tokens each, median of {repeats} rounds "
          f"({len(personas)} persona adapters)")
    rates: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(repeats):  # interleaved rounds, as in part 2
        for name, routes in systems.items():
            seconds, produced = timed(model, batch(routes[:n]))
            rates[name].append(produced / seconds)
    rate = {name: statistics.median(values) for name, values in rates.items()}
    for name, values in rates.items():
        print(f"   {name:<22} {rate[name]:.1f} tok/s, {rate[name] / rate['base-only']:.3f} of base-only "
              f"(rounds: {', '.join(f'{v:.1f}' for v in values)})")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_load(run: str, queries: list[str], clients: int, tokens: int) -> None:
    import openai

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "prism.cli", "serve", run, "--port", str(port),
                               "--max-batch-size", "32"], stderr=subprocess.DEVNULL)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", timeout_s=300, process=server)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)

        def one(index: int) -> tuple[float, int, str | None]:
            started = time.perf_counter()
            try:
                reply = client.chat.completions.create(
                    model="prism", messages=[{"role": "user", "content": queries[index % len(queries)]}],
                    max_tokens=tokens, temperature=0.7, seed=index)
                return time.perf_counter() - started, reply.usage.completion_tokens, None
            except openai.OpenAIError as exc:
                return time.perf_counter() - started, 0, f"{type(exc).__name__}: {exc}"

        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(one, range(clients)))
        wall = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(timeout=60)
    latencies = sorted(r[0] for r in results)
    errors = [r[2] for r in results if r[2]]
    produced = sum(r[1] for r in results)
    p95 = latencies[max(0, round(0.95 * len(latencies)) - 1)]
    print(f"3. server under load: {clients} concurrent clients, one request each, up to {tokens} tokens, "
          f"temperature 0.7, model 'prism'")
    print(f"   errors {len(errors)}; latency p50 {statistics.median(latencies):.1f} s, p95 {p95:.1f} s; "
          f"{produced} tokens in {wall:.1f} s = {produced / wall:.1f} tok/s")
    for error in errors[:3]:
        print(f"   error: {error}")


def start_in_thread(app: object) -> tuple[object, str]:
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server, f"http://127.0.0.1:{port}"


def metrics_cost(model: PrismModel, queries: list[str], clients: int, requests: int, tokens: int,
                 rounds: int) -> None:
    import threading

    import httpx2

    from prism.serving.server import create_app

    servers = {name: start_in_thread(create_app(model, max_batch_size=32, metrics=name == "metrics"))
               for name in ("metrics", "plain")}
    rates: dict[str, list[float]] = {name: [] for name in servers}

    def one_round(url: str, scrape: bool) -> float:
        stop = threading.Event()

        def scraper() -> None:
            while not stop.wait(1.0):
                httpx2.get(url + "/metrics", timeout=30)

        def one(index: int) -> None:
            reply = httpx2.post(url + "/v1/chat/completions", timeout=600, json={
                "model": "prism", "messages": [{"role": "user", "content": queries[index % len(queries)]}],
                "max_tokens": tokens, "temperature": 0})
            reply.raise_for_status()

        if scrape:
            threading.Thread(target=scraper, daemon=True).start()
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, range(requests)))
        stop.set()
        return requests / (time.perf_counter() - started)

    for _, url in servers.values():
        one_round(url, scrape=False)  # warm-up
    for index in range(rounds):
        order = list(servers) if index % 2 == 0 else list(reversed(servers))
        for name in order:
            rates[name].append(one_round(servers[name][1], scrape=name == "metrics"))
    for server, _ in servers.values():
        server.should_exit = True
    best = {name: max(values) for name, values in rates.items()}
    print(f"4. metrics cost: {rounds} interleaved rounds of {requests} requests from {clients} clients, "
          f"up to {tokens} tokens, /metrics scraped every second on the metrics server")
    for name, values in rates.items():
        print(f"   {name:8} requests/s per round: {', '.join(f'{v:.2f}' for v in values)}")
    print(f"   with metrics / without, best round: {best['metrics'] / best['plain']:.3f}; median round: "
          f"{statistics.median(rates['metrics']) / statistics.median(rates['plain']):.3f}")


def main() -> None:
    silence_library_warnings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/bench")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per request")
    parser.add_argument("--prompts", type=int, default=8, help="prompts for the routing-overhead comparison")
    parser.add_argument("--batch", type=int, default=32, help="requests in the mixed-batch comparison")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients in the load test")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the mixed-batch comparison")
    parser.add_argument("--only", choices=("routing", "mixed", "load", "metrics", "kway"), help="run one part only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    run = RunDir(args.run)
    if not run.exists() or run.stage_status("distill") not in ("done", "skipped"):
        print(f"no finished run in {args.run}: bootstrapping the tiny preset there first")
        bootstrap(resolve_config(preset="tiny"), args.run)
    queries = [q["query"] for q in run.read("queries") if q["status"] == "kept"]
    model = PrismModel.from_run(args.run)
    if model.adapter is None:
        raise SystemExit(f"{args.run} has no adapter (distill was skipped): the persona route cannot be measured")
    model.generate(queries[0], max_tokens=4)  # warm-up: first-call allocations are not routing cost
    if args.only in (None, "routing"):
        routing_overhead(model, queries[: args.prompts], args.tokens)
    if args.only in (None, "mixed"):
        mixed_batch(model, (queries * args.batch)[: args.batch], args.tokens, args.repeats)
    if args.only in (None, "kway"):
        if model.personas:
            kway_batch(model, (queries * args.batch)[: args.batch], args.tokens, args.repeats)
        elif args.only == "kway":
            raise SystemExit(f"{args.run} has no k-way adapters: bootstrap it with --routing kway first")
    if args.only in (None, "metrics"):
        metrics_cost(model, queries, clients=16, requests=64, tokens=args.tokens, rounds=max(4, args.repeats))
    del model
    if args.only in (None, "load"):
        server_load(args.run, queries, args.clients, args.tokens)


if __name__ == "__main__":
    main()
