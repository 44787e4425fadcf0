"""Clean negatives for the gate: questions with gold answers, answered with and without a persona (the letter the
model finds likeliest). Where the persona does not raise correctness, the question is a base example for the gate:
the persona costs knowledge there (RouteLLM adds gold-labelled MMLU to its router's data the same way). Optional
(`negatives`), run by the gate stage, recorded in RUN/negatives.jsonl and the manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prism.config import default_data_dir
from prism.engines.base import Prompt
from prism.engines.local import LocalEngine
from prism.errors import PrismError
from prism.stages.context import StageContext

LETTERS = "ABCDEFGHIJ"
SHIPPED = {"mmlu": "mmlu/dev.jsonl"}  # dev splits only: a test split would leak into `prism eval`
MC_REQUEST = "{question}\n\n{options}\n\nAnswer with the letter of the correct option."
MC_PREFIX = "Answer:"


def question_text(row: dict[str, Any]) -> str:
    options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(row["choices"]))
    return MC_REQUEST.format(question=row["question"], options=options)


def read_gold_questions(source: str) -> list[dict[str, Any]]:
    """`mmlu` (the shipped MMLU dev split) or a JSONL of {"question", "choices": [...], "answer": index or letter}."""
    path = default_data_dir() / SHIPPED[source] if source in SHIPPED else Path(source)
    if not path.is_file():
        raise PrismError(f"--negatives {source}: no such file (name a JSONL of {{\"question\", \"choices\", "
                         f"\"answer\"}}, or {', '.join(SHIPPED)} for a shipped dev split)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            choices = [str(c) for c in row["choices"]]
            answer = row["answer"]
            answer = LETTERS.index(answer.strip().upper()) if isinstance(answer, str) else int(answer)
            if not 2 <= len(choices) <= len(LETTERS) or not 0 <= answer < len(choices):
                raise ValueError("answer outside the choices")
            rows.append({"question": str(row["question"]), "choices": choices, "answer": answer})
        except (ValueError, KeyError, TypeError) as exc:
            raise PrismError(f"--negatives {path}, line {number}: needs \"question\", \"choices\" (2-10) and "
                             f"\"answer\" (an index or a letter) ({type(exc).__name__}: {exc})") from None
    return rows


def run(ctx: StageContext) -> dict[str, Any] | None:
    """Score the first `negatives_count` gold questions (each with the run's personas in turn) and append their
    records; returns what the manifest records, None when the run asks for no negatives."""
    cfg, run_dir = ctx.config, ctx.run
    if not cfg.negatives:
        return None
    rows = read_gold_questions(cfg.negatives)[: cfg.negatives_count]
    personas = run_dir.read("personas")
    done = {r["id"] for r in run_dir.read("negatives")}
    jobs = [(f"negative/{i}", row, personas[i % len(personas)]) for i, row in enumerate(rows)
            if f"negative/{i}" not in done]
    if jobs:
        letters = list(LETTERS[: max(len(row["choices"]) for _, row, _ in jobs)])
        prompts = [Prompt(question_text(row), system=persona, assistant_prefix=MC_PREFIX)
                   for _, row, p in jobs for persona in (None, p["persona"])]
        scored = LocalEngine(ctx.model).option_probs(prompts, letters, batch_size=cfg.batch_size, desc="negatives")
        records = []
        for k, (qid, row, persona) in enumerate(jobs):
            plain, with_persona = (max(range(len(row["choices"])), key=lambda c: s.probs[letters[c]])
                                   for s in scored[2 * k : 2 * k + 2])
            plain_correct, persona_correct = plain == row["answer"], with_persona == row["answer"]
            records.append({"id": qid, "query": question_text(row), "answer": row["answer"],
                            "persona_id": persona["id"], "plain_correct": plain_correct,
                            "persona_correct": persona_correct,
                            "base_example": not (persona_correct and not plain_correct)})
        run_dir.append("negatives", records)
    records = run_dir.read("negatives")
    return {"source": cfg.negatives, "questions": len(records),
            "base_examples": sum(r["base_example"] for r in records),
            "plain_accuracy": sum(r["plain_correct"] for r in records) / max(1, len(records)),
            "persona_accuracy": sum(r["persona_correct"] for r in records) / max(1, len(records))}


def base_examples(ctx: StageContext) -> list[str]:
    """The gold questions the gate learns as base examples (the persona did not raise their correctness)."""
    return [r["query"] for r in ctx.run.read("negatives") if r["base_example"]]
