"""Stage 4: is the persona answer the better one? The run's judge (`judge`: pairwise, pointwise or verifier; one
module each) judges every (plain, persona) pair; a query whose persona answer won is kept for distillation
(label 1), everything else is retained (label 0).

The records it writes are `records.Judgment` and `records.Label`.
"""

from __future__ import annotations

from collections import Counter
from types import ModuleType
from typing import Any

from prism.config import BootstrapConfig, persona_slug, with_new_defaults
from prism.stages import judge_pairwise, judge_pointwise, judge_verifier
from prism.stages.context import StageContext
from prism.stages.queries import kept_queries
from prism.stages.records import Judgment, Label, read_judgments
from prism.stages.records import write_labels as write_labels_file
from prism.verifiers import source_digest

JUDGES: dict[str, ModuleType] = {"pairwise": judge_pairwise, "pointwise": judge_pointwise,
                                 "verifier": judge_verifier}


def run(ctx: StageContext) -> dict[str, Any]:
    cfg, run_dir = ctx.config, ctx.run
    judge = JUDGES[cfg.judge]
    queries = {q["id"]: q for q in kept_queries(run_dir.read("queries"))}
    answers = {(a["query_id"], a["variant"]): a["answer"] for a in run_dir.read("answers")}
    done = {j.id for j in read_judgments(run_dir)}
    jobs = [(qid, slot) for qid in queries for slot in judge.SLOTS if f"{qid}:{slot}" not in done]
    # Judged in chunks, each saved before the next starts (a kill loses one chunk at most); whatever a chunk
    # made before an error (a verifier that raises) is saved too.
    chunk = cfg.batch_size * 4
    for start in range(0, len(jobs), chunk):
        part = jobs[start : start + chunk]
        items = [(queries[qid], answers[(qid, "persona")], answers[(qid, "plain")], slot) for qid, slot in part]
        records: list[Judgment] = []
        try:
            for (qid, slot), measured in zip(part, judge.judge(ctx, items)):
                records.append(Judgment(id=f"{qid}:{slot}", query_id=qid, kind=judge.KIND, **measured))
        finally:
            run_dir.append("judgments", [j.to_record() for j in records])
    write_labels(ctx)
    return {"verifier_sources": verifier_sources(cfg)} if judge.KIND == "verifier" else {}


def verifier_sources(config: BootstrapConfig) -> dict[str, str]:
    """The digest of each user verifier's code (built-ins have none), recorded with the verify stage."""
    specs = {config.verifier, *config.verifiers.values()} - {None}
    return {spec: digest for spec in sorted(specs) if (digest := source_digest(spec)) is not None}


def write_labels(ctx: StageContext) -> None:
    cfg, run_dir = ctx.config, ctx.run
    judge = JUDGES[cfg.judge]
    personas = {p["id"]: p for p in run_dir.read("personas")}
    queries = kept_queries(run_dir.read("queries"))
    answers = {(a["query_id"], a["variant"]): a["answer"] for a in run_dir.read("answers")}
    judged: dict[str, dict[str, Judgment]] = {}
    for j in read_judgments(run_dir):
        if j.kind == judge.KIND:
            judged.setdefault(j.query_id, {})[j.slot] = j
    decided = judge.decide_queries({q["id"]: judged[q["id"]] for q in queries}, cfg)
    labels = []
    for q in queries:
        outcome, evidence = decided[q["id"]]
        label = int(outcome == "win")
        labels.append(Label(
            query_id=q["id"], persona_id=q["persona_id"], domain=q["domain"], query=q["query"],
            persona=personas[q["persona_id"]]["persona"], persona_answer=answers[(q["id"], "persona")],
            plain_answer=answers[(q["id"], "plain")], label=label, split="distill" if label else "retain",
            judge=judge.KIND, outcome=outcome, **evidence))
    write_labels_file(run_dir, labels)


def judge_quality(judgments: list[Judgment], labels: list[Label], config: dict[str, Any]) -> dict:
    """The figures that say whether to trust the labels, for the judge the run's config names."""
    config = with_new_defaults(config)
    return JUDGES[config["judge"]].quality(judgments, labels, config)


def format_judge_quality(quality: dict) -> list[str]:
    if not quality.get("pairs"):
        return ["judge    nothing judged yet"]
    return JUDGES[quality["kind"]].format_quality(quality)


def judge_warning(quality: dict) -> str | None:
    """One plain sentence when the judge's labels carry little signal, else None."""
    if not quality.get("pairs"):
        return None
    return JUDGES[quality["kind"]].warning(quality)


def kway_classes(labels: list[Label], min_wins: int) -> tuple[list[str], dict[str, int]]:
    """k-way routing's classes from the labels: "base", then the persona of each domain with at least
    `min_wins` wins (in domain order); and the domains merged into base with their win counts."""
    wins = Counter(r.domain for r in labels if r.label == 1)
    domains = list(dict.fromkeys(r.domain for r in labels))
    kept = [d for d in domains if wins[d] >= min_wins]
    return ["base", *(persona_slug(d) for d in kept)], {d: wins[d] for d in domains if d not in kept}


def kway_label(record: Label, classes: list[str]) -> int:
    """A query's k-way class: its domain's persona when that persona won and has an adapter, else base."""
    slug = persona_slug(record.domain)
    return classes.index(slug) if record.label == 1 and slug in classes else 0
