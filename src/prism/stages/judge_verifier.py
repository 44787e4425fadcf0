"""The verifier judge: code decides. Each answer is scored by its domain's verifier (`prism.verifiers`), and the
persona wins a query when its answer scores higher than the plain one. No model is asked anything."""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from typing import Any

from prism.config import BootstrapConfig
from prism.errors import PrismError
from prism.stages.context import StageContext
from prism.stages.records import Judgment, Label
from prism.verifiers import Verifier, load_verifier, verifier_specs

KIND = "verifier"
SLOTS = ("persona", "plain")


def domain_verifiers(domains: list[str], config: BootstrapConfig) -> dict[str, Verifier]:
    """Each domain's verifier, loaded once (a user function is imported here)."""
    specs = verifier_specs(domains, config.verifier, config.verifiers)
    loaded = {spec: load_verifier(spec) for spec in set(specs.values())}
    return {domain: loaded[spec] for domain, spec in specs.items()}


def score(verifier: Verifier, query: dict, answer: str, variant: str) -> float:
    """One answer's score; a verifier that raises is an error that names the domain and the query."""
    try:
        return verifier(query["domain"], query["query"], answer)
    except Exception as exc:  # the user's code may raise anything
        raise PrismError(f"the verifier {verifier.spec!r} failed on the {variant} answer to a query of domain "
                         f"{query['domain']!r} ({query['query'][:120]!r}): {type(exc).__name__}: {exc}. The judgments "
                         "made before it are saved: fix the verifier and re-run the same command to resume") from None


def judge(ctx: StageContext, items: list[tuple[dict, str, str, str]]) -> Iterator[dict]:
    """The score records of (query, persona answer, plain answer, variant) items, one at a time (the caller saves
    every record made before a verifier raises)."""
    verifiers = domain_verifiers(sorted({query["domain"] for query, *_ in items}), ctx.config)
    for query, persona, plain, variant in items:
        verifier = verifiers[query["domain"]]
        yield {"variant": variant, "verifier": verifier.spec,
               "score": score(verifier, query, persona if variant == "persona" else plain, variant)}


def outcome_of(persona: float, plain: float) -> str:
    return "win" if persona > plain else "loss" if persona < plain else "tie"


def decide_queries(judged: dict[tuple[str, int], dict[str, Judgment]], _config: BootstrapConfig
                   ) -> dict[tuple[str, int], tuple[str, dict]]:
    decided = {}
    for pair, variants in judged.items():
        scores = {v: variants[v].score for v in SLOTS}
        assert None not in scores.values(), f"a verifier judgment of {pair} has no score"
        decided[pair] = (outcome_of(scores["persona"], scores["plain"]),  # type: ignore[arg-type]
                        {"scores": scores, "verifier": variants["persona"].verifier})
    return decided


def quality(judgments: list[Judgment], labels: list[Label], _config: dict[str, Any]) -> dict:
    """Per domain, the pass rate (mean score) of each side over every judged answer (all K samples), and the
    queries each side won, from the labels."""
    domain_of = {r.query_id: r.domain for r in labels}
    by_pair: dict[tuple[str, int], dict[str, Judgment]] = {}
    for j in judgments:
        if j.kind == KIND and j.query_id in domain_of:
            by_pair.setdefault(j.pair, {})[j.slot] = j
    pairs = [(domain_of[query_id], v) for (query_id, _), v in by_pair.items() if set(v) == set(SLOTS)]
    if not pairs:
        return {"kind": KIND, "pairs": 0}

    def pass_rate(rows: list[dict[str, Judgment]], slot: str) -> float:
        return statistics.fmean(float(v[slot].score or 0.0) for v in rows)

    def summary(rows: list[dict[str, Judgment]], outcomes: list[str]) -> dict[str, Any]:
        return {"persona_pass_rate": pass_rate(rows, "persona"), "plain_pass_rate": pass_rate(rows, "plain"),
                "persona_wins": outcomes.count("win")}

    outcomes = {r.query_id: r.outcome or ("win" if r.label else "tie") for r in labels}
    domains: dict[str, dict[str, Any]] = {}
    for domain in dict.fromkeys(r.domain for r in labels):
        rows = [v for d, v in pairs if d == domain]
        won = [outcomes[r.query_id] for r in labels if r.domain == domain]
        if rows:
            domains[domain] = {"n": len(won), "verifier": rows[0]["persona"].verifier, **summary(rows, won),
                               "plain_wins": won.count("loss")}
    return {"kind": KIND, "pairs": len(labels), **summary([v for _, v in pairs], list(outcomes.values())),
            "domains": domains}


def format_quality(quality: dict) -> list[str]:
    lines = [f"judge    verifier: pass rate with the persona {100 * quality['persona_pass_rate']:.0f}%, without "
             f"{100 * quality['plain_pass_rate']:.0f}% over {quality['pairs']} queries; persona wins "
             f"{quality['persona_wins']}"]
    for domain, row in quality["domains"].items():
        lines.append(f"judge    {domain} ({row['verifier']}): persona {100 * row['persona_pass_rate']:.0f}%, plain "
                     f"{100 * row['plain_pass_rate']:.0f}% of {row['n']}; persona wins {row['persona_wins']}, plain "
                     f"wins {row['plain_wins']}")
    return lines


def warning(quality: dict) -> str | None:
    if quality.get("persona_wins", 1):
        return None
    return ("warning: by the verifiers the persona answer was better for no query: there is nothing to distill, and "
            "the gate sends every query to the base model")
