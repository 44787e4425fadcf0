"""The pairwise judge (the paper's rule): both answers in one prompt, judged in both slot orders; the persona
wins a query when it wins both. Verdicts come from the judge's next-token probabilities of A, B and TIE,
optionally corrected for the judge's average slot preference over the run (`judge_calibration`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prism.config import BootstrapConfig
from prism.engines.base import Prompt
from prism.stages.context import StageContext
from prism.stages.records import Judgment, Label

KIND = "pairwise"
OPTIONS = ("A", "B", "TIE")
ORDERS = ("persona_first", "persona_second")  # persona answer in slot A, then in slot B
SLOTS = ORDERS
JUDGE_SYSTEM = "You are an impartial judge of answer quality."
JUDGE_REQUEST = (
    "Compare two answers to the user's question.\n\n[Question]\n{question}\n\n[Answer A]\n{answer_a}\n\n"
    "[Answer B]\n{answer_b}\n\nWhich answer is better? Judge correctness first, then relevance, then "
    "helpfulness, then clarity. A longer answer is not a better answer. "
    "Reply with exactly one of: A, B, TIE."
)
JUDGE_PREFIX = "Verdict:"
JUDGE_MIN_CONSISTENCY = 0.5  # below this, the judge's winner follows the slot more than the answers
STRONGER_JUDGE_HINT = ("its labels carry no signal about the persona: judge with a stronger model through the "
                       "OpenAI-compatible engine (prism bootstrap --engine openai --base-url ... --engine-model ...), "
                       "or let code decide where it can (--judge verifier --verifier SPEC)")


def judge_prompt(question: str, answer_a: str, answer_b: str, max_chars: int) -> Prompt:
    request = JUDGE_REQUEST.format(question=question, answer_a=answer_a[:max_chars], answer_b=answer_b[:max_chars])
    return Prompt(request, system=JUDGE_SYSTEM, assistant_prefix=JUDGE_PREFIX)


def position_prior(all_probs: list[dict[str, float]]) -> dict[str, float]:
    """The judge's average preference per slot. Every pair is judged in both orders, so the content
    balances out and what remains is position bias (contextual calibration, Zhao et al. 2021)."""
    if not all_probs:
        return {option: 1 / len(OPTIONS) for option in OPTIONS}
    return {option: sum(p[option] for p in all_probs) / len(all_probs) for option in OPTIONS}


def decide(probs: dict[str, float], prior: dict[str, float] | None = None) -> str:
    """The verdict: the raw argmax (the paper's rule), or with `prior` the A/B split corrected for the
    judge's average slot preference. Only the split between A and B moves: the mass the judge put on
    "A or B" and TIE's own probability stay as they were, since TIE is not a slot and how often a judge
    says it is no position bias."""
    if prior is None:
        return max(OPTIONS, key=lambda o: probs[o])
    # an option no judgment ever gave probability to has prior 0 (parsed text verdicts are one-hot)
    a, b = probs["A"] / max(prior["A"], 1e-9), probs["B"] / max(prior["B"], 1e-9)
    either = probs["A"] + probs["B"]
    scores = {"A": either * a / (a + b) if a + b else 0.0, "B": either * b / (a + b) if a + b else 0.0,
              "TIE": probs["TIE"]}
    return max(OPTIONS, key=lambda o: scores[o])


def persona_won(order: str, verdict: str) -> bool:
    return verdict == ("A" if order == "persona_first" else "B")


def winner(order: str, verdict: str) -> str:
    """'persona', 'plain' or 'tie': what a slot verdict says about the answers themselves."""
    if verdict == "TIE":
        return "tie"
    return "persona" if persona_won(order, verdict) else "plain"


def both_orders_label(verdicts: dict[str, str]) -> int:
    """1 only when the persona answer wins in both orders; a single-order win is position noise."""
    return int(all(persona_won(order, verdicts[order]) for order in ORDERS))


def outcome_of(verdicts: dict[str, str]) -> str:
    """'win' when the persona won both orders, 'loss' when the plain answer did, else 'tie'."""
    if both_orders_label(verdicts):
        return "win"
    winners = {winner(order, verdicts[order]) for order in ORDERS}
    return "loss" if winners == {"plain"} else "tie"


def judge(ctx: StageContext, items: list[tuple[dict, str, str, str]]) -> Iterator[dict]:
    """The verdict records of (query, persona answer, plain answer, order) items, from one scoring pass."""
    cfg = ctx.config
    prompts = [judge_prompt(query["query"], *((persona, plain) if order == "persona_first" else (plain, persona)),
                            cfg.judge_max_chars) for query, persona, plain, order in items]
    verdicts = ctx.generator.option_probs(prompts, OPTIONS, batch_size=cfg.batch_size, desc=f"verify ({KIND})")
    for (_query, _persona, _plain, order), verdict in zip(items, verdicts):
        yield {"order": order, "probs": verdict.probs, "option_mass": verdict.mass,
               "verdict_source": verdict.source, "raw_verdict": decide(verdict.probs)}


def decide_queries(judged: dict[tuple[str, int], dict[str, Judgment]], config: BootstrapConfig
                   ) -> dict[tuple[str, int], tuple[str, dict]]:
    """Each query's outcome and what its label records: the verdict per order (position-calibrated when the
    run's rule says so, with the prior over the whole run)."""
    prior = (position_prior([probs(j) for orders in judged.values() for j in orders.values()])
             if config.judge_calibration == "position" else None)
    decided = {}
    for pair, orders in judged.items():
        verdicts = {order: decide(probs(orders[order]), prior) for order in ORDERS}
        decided[pair] = (outcome_of(verdicts), {
            "verdicts": {order: {"calibrated": verdicts[order], **orders[order].to_record()} for order in ORDERS},
            "position_prior": prior})
    return decided


def probs(judgment: Judgment) -> dict[str, float]:
    assert judgment.probs is not None, f"the pairwise judgment {judgment.id} has no probabilities"
    return judgment.probs


def quality(judgments: list[Judgment], _labels: list[Label], config: dict[str, Any]) -> dict:
    """How far the run's judge can be trusted, from its verdicts in both orders: the share of pairs whose
    winner is the same in both orders, the share of raw verdicts naming slot A, the probability mass the
    judge put on the option tokens, and the distill count under the paper's raw rule and under the
    position-calibrated one."""
    by_pair: dict[tuple[str, int], dict[str, Judgment]] = {}
    for j in judgments:
        by_pair.setdefault(j.pair, {})[j.slot] = j
    pairs = [orders for orders in by_pair.values() if set(orders) == set(ORDERS)]
    if not pairs:
        return {"kind": KIND, "pairs": 0}
    prior = position_prior([probs(j) for orders in pairs for j in orders.values()])
    raw = [{o: decide(probs(orders[o])) for o in ORDERS} for orders in pairs]
    calibrated = [{o: decide(probs(orders[o]), prior) for o in ORDERS} for orders in pairs]
    masses = [j.option_mass for orders in pairs for j in orders.values() if j.option_mass is not None]
    consistency = sum(winner(ORDERS[0], v[ORDERS[0]]) == winner(ORDERS[1], v[ORDERS[1]]) for v in raw) / len(raw)
    return {
        "kind": KIND,
        "pairs": len(pairs),
        "order_consistency": consistency,
        "slot_a_share": sum(v[o] == "A" for v in raw for o in ORDERS) / (2 * len(raw)),
        "option_mass_mean": sum(masses) / len(masses) if masses else None,
        "distill_raw_rule": sum(both_orders_label(v) for v in raw),
        "distill_calibrated_rule": sum(both_orders_label(v) for v in calibrated),
        "rule_in_force": config.get("judge_calibration", "position"),
        "position_bound": consistency < JUDGE_MIN_CONSISTENCY,
    }


def format_quality(quality: dict) -> list[str]:
    mass = quality["option_mass_mean"]
    return [f"judge    pairwise: same winner in both orders {100 * quality['order_consistency']:.0f}% of "
            f"{quality['pairs']} pairs, slot A {100 * quality['slot_a_share']:.0f}% of verdicts, option tokens hold "
            f"{'n/a' if mass is None else f'{100 * mass:.0f}%'} of its probability; persona wins both orders: "
            f"{quality['distill_raw_rule']} (raw rule), {quality['distill_calibrated_rule']} (position-calibrated), "
            f"rule in force: {'raw' if quality['rule_in_force'] == 'none' else 'position-calibrated'}"]


def warning(quality: dict) -> str | None:
    """One plain sentence when the judge is position-bound, else None."""
    if not quality.get("position_bound"):
        return None
    return (f"warning: the judge is position-bound (the same winner in both orders for only "
            f"{100 * quality['order_consistency']:.0f}% of pairs, below {100 * JUDGE_MIN_CONSISTENCY:.0f}%; "
            f"{100 * quality['slot_a_share']:.0f}% of its verdicts name slot A): {STRONGER_JUDGE_HINT}")
