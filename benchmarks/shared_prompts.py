"""What sharing prompts saves on the transformers engine, on the embedded model, each path against the other in
alternating rounds of one run: the answers stage with `--label-samples K` (every prompt asked K times, each from
its own seeded stream; the K rows prefill once), and the pairwise judge over those answers (every judge prompt
starts with the same system prompt and instructions, run once per call). Also whether the answers and the
verdicts stay the same.

    .venv/bin/python benchmarks/shared_prompts.py [--prompts 16] [--samples 4] [--tokens 128] [--rounds 3]
        [--batch-size 32] [--model embedded] [--json FILE]

The prompts are real ones shipped with the benchmarks (MT-Bench first turns and ARC question stems), asked plain
and with a persona system prompt, like the answers stage asks them."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from prism.config import default_data_dir
from prism.engines.base import Prompt, option_token_ids, options_from_logits
from prism.engines.local import LocalEngine, generate_batches, last_token_logits, shared_prefix_length
from prism.evaluation.data import load_arc, load_mtbench
from prism.library_warnings import silence_library_warnings
from prism.lm.models import encode, load_model
from prism.stages.judge_pairwise import OPTIONS, decide, judge_prompt

PERSONA = "You are a concise science teacher. Answer in one or two short sentences."


def prompts(count: int) -> list[Prompt]:
    data = default_data_dir()
    questions = [q["turns"][0] for q in load_mtbench(data)["questions"]][: count // 2]
    questions += [item["question"] for item in load_arc(data)][: count - len(questions)]
    return [Prompt(q, system=PERSONA if i % 2 else None) for i, q in enumerate(questions)]


def answer(engine: LocalEngine, asked: list[Prompt], samples: int, tokens: int, batch_size: int, share: bool
           ) -> tuple[float, list[str]]:
    # the answers stage's order: each prompt's K samples one after the other, each its own seed
    jobs = [p for p in asked for _ in range(samples)]
    texts = [""] * len(jobs)
    started = time.perf_counter()
    for indices, outputs in generate_batches(engine.lm, [engine.render(p) for p in jobs], max_new_tokens=tokens,
                                             temperature=0.7, seeds=list(range(len(jobs))), batch_size=batch_size,
                                             desc="shared" if share else "alone", share_prompts=share):
        for i, out in zip(indices, outputs):
            texts[i] = out.text
    return time.perf_counter() - started, texts


def judge(engine: LocalEngine, asked: list[Prompt], answers: list[str], samples: int, batch_size: int, share: bool
          ) -> tuple[float, list[str], int]:
    """The pairwise judge over each prompt's first two samples, in both slot orders: seconds, verdicts, and the
    tokens every judge prompt shares."""
    pairs = [(p.user, answers[i * samples], answers[i * samples + 1]) for i, p in enumerate(asked)]
    judged = [judge_prompt(q, a, b, 1200) for q, a, b in pairs] + [judge_prompt(q, b, a, 1200) for q, a, b in pairs]
    rendered = [engine.render(p) for p in judged]
    started = time.perf_counter()
    logits = last_token_logits(engine.lm, rendered, batch_size, desc="judge", share_prefix=share)
    seconds = time.perf_counter() - started
    option_ids = option_token_ids(engine.lm.tokenizer, OPTIONS)
    verdicts = [decide(options_from_logits(row, option_ids).probs) for row in logits]
    shared = shared_prefix_length([encode(engine.lm.tokenizer, r) for r in rendered])
    return seconds, verdicts, shared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128, help="the answers stage's default answer length")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--json", help="also write the figures as JSON to this file")
    args = parser.parse_args()
    if args.samples < 2:
        parser.error("--samples must be 2 or more: the judge compares each prompt's first two answers")
    silence_library_warnings()
    engine = LocalEngine(load_model(args.model, device="cpu"))
    asked = prompts(args.prompts)
    seconds: dict[bool, list[float]] = {True: [], False: []}
    texts: dict[bool, list[str]] = {}
    for _ in range(args.rounds):
        for share in (False, True):
            elapsed, texts[share] = answer(engine, asked, args.samples, args.tokens, args.batch_size, share)
            seconds[share].append(elapsed)
    same = sum(a == b for a, b in zip(texts[True], texts[False])) / len(texts[True])
    alone, shared = statistics.median(seconds[False]), statistics.median(seconds[True])
    print(f"answers: {len(asked)} prompts x {args.samples} samples, {args.tokens} tokens, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads: median of {args.rounds} rounds, alone {alone:.1f} s, prompts shared "
          f"{shared:.1f} s: shared / alone {shared / alone:.3f}; answers identical {same:.0%}")
    judged: dict[bool, list[float]] = {True: [], False: []}
    verdicts: dict[bool, list[str]] = {}
    prefix = 0
    for _ in range(args.rounds):
        for share in (False, True):
            elapsed, verdicts[share], prefix = judge(engine, asked, texts[False], args.samples, args.batch_size,
                                                     share)
            judged[share].append(elapsed)
    judge_alone, judge_shared = statistics.median(judged[False]), statistics.median(judged[True])
    agree = sum(a == b for a, b in zip(verdicts[True], verdicts[False])) / len(verdicts[True])
    print(f"judge: {len(verdicts[True])} pairwise prompts sharing their first {prefix} tokens: alone "
          f"{judge_alone:.2f} s, prefix shared {judge_shared:.2f} s: shared / alone {judge_shared / judge_alone:.3f}; "
          f"verdicts identical {agree:.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "answers": {"alone_s": seconds[False], "shared_s": seconds[True], "ratio": shared / alone,
                        "identical": same},
            "judge": {"alone_s": judged[False], "shared_s": judged[True], "ratio": judge_shared / judge_alone,
                      "identical": agree, "shared_prefix_tokens": prefix}, **vars(args)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
