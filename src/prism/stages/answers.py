"""Stage 3: every kept query answered twice by the same model, plain and with its persona; with `label_samples`
K > 1, K times per side, each answer from its own seeded stream (sample 0 keeps the ids and seeds of a run made
before K existed, so such a run resumes unchanged)."""

from __future__ import annotations

from typing import Any

from prism.engines.base import Generation, Prompt
from prism.stages.context import StageContext, derive_seed
from prism.stages.queries import kept_queries

VARIANTS = ("plain", "persona")


def answer_id(query_id: str, variant: str, sample: int = 0) -> str:
    return f"{query_id}:{variant}" if sample == 0 else f"{query_id}:{variant}:{sample}"


def answer_seed(seed: int, query_id: str, variant: str, sample: int) -> int:
    tags = (query_id, variant) if sample == 0 else (query_id, variant, sample)
    return derive_seed(seed, "answers", *tags)


def run(ctx: StageContext) -> None:
    cfg, run_dir = ctx.config, ctx.run
    personas = {p["id"]: p for p in run_dir.read("personas")}
    done = {r["id"] for r in run_dir.read("answers")}
    jobs = [
        (query, variant, sample)
        for query in kept_queries(run_dir.read("queries"))
        for sample in range(cfg.label_samples)
        for variant in VARIANTS
        if answer_id(query["id"], variant, sample) not in done
    ]
    prompts = [
        Prompt(q["query"], system=personas[q["persona_id"]]["persona"] if variant == "persona" else None)
        for q, variant, _ in jobs
    ]
    for indices, outputs in ctx.generator.generate(
        prompts, max_new_tokens=cfg.answer_max_tokens, temperature=cfg.answer_temperature,
        seeds=[answer_seed(cfg.seed, q["id"], variant, sample) for q, variant, sample in jobs],
        batch_size=cfg.batch_size, desc="answers",
    ):
        run_dir.append("answers", [answer_record(jobs[i][0]["id"], jobs[i][1], jobs[i][2], out)
                                   for i, out in zip(indices, outputs)])


def answer_record(query_id: str, variant: str, sample: int, out: Generation) -> dict[str, Any]:
    """An answers record (the adapter_outcomes stage writes its own answers in the same format)."""
    return {"id": answer_id(query_id, variant, sample), "query_id": query_id, "variant": variant,
            **({"sample": sample} if sample else {}), "answer": out.text.strip(), "new_tokens": out.new_tokens,
            "finished": out.finished}


def answers_by_sample(records: list[dict]) -> dict[tuple[str, str, int], str]:
    """(query id, variant, sample) -> answer text, over the answers stage's records."""
    return {(a["query_id"], a["variant"], a.get("sample", 0)): a["answer"] for a in records}
