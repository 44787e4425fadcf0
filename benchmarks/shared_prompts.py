"""What sharing a repeated prompt's prefill saves in the answers stage (`--label-samples K`: every prompt is asked
K times, each from its own seeded stream): the same batches generated with and without the sharing, alternating
round by round in one run, on the embedded model (transformers engine), and whether the answers stay the same.

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
from prism.engines.base import Prompt
from prism.engines.local import LocalEngine, generate_batches
from prism.evaluation.data import load_arc, load_mtbench
from prism.library_warnings import silence_library_warnings
from prism.lm.models import load_model

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
    print(f"{len(asked)} prompts x {args.samples} samples, {args.tokens} tokens, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads: median of {args.rounds} rounds, alone {alone:.1f} s, prompts shared "
          f"{shared:.1f} s: shared / alone {shared / alone:.3f}; answers identical {same:.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"alone_s": seconds[False], "shared_s": seconds[True],
                                               "ratio": shared / alone, "identical": same, **vars(args)}, indent=2)
                                   + "\n")


if __name__ == "__main__":
    main()
