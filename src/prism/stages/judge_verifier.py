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


def decide_queries(judged: dict[str, dict[str, Judgment]], _config: BootstrapConfig) -> dict[str, tuple[str, dict]]:
    decided = {}
    for qid, variants in judged.items():
        scores = {v: variants[v].score for v in SLOTS}
        assert None not in scores.values(), f"a verifier judgment of {qid} has no score"
        decided[qid] = (outcome_of(scores["persona"], scores["plain"]),  # type: ignore[arg-type]
                        {"scores": scores, "verifier": variants["persona"].verifier})
    return decided


def quality(_judgments: list[Judgment], labels: list[Label], _config: dict[str, Any]) -> dict:
    """Per domain, the pass rate (mean score) of each side and who won, from the labels."""
    scored = [(r, r.scores) for r in labels if r.scores is not None]
    if not scored:
        return {"kind": KIND, "pairs": 0}

    def summary(rows: list[tuple[Label, dict[str, float]]]) -> dict[str, Any]:
        return {"persona_pass_rate": statistics.fmean(s["persona"] for _, s in rows),
                "plain_pass_rate": statistics.fmean(s["plain"] for _, s in rows),
                "persona_wins": sum(r.outcome == "win" for r, _ in rows)}

    domains: dict[str, dict[str, Any]] = {}
    for domain in dict.fromkeys(r.domain for r, _ in scored):
        rows = [(r, s) for r, s in scored if r.domain == domain]
        domains[domain] = {"n": len(rows), "verifier": rows[0][0].verifier, **summary(rows),
                           "plain_wins": sum(r.outcome == "loss" for r, _ in rows)}
    return {"kind": KIND, "pairs": len(scored), **summary(scored), "domains": domains}


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
