"""The pointwise judge: each answer rated alone on 1-10 against a rubric (single-answer grading, as FastChat's
`single` mode), so no answer ever sits in a slot. An answer's score is its expected rating under the judge's
probabilities over the rating tokens (G-Eval's probability-weighted score), and the persona wins a query when
its score beats the plain answer's by more than `pointwise_margin`.

Reading "10": where the tokenizer splits digits, "10" begins with the token "1", so each answer is scored by
two prompts in one pass: the rating prompt (P of each first token), and the same prompt continued by "1"
(P that a "0" follows). Then P(10) = P("10" token) + P("1") P("0" | "1") and P(1) = P("1") (1 - P("0" | "1")).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from prism.config import BootstrapConfig
from prism.engines.base import OptionProbs, Prompt
from prism.errors import PrismError
from prism.stages.context import StageContext
from prism.stages.records import Judgment, Label

KIND = "pointwise"
SLOTS = ("persona", "plain")  # the answers judged, each in a prompt of its own
RATINGS = tuple(range(1, 11))
RATING_TOKENS = ("0", *(str(r) for r in RATINGS))  # "0": what may follow a first "1"
RATING_SYSTEM = "You are an impartial judge of answer quality."
RATING_REQUEST = (
    "Rate the answer to the user's question on a scale of 1 to 10.\n\n[Question]\n{question}\n\n[Answer]\n{answer}"
    "\n\nRubric: 10 = correct, relevant, helpful and clear; 7 = mostly right with small flaws; 4 = partly wrong, off "
    "the question or unclear; 1 = wrong or useless. Judge correctness first, then relevance, then helpfulness, then "
    "clarity. A longer answer is not a better answer. Reply with the rating as [[N]]."
)
RATING_PREFIX = "Rating: [["
FLAT_SHARE = 0.9  # when this share of pairs or more lies within the margin, the judge barely tells answers apart
NEEDS_PROBABILITIES = ("the pointwise judge needs the judge's token probabilities, and this engine returned none (a "
                       "reply parsed from text): use transformers, llama.cpp or a server that returns logprobs (vLLM, "
                       "prism serve), or --judge pairwise / verifier")


def rating_prompt(question: str, answer: str, max_chars: int) -> Prompt:
    return Prompt(RATING_REQUEST.format(question=question, answer=answer[:max_chars]), system=RATING_SYSTEM,
                  assistant_prefix=RATING_PREFIX)


def rating_distribution(first: OptionProbs, after_one: OptionProbs) -> tuple[dict[int, float], float]:
    """The distribution over ratings 1-10 from the rating prompt's first-token probabilities and the probability
    that "0" follows a first "1"; and the share of the judge's probability that went to a rating at all."""
    if first.mass is None or after_one.mass is None:
        raise PrismError(NEEDS_PROBABILITIES)
    p = {r: first.probs[str(r)] * first.mass for r in RATINGS}
    zero_after_one = after_one.probs["0"] * after_one.mass
    p[10] += p[1] * zero_after_one
    p[1] *= 1 - zero_after_one
    total = sum(p.values())
    if total <= 0:
        raise PrismError(NEEDS_PROBABILITIES)
    return {r: v / total for r, v in p.items()}, total


def expected_rating(distribution: dict[int, float]) -> float:
    return sum(r * p for r, p in distribution.items())


def judge(ctx: StageContext, items: list[tuple[dict, str, str, str]]) -> Iterator[dict]:
    """The rating records of (query, persona answer, plain answer, variant) items: each item's answer in its own
    prompt, the two prompts of an answer side by side (llama.cpp then reuses the first one's cache)."""
    cfg = ctx.config
    prompts = []
    for query, persona, plain, variant in items:
        prompt = rating_prompt(query["query"], persona if variant == "persona" else plain, cfg.judge_max_chars)
        prompts += [prompt, replace(prompt, assistant_prefix=prompt.assistant_prefix + "1")]
    scored = ctx.generator.option_probs(prompts, RATING_TOKENS, batch_size=cfg.batch_size, desc=f"verify ({KIND})")
    for k, (_query, _persona, _plain, variant) in enumerate(items):
        distribution, mass = rating_distribution(scored[2 * k], scored[2 * k + 1])
        yield {"variant": variant, "rating_probs": {str(r): p for r, p in distribution.items()},
               "score": expected_rating(distribution), "rating_mass": mass, "verdict_source": scored[2 * k].source}


def outcome_of(persona: float, plain: float, margin: float) -> str:
    difference = persona - plain
    return "win" if difference > margin else "loss" if difference < -margin else "tie"


def decide_queries(judged: dict[tuple[str, int], dict[str, Judgment]], config: BootstrapConfig
                   ) -> dict[tuple[str, int], tuple[str, dict]]:
    decided = {}
    for pair, variants in judged.items():
        scores = {v: score(variants[v]) for v in SLOTS}
        decided[pair] = (outcome_of(scores["persona"], scores["plain"], config.pointwise_margin),
                        {"scores": scores, "margin": config.pointwise_margin})
    return decided


def score(judgment: Judgment) -> float:
    assert judgment.score is not None, f"the judgment {judgment.id} has no score"
    return judgment.score


def quality(judgments: list[Judgment], _labels: list[Label], config: dict[str, Any]) -> dict:
    """Whether the ratings can tell answers apart: the spread of the scores, the share of pairs whose scores lie
    within the margin (a tie), the persona wins, and the probability the judge put on the rating tokens."""
    margin = config.get("pointwise_margin", 0.5)
    by_pair: dict[tuple[str, int], dict[str, Judgment]] = {}
    for j in judgments:
        by_pair.setdefault(j.pair, {})[j.slot] = j
    pairs = [v for v in by_pair.values() if set(v) == set(SLOTS)]
    if not pairs:
        return {"kind": KIND, "pairs": 0}
    scores = [score(j) for v in pairs for j in v.values()]
    differences = [score(v["persona"]) - score(v["plain"]) for v in pairs]
    within = sum(abs(d) <= margin for d in differences) / len(pairs)
    return {
        "kind": KIND, "pairs": len(pairs), "margin": margin,
        "score_mean": statistics.fmean(scores), "score_std": statistics.pstdev(scores),
        "score_min": min(scores), "score_max": max(scores),
        "persona_score_mean": statistics.fmean(score(v["persona"]) for v in pairs),
        "plain_score_mean": statistics.fmean(score(v["plain"]) for v in pairs),
        "difference_std": statistics.pstdev(differences),
        "within_margin_share": within,
        "persona_wins": sum(d > margin for d in differences), "plain_wins": sum(d < -margin for d in differences),
        "rating_mass_mean": statistics.fmean(j.rating_mass or 0.0 for v in pairs for j in v.values()),
        "flat": within >= FLAT_SHARE,
    }


def format_quality(quality: dict) -> list[str]:
    q = quality
    return [f"judge    pointwise: scores {q['score_mean']:.2f} +- {q['score_std']:.2f} (range {q['score_min']:.2f}-"
            f"{q['score_max']:.2f}; persona {q['persona_score_mean']:.2f}, plain {q['plain_score_mean']:.2f}), "
            f"{100 * q['within_margin_share']:.0f}% of {q['pairs']} pairs within the margin {q['margin']:g}; persona "
            f"wins {q['persona_wins']}, plain wins {q['plain_wins']}; rating tokens hold "
            f"{100 * q['rating_mass_mean']:.0f}% of its probability"]


def warning(quality: dict) -> str | None:
    if not quality.get("flat"):
        return None
    spread = quality["difference_std"]
    return (f"warning: the pointwise judge rates the two answers of {100 * quality['within_margin_share']:.0f}% of "
            f"the pairs within {quality['margin']:g} of each other (their difference varies by "
            f"{'n/a' if math.isnan(spread) else f'{spread:.2f}'}): its labels carry little signal; use a stronger "
            "judge (prism bootstrap --engine openai ...) or a verifier (--judge verifier --verifier SPEC)")
