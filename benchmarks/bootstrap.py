"""Bootstrap speed on the embedded model: per-stage wall time of the tiny preset, generation tokens/s,
and batched generation against a batch-size-1 loop on the same prompts, measured side by side.

    .venv/bin/python benchmarks/bootstrap.py [--out runs/bench] [--prompts 16] [--tokens 48]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time

from prism import bootstrap, load_model, resolve_config
from prism.engine import generate_batches
from prism.library_warnings import silence_library_warnings
from prism.models import chat_prompt
from prism.runs import STAGES, RunDir


def timed_generation(lm, prompts: list[str], batch_size: int, tokens: int) -> tuple[float, int]:
    started = time.perf_counter()
    produced = 0
    for _, outputs in generate_batches(lm, prompts, max_new_tokens=tokens, temperature=0.0, seeds=[0] * len(prompts),
                                       batch_size=batch_size, desc=f"batch {batch_size}"):
        produced += sum(o.new_tokens for o in outputs)
    return time.perf_counter() - started, produced


def main() -> None:
    silence_library_warnings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench-bootstrap")
    parser.add_argument("--prompts", type=int, default=32, help="prompts for the batched vs batch-1 comparison")
    parser.add_argument("--tokens", type=int, default=48, help="max new tokens per prompt in that comparison")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    shutil.rmtree(args.out, ignore_errors=True)
    started = time.perf_counter()
    summary = bootstrap(resolve_config(preset="tiny"), args.out)
    total = time.perf_counter() - started
    run = RunDir(args.out)
    answers = run.read("answers")
    answer_tokens = sum(a["new_tokens"] for a in answers)
    print(f"tiny preset on the embedded model: {total:.1f} s in all (model load included)")
    for stage in STAGES:
        print(f"  {stage:<9} {summary['seconds'][stage] or 0:8.1f} s   {summary['stages'][stage]}")
    print(f"  counts: {summary['counts']}")
    print(f"  answers stage: {answer_tokens} tokens in {summary['seconds']['answers']:.1f} s = "
          f"{answer_tokens / summary['seconds']['answers']:.1f} generated tok/s")

    lm = load_model("embedded")
    queries = [q["query"] for q in run.read("queries") if q["status"] == "kept"][: args.prompts]
    prompts = [chat_prompt(lm.tokenizer, q) for q in queries]
    batched_s, batched_tokens = timed_generation(lm, prompts, len(prompts), args.tokens)
    single_s, single_tokens = timed_generation(lm, prompts, 1, args.tokens)
    batched_rate, single_rate = batched_tokens / batched_s, single_tokens / single_s
    print(f"same {len(prompts)} prompts, greedy, up to {args.tokens} new tokens each:")
    print(f"  batched (batch {len(prompts)}): {batched_tokens} tokens in {batched_s:.1f} s = {batched_rate:.1f} tok/s")
    print(f"  batch-size-1 loop:   {single_tokens} tokens in {single_s:.1f} s = {single_rate:.1f} tok/s")
    print(f"  ratio batched / batch-1: {batched_rate / single_rate:.2f}x (target >= 5x)")


if __name__ == "__main__":
    main()
