"""Stage 4: is the persona answer the better one? The run's judge (`judge`: pairwise, pointwise or verifier; one
module each) judges every (plain, persona) pair, K pairs per query with `label_samples`; a query whose persona win
rate reaches `distill_min_win_rate` (with K = 1: a win) is kept for distillation (label 1), everything else is
retained (label 0). The gate learns from the win rate itself.

The records it writes are `records.Judgment` and `records.Label`.
"""

from __future__ import annotations

import statistics
from collections import Counter
from types import ModuleType
from typing import Any

from prism.config import BootstrapConfig, persona_slug, with_new_defaults
from prism.stages import judge_pairwise, judge_pointwise, judge_verifier
from prism.stages.answers import answers_by_sample
from prism.stages.context import StageContext
from prism.stages.queries import kept_queries
from prism.stages.records import Judgment, Label, read_judgments, wilson_interval, win_rate
from prism.stages.records import write_labels as write_labels_file
from prism.verifiers import source_digest

JUDGES: dict[str, ModuleType] = {"pairwise": judge_pairwise, "pointwise": judge_pointwise,
                                 "verifier": judge_verifier}


def judgment_id(query_id: str, slot: str, sample: int = 0) -> str:
    return f"{query_id}:{slot}" if sample == 0 else f"{query_id}:{slot}:{sample}"


def run(ctx: StageContext) -> dict[str, Any]:
    cfg, run_dir = ctx.config, ctx.run
    answers = answers_by_sample(run_dir.read("answers"))
    judge_pairs(ctx, answers, "judgments")
    reliability = write_labels(ctx, answers, "judgments", "labels")
    info: dict[str, Any] = {"label_samples": cfg.label_samples}
    if reliability is not None:
        info["label_reliability"] = reliability
    if JUDGES[cfg.judge].KIND == "verifier":
        info["verifier_sources"] = verifier_sources(cfg)
    return info


def judge_pairs(ctx: StageContext, answers: dict[tuple[str, str, int], str], judgments: str) -> None:
    """Judge every kept query's K (persona, plain) answer pairs in `answers` that the records `judgments` lack."""
    cfg, run_dir = ctx.config, ctx.run
    judge = JUDGES[cfg.judge]
    queries = {q["id"]: q for q in kept_queries(run_dir.read("queries"))}
    done = {j.id for j in read_judgments(run_dir, judgments)}
    jobs = [(qid, slot, k) for qid in queries for k in range(cfg.label_samples) for slot in judge.SLOTS
            if judgment_id(qid, slot, k) not in done]
    # Judged in chunks, each saved before the next starts (a kill loses one chunk at most); whatever a chunk
    # made before an error (a verifier that raises) is saved too.
    chunk = cfg.batch_size * 4
    for start in range(0, len(jobs), chunk):
        part = jobs[start : start + chunk]
        items = [(queries[qid], answers[(qid, "persona", k)], answers[(qid, "plain", k)], slot)
                 for qid, slot, k in part]
        records: list[Judgment] = []
        try:
            for (qid, slot, k), measured in zip(part, judge.judge(ctx, items)):
                records.append(Judgment(id=judgment_id(qid, slot, k), query_id=qid, kind=judge.KIND,
                                        sample=k or None, **measured))
        finally:
            run_dir.append(judgments, [j.to_record() for j in records])


def verifier_sources(config: BootstrapConfig) -> dict[str, str]:
    """The digest of each user verifier's code (built-ins have none), recorded with the verify stage."""
    specs = {config.verifier, *config.verifiers.values()} - {None}
    return {spec: digest for spec in sorted(specs) if (digest := source_digest(spec)) is not None}


def write_labels(ctx: StageContext, answers: dict[tuple[str, str, int], str], judgments: str = "judgments",
                 labels_name: str = "labels") -> dict[str, Any] | None:
    """One label per query from its K judged answer pairs (`answers`, judged in the records `judgments`): the
    outcome of each, the persona win rate (ties count half) with its interval, and label 1 (distill) when the rate
    reaches distill_min_win_rate, written as the records `labels_name`. Returns the labels' split-half reliability
    (None with K < 2)."""
    cfg, run_dir = ctx.config, ctx.run
    judge = JUDGES[cfg.judge]
    personas = {p["id"]: p for p in run_dir.read("personas")}
    queries = kept_queries(run_dir.read("queries"))
    judged: dict[tuple[str, int], dict[str, Judgment]] = {}
    for j in read_judgments(run_dir, judgments):
        if j.kind == judge.KIND and j.pair[1] < cfg.label_samples:
            judged.setdefault(j.pair, {})[j.slot] = j
    pairs = [(q["id"], k) for q in queries for k in range(cfg.label_samples)]
    decided = judge.decide_queries({pair: judged[pair] for pair in pairs}, cfg)
    labels = []
    for q in queries:
        outcomes = [decided[(q["id"], k)][0] for k in range(cfg.label_samples)]
        chosen = next((k for k, o in enumerate(outcomes) if o == "win"), 0)  # the persona answer distilled
        evidence = decided[(q["id"], chosen)][1]
        rate = win_rate(outcomes)
        label = int(rate >= cfg.distill_min_win_rate)
        many = cfg.label_samples > 1
        labels.append(Label(
            query_id=q["id"], persona_id=q["persona_id"], domain=q["domain"], query=q["query"],
            persona=personas[q["persona_id"]]["persona"], persona_answer=answers[(q["id"], "persona", chosen)],
            plain_answer=answers[(q["id"], "plain", chosen)], label=label, split="distill" if label else "retain",
            judge=judge.KIND, outcome=outcomes[0] if not many else aggregate_outcome(rate, cfg.distill_min_win_rate),
            **evidence,
            **({"sample_outcomes": outcomes, "win_rate": rate,
                "win_rate_interval": wilson_interval(rate, len(outcomes)), "sample": chosen or None} if many else {})))
    write_labels_file(run_dir, labels, labels_name)
    return label_reliability(labels)


def aggregate_outcome(rate: float, bar: float) -> str:
    """A query's outcome over its K pairs: a win when its win rate reaches the distillation bar, a loss when the
    plain answer's does, else a tie."""
    return "win" if rate >= bar else "loss" if 1.0 - rate >= bar else "tie"


def label_reliability(labels: list[Label]) -> dict[str, Any] | None:
    """How much a query's label would change on other samples: its K pairs split into two disjoint halves (even and
    odd samples), each half's win rate, and how far the halves agree: on the side of 0.5 the rate falls (above,
    at, below) and by Pearson correlation. None when no query has two samples."""
    halves = [(win_rate(r.sample_outcomes[0::2]), win_rate(r.sample_outcomes[1::2]))
              for r in labels if r.sample_outcomes and len(r.sample_outcomes) >= 2]
    if not halves:
        return None

    def side(rate: float) -> int:
        return (rate > 0.5) - (rate < 0.5)

    first, second = [a for a, _ in halves], [b for _, b in halves]
    correlation = None
    if len(halves) > 2 and statistics.pstdev(first) > 0 and statistics.pstdev(second) > 0:
        correlation = statistics.correlation(first, second)
    return {"queries": len(halves), "split_half_agreement": sum(side(a) == side(b) for a, b in halves) / len(halves),
            "split_half_correlation": correlation}


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
