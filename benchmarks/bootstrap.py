"""Bootstrap speed on the embedded model: per-stage wall time of the tiny preset, generation tokens/s,
batched generation against a batch-size-1 loop on the same prompts, and the stages' per-record seeded
sampling (RowSampler) against transformers' own batch sampling, measured side by side.

    .venv/bin/python benchmarks/bootstrap.py [--out runs/bench] [--prompts 16] [--tokens 48] [--sampling-only]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time

import torch
from transformers import LogitsProcessorList

from prism import bootstrap, load_model, resolve_config
from prism.engines.local import RowSampler, generate_batches
from prism.library_warnings import silence_library_warnings
from prism.lm.batching import pad_batch
from prism.lm.models import chat_prompt, encode
from prism.runs import STAGES, RunDir


def timed_generation(lm, prompts: list[str], batch_size: int, tokens: int) -> tuple[float, int]:
    started = time.perf_counter()
    produced = 0
    for _, outputs in generate_batches(lm, prompts, max_new_tokens=tokens, temperature=0.0, seeds=[0] * len(prompts),
                                       batch_size=batch_size, desc=f"batch {batch_size}"):
        produced += sum(o.new_tokens for o in outputs)
    return time.perf_counter() - started, produced


def timed_sampling(lm, prompts: list[str], tokens: int, per_row: bool) -> float:
    """Seconds to sample exactly `tokens` new tokens for every prompt in one batch at temperature 0.7:
    each row from its own seeded stream (what the stages do), or transformers' one stream for the batch."""
    ids, mask = pad_batch([encode(lm.tokenizer, p) for p in prompts], lm.tokenizer.pad_token_id, side="left")
    sampling = ({"do_sample": False, "logits_processor": LogitsProcessorList([RowSampler(range(len(prompts)), 0.7)])}
                if per_row else {"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 1.0})
    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.no_grad():
        lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                          pad_token_id=lm.tokenizer.pad_token_id, **sampling)
    return time.perf_counter() - started


def compare_sampling(lm, prompts: list[str], tokens: int, rounds: int = 3) -> None:
    per_row, shared = [], []
    for _ in range(rounds):  # interleaved, so drift on a noisy machine hits both alike
        per_row.append(timed_sampling(lm, prompts, tokens, per_row=True))
        shared.append(timed_sampling(lm, prompts, tokens, per_row=False))
    produced = len(prompts) * tokens
    print(f"sampling {len(prompts)} prompts x {tokens} tokens at temperature 0.7, batch {len(prompts)}, "
          f"best of {rounds} interleaved rounds:")
    print(f"  per-record seeded streams (RowSampler): {produced / min(per_row):.1f} tok/s")
    print(f"  transformers' one stream per batch:     {produced / min(shared):.1f} tok/s")
    print(f"  ratio per-record / transformers: {min(shared) / min(per_row):.3f}")


def main() -> None:
    silence_library_warnings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench-bootstrap")
    parser.add_argument("--prompts", type=int, default=32, help="prompts for the batched vs batch-1 comparison")
    parser.add_argument("--tokens", type=int, default=48, help="max new tokens per prompt in that comparison")
    parser.add_argument("--sampling-only", action="store_true",
                        help="only the per-record vs transformers sampling comparison (no bootstrap)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.sampling_only:
        lm = load_model("embedded")
        questions = ["How do I store cleaning chemicals safely?", "Write a haiku about the sea.",
                     "Explain recursion in Python.", "What is the capital of France?"]
        compare_sampling(lm, [chat_prompt(lm.tokenizer, q) for q in questions * (args.prompts // 4)], args.tokens)
        return

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
    compare_sampling(lm, prompts, args.tokens)


if __name__ == "__main__":
    main()
