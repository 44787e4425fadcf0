"""Stage 3: every kept query answered twice by the same model, plain and with its persona."""

from __future__ import annotations

from prism.engines.base import Prompt
from prism.stages.context import StageContext, derive_seed
from prism.stages.queries import kept_queries

VARIANTS = ("plain", "persona")


def run(ctx: StageContext) -> None:
    cfg, run_dir = ctx.config, ctx.run
    personas = {p["id"]: p for p in run_dir.read("personas")}
    done = {r["id"] for r in run_dir.read("answers")}
    jobs = [
        (query, variant)
        for query in kept_queries(run_dir.read("queries"))
        for variant in VARIANTS
        if f"{query['id']}:{variant}" not in done
    ]
    prompts = [
        Prompt(q["query"], system=personas[q["persona_id"]]["persona"] if variant == "persona" else None)
        for q, variant in jobs
    ]
    for indices, outputs in ctx.generator.generate(
        prompts, max_new_tokens=cfg.answer_max_tokens, temperature=cfg.answer_temperature,
        seeds=[derive_seed(cfg.seed, "answers", q["id"], variant) for q, variant in jobs], batch_size=cfg.batch_size,
        desc="answers",
    ):
        run_dir.append("answers", [
            {"id": f"{jobs[i][0]['id']}:{jobs[i][1]}", "query_id": jobs[i][0]["id"], "variant": jobs[i][1],
             "answer": out.text.strip(), "new_tokens": out.new_tokens, "finished": out.finished}
            for i, out in zip(indices, outputs)
        ])
