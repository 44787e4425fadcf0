"""The llama.cpp engine against transformers and against plain llama-cpp-python, on the embedded model.
Every ratio compares systems measured side by side in this one run (interleaved, so drift hits all alike):

1. decode speed at batch 1, greedy: tokens per second after the first token, from (N - 1) / (T(N) - T(1)),
   where T(n) is a request's wall time for n new tokens (end-of-text ignored), each from a cold prompt.
   Systems: transformers (PrismModel, base and adapter route), the llama.cpp engine (base route, adapter
   route on the LoRA GGUF, adapter route on the merged persona GGUF, and gated), plain llama-cpp-python
   on the same GGUF (with and without the LoRA; its own generate loop and C sampler), and one llama.cpp
   context that switches the adapter on or off per request (the engine's decode loop);
2. time to first token of `prism serve` on each engine (streaming requests over loopback);
3. the bootstrap's generating stages: answers (batched transformers vs llama.cpp one prompt at a time)
   and judge verdicts.

    .venv/bin/python benchmarks/engines.py [--run runs/small] [--tokens 64] [--rounds 3]

The run needs an adapter and a gate (`prism bootstrap --preset tiny --out runs/bench` makes one).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prism.engines.base import Prompt
from prism.engines.llamacpp import LlamaCppEngine
from prism.engines.local import LocalEngine
from prism.inference.base import GenerationRequest
from prism.inference.gguf_export import ADAPTER_FILE, EXPORT_DIR, MERGED_FILE, export_gguf
from prism.inference.llamacpp import LlamaCppModel
from prism.inference.transformers import PrismModel
from prism.library_warnings import silence_library_warnings
from prism.lm.decoding import SamplingParams
from prism.lm.llama import LlamaContext, default_threads, open_llama
from prism.lm.models import embedded_gguf_path, encode
from prism.serving.server import wait_until_healthy

QUERIES = [
    "Write a short poem about the sea at night.",
    "What is the capital of Australia?",
    "How should I store household chemicals safely?",
    "Explain recursion to a ten-year-old.",
]


def request_time(model, query: str, route: str, tokens: int) -> float:
    # Every timed request starts from an empty prompt cache, as plain llama-cpp-python's reset does: with
    # the cache kept, T(N) would follow T(1) of the same prompt and skip its prefill, inflating the rate.
    for context in getattr(model, "contexts", {}).values():
        if context is not None:
            context.forget()
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    started = time.perf_counter()
    done = model.generate_batch([GenerationRequest([{"role": "user", "content": query}], route, params)])[0]
    assert done.completion_tokens == tokens, done
    return time.perf_counter() - started


def plain_time(llm, prompt_ids: list[int], tokens: int) -> float:
    """llama-cpp-python's own generate loop (its C sampler, greedy), no PRISM around it."""
    llm.reset()
    started = time.perf_counter()
    for count, _token in enumerate(llm.generate(prompt_ids, temp=0.0, reset=True), start=1):
        if count == tokens:
            break
    return time.perf_counter() - started


class SwitchingContext:
    """One llama.cpp context whose LoRA is set or cleared per request (llama_set_adapters_lora), decoded by
    the engine's own loop. The KV cache of a prompt made under the other setting is stale, so a switch
    drops the prompt cache."""

    def __init__(self, base_gguf: Path, lora: Path, n_ctx: int):
        import llama_cpp

        self.api = llama_cpp
        self.context = LlamaContext(open_llama(base_gguf, n_ctx=n_ctx))
        self.adapter = llama_cpp.llama_adapter_lora_init(self.context.llm.model, str(lora).encode())
        self.on: bool | None = None

    def use(self, adapter_on: bool) -> None:
        if adapter_on == self.on:
            return
        ctx = self.context.llm.ctx
        if adapter_on:
            adapters = (self.api.llama_adapter_lora_p_ctypes * 1)(self.adapter)
            self.api.llama_set_adapters_lora(ctx, adapters, 1, (ctypes.c_float * 1)(1.0))
        else:
            self.api.llama_set_adapters_lora(ctx, None, 0, None)
        self.context.forget()
        self.on = adapter_on

    def time(self, prompt_ids: list[int], tokens: int, adapter_on: bool) -> float:
        started = time.perf_counter()
        self.use(adapter_on)
        self.context.forget()  # a cold prompt every time, like every other system here
        logits = self.context.prefill(prompt_ids)
        for _ in range(tokens - 1):
            logits = self.context.step(int(logits.argmax()))
        return time.perf_counter() - started


def decode_speeds(run: Path, tokens: int, rounds: int) -> dict[str, float]:
    torch_model = PrismModel.from_run(run, device="cpu")
    lora_model = LlamaCppModel.from_run(run, persona_model="lora", max_model_len=2048)
    merged_model = LlamaCppModel.from_run(run, persona_model="merged", max_model_len=2048)
    base_gguf = embedded_gguf_path()
    plain = open_llama(base_gguf, n_ctx=2048)
    plain_lora = open_llama(base_gguf, lora=run / EXPORT_DIR / ADAPTER_FILE, n_ctx=2048)
    switching = SwitchingContext(base_gguf, run / EXPORT_DIR / ADAPTER_FILE, 2048)
    prompts = {q: encode(torch_model.tokenizer, torch_model.prompt([{"role": "user", "content": q}])) for q in QUERIES}

    systems: dict[str, Callable[[str, int], float]] = {
        "transformers base": lambda q, n: request_time(torch_model, q, "base", n),
        "transformers adapter": lambda q, n: request_time(torch_model, q, "persona", n),
        "llamacpp base": lambda q, n: request_time(lora_model, q, "base", n),
        "llamacpp adapter (LoRA)": lambda q, n: request_time(lora_model, q, "persona", n),
        "llamacpp adapter (merged)": lambda q, n: request_time(merged_model, q, "persona", n),
        "llamacpp gated (auto)": lambda q, n: request_time(merged_model, q, "auto", n),
        "plain llama-cpp-python": lambda q, n: plain_time(plain, prompts[q], n),
        "plain llama-cpp-python + LoRA": lambda q, n: plain_time(plain_lora, prompts[q], n),
        "one context, adapter switched per request: on": lambda q, n: switching.time(prompts[q], n, True),
        "one context, adapter switched per request: off": lambda q, n: switching.time(prompts[q], n, False),
    }
    for run_once in systems.values():  # warm up: first calls allocate buffers
        run_once(QUERIES[0], 2)
    full: dict[str, list[float]] = {name: [] for name in systems}
    first: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(rounds):
        for query in QUERIES:
            for name, run_once in systems.items():
                first[name].append(run_once(query, 1))
                full[name].append(run_once(query, tokens))
    speeds = {}
    print(f"1. decode speed, batch 1, greedy, {tokens} tokens, {len(QUERIES)} prompts x {rounds} rounds, "
          f"llama.cpp threads {default_threads()}")
    for name in systems:
        decode = (tokens - 1) / (statistics.median(full[name]) - statistics.median(first[name]))
        speeds[name] = decode
        print(f"   {name:<48} {decode:7.1f} tok/s   (first token {1000 * statistics.median(first[name]):6.1f} ms)")
    gated = merged_model.decide([[{"role": "user", "content": q}] for q in QUERIES])
    print(f"   (the gate sends {sum(d.route == 'persona' for d in gated)} of {len(QUERIES)} prompts to the adapter)")
    ratio = speeds["llamacpp base"] / speeds["transformers base"]
    print(f"   llama.cpp engine / transformers, base route: {ratio:.2f}x (target >= 4)")
    ratio = speeds["llamacpp adapter (LoRA)"] / speeds["transformers adapter"]
    print(f"   llama.cpp engine / transformers, adapter route (LoRA): {ratio:.2f}x")
    ratio = speeds["llamacpp adapter (merged)"] / speeds["transformers adapter"]
    print(f"   llama.cpp engine / transformers, adapter route (merged): {ratio:.2f}x")
    print(f"   llama.cpp engine / plain llama-cpp-python, base route: "
          f"{speeds['llamacpp base'] / speeds['plain llama-cpp-python']:.3f} (target >= 0.9)")
    print(f"   llama.cpp engine / plain llama-cpp-python, LoRA route: "
          f"{speeds['llamacpp adapter (LoRA)'] / speeds['plain llama-cpp-python + LoRA']:.3f} (target >= 0.9)")
    print(f"   llama.cpp engine gated / plain llama-cpp-python: "
          f"{speeds['llamacpp gated (auto)'] / speeds['plain llama-cpp-python']:.3f}")
    return speeds


def first_token_ms(url: str, model: str, query: str) -> float:
    body = json.dumps({"model": model, "stream": True, "max_tokens": 8, "temperature": 0,
                       "messages": [{"role": "user", "content": query}]}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        for line in response:
            if line.startswith(b"data: ") and b'"content": "' in line and b'"content": ""' not in line:
                elapsed = time.perf_counter() - started
                response.read()
                return 1000 * elapsed
    raise RuntimeError("the stream held no text")


def serve_first_token(run: Path, rounds: int) -> None:
    servers, ports = {}, {"transformers": 8731, "llamacpp": 8732}
    try:
        for engine, port in ports.items():
            servers[engine] = subprocess.Popen(
                [sys.executable, "-m", "prism.cli", "serve", str(run), "--engine", engine, "--port", str(port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for engine, port in ports.items():
            wait_until_healthy(f"http://127.0.0.1:{port}", process=servers[engine])
        times: dict[str, list[float]] = {engine: [] for engine in ports}
        for port in ports.values():
            first_token_ms(f"http://127.0.0.1:{port}", "prism", QUERIES[0])  # warm up
        for _ in range(rounds):
            for query in QUERIES:
                for engine, port in ports.items():
                    times[engine].append(first_token_ms(f"http://127.0.0.1:{port}", "prism", query))
        median = {engine: statistics.median(values) for engine, values in times.items()}
        print(f"2. prism serve, time to first token (streaming, model prism, gated), median of {len(times['llamacpp'])}"
              f" requests: transformers {median['transformers']:.1f} ms, llamacpp {median['llamacpp']:.1f} ms "
              f"-> {median['transformers'] / median['llamacpp']:.2f}x faster")
    finally:
        for process in servers.values():
            process.terminate()
            process.wait(timeout=30)


def stage_speeds(run: Path, prompts_count: int, tokens: int) -> None:
    torch_model = PrismModel.from_run(run, device="cpu")
    local = LocalEngine(torch_model.lm)
    cpp = LlamaCppEngine.open("embedded", torch_model.tokenizer, n_ctx=2048)
    persona = "You are a meticulous expert who answers with care and structure."
    prompts = [Prompt(QUERIES[i % len(QUERIES)] + f" (variant {i})", system=persona) for i in range(prompts_count)]

    def answers(engine, batch_size: int) -> tuple[float, int]:
        started = time.perf_counter()
        made = sum(g.new_tokens for _, batch in engine.generate(prompts, max_new_tokens=tokens, temperature=0.7,
                                                                  seeds=range(len(prompts)), batch_size=batch_size)
                   for g in batch)
        return time.perf_counter() - started, made

    judge = [Prompt(f"Question: {q}\nAnswer A: yes.\nAnswer B: no.\nWhich answer is better? Reply A, B or TIE.",
                    assistant_prefix="Verdict:") for q in QUERIES * 4]

    def verdicts(engine) -> float:
        started = time.perf_counter()
        engine.option_probs(judge, ["A", "B", "TIE"], batch_size=16)
        return time.perf_counter() - started

    with torch_model.adapter.disable_adapter():
        local_time, local_tokens = answers(local, 16)
        cpp_time, cpp_tokens = answers(cpp, 16)
        local_judge, cpp_judge = verdicts(local), verdicts(cpp)
    print(f"3. bootstrap stages: {prompts_count} persona answers of up to {tokens} tokens (temperature 0.7): "
          f"transformers batch 16 {local_tokens / local_time:.1f} tok/s ({local_time:.1f} s), "
          f"llama.cpp one at a time {cpp_tokens / cpp_time:.1f} tok/s ({cpp_time:.1f} s) -> "
          f"llama.cpp/transformers {(cpp_tokens / cpp_time) / (local_tokens / local_time):.2f}")
    print(f"   {len(judge)} judge verdicts: transformers {local_judge:.2f} s, llama.cpp {cpp_judge:.2f} s")


def main() -> None:
    silence_library_warnings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/small")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stage-prompts", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    run = Path(args.run)
    if not (run / EXPORT_DIR / MERGED_FILE).is_file():
        export_gguf(run, merged=True)
    decode_speeds(run, args.tokens, args.rounds)
    serve_first_token(run, args.rounds)
    stage_speeds(run, args.stage_prompts, args.tokens)


if __name__ == "__main__":
    main()
