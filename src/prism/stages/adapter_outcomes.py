"""Stage 6 (gate_labels "adapter"): the trained adapter answers every kept query itself, K times with the answers
stage's settings and no persona in the prompt, and the run's judge compares each of its answers with the plain
answer of the same sample, as the verify stage compared the persona's. The gate then learns where the adapter it
routes to helps and where it hurts. The teacher's verdicts cannot show that: an adapter distilled from the queries
its persona won carries the persona's behaviour onto queries where the persona was never asked (or made no
difference), and a gate taught by the teacher sends those to it.

Records: `adapter_answers` (the answers stage's format, variant "adapter"), `adapter_judgments` and
`adapter_labels` (the verify stage's formats; a label's persona_answer is the adapter's answer).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from prism.config import BootstrapConfig
from prism.engines.base import Prompt
from prism.engines.local import LocalEngine
from prism.runs import RunDir, adapter_dir, has_adapter_weights
from prism.stages import verify
from prism.stages.answers import answer_id, answer_record, answers_by_sample
from prism.stages.context import StageContext, derive_seed
from prism.stages.distill import load_adapter
from prism.stages.queries import kept_queries
from prism.stages.records import read_labels

VARIANT = "adapter"


def skip_reason(config: BootstrapConfig, run: RunDir) -> str | None:
    """Why the stage has nothing to do for this run (None: it runs)."""
    if config.gate_labels != "adapter":
        return "gate_labels is persona: the gate learns from the teacher's verdicts"
    if config.routing == "kway":
        return "a k-way gate learns from the teacher's verdicts (one class per persona adapter)"
    if not has_adapter_weights(adapter_dir(run.path)):
        return "the run has no adapter (distill was skipped): the gate routes everything to base"
    return None


def run(ctx: StageContext) -> dict[str, Any]:
    cfg, run_dir = ctx.config, ctx.run
    why = skip_reason(cfg, run_dir)
    if why is not None:
        return {"skipped": True, "why": why}
    done = {r["id"] for r in run_dir.read("adapter_answers")}
    jobs = [(query, sample) for query in kept_queries(run_dir.read("queries")) for sample in range(cfg.label_samples)
            if answer_id(query["id"], VARIANT, sample) not in done]
    if jobs:
        generate_answers(ctx, jobs)
    answers = answers_by_sample(run_dir.read("answers"))
    adapter = answers_by_sample(run_dir.read("adapter_answers"))
    answers.update({(qid, "persona", k): text for (qid, _, k), text in adapter.items()})  # the side judged
    verify.judge_pairs(ctx, answers, "adapter_judgments")
    verify.write_labels(ctx, answers, "adapter_judgments", "adapter_labels")
    labels = read_labels(run_dir, "adapter_labels")
    outcomes = [o for r in labels for o in (r.sample_outcomes or [r.outcome])]
    return {"queries": len(labels), "label_samples": cfg.label_samples,
            "adapter_outcomes": {o: outcomes.count(o) for o in ("win", "tie", "loss")}}


def generate_answers(ctx: StageContext, jobs: list[tuple[dict[str, Any], int]]) -> None:
    """The adapter's answers to (query, sample) jobs, on the local model with the run's adapter attached for the
    stage and taken off after (the judge that follows is the base model)."""
    cfg, run_dir = ctx.config, ctx.run
    adapted = load_adapter(ctx.model, run_dir.path)
    try:
        engine = LocalEngine(replace(ctx.model, model=adapted))
        seeds = [derive_seed(cfg.seed, "adapter_answers", q["id"], k) for q, k in jobs]
        for indices, outputs in engine.generate([Prompt(q["query"]) for q, _ in jobs],
                                                max_new_tokens=cfg.answer_max_tokens,
                                                temperature=cfg.answer_temperature, seeds=seeds,
                                                batch_size=cfg.batch_size, desc="adapter answers"):
            run_dir.append("adapter_answers", [answer_record(jobs[i][0]["id"], VARIANT, jobs[i][1], out)
                                               for i, out in zip(indices, outputs)])
    finally:
        adapted.unload()  # the LoRA layers out of the base model's modules again
