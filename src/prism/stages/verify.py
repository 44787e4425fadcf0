"""Stage 4: the model judges each (plain, persona) pair in both orders; the persona answer is kept for
distillation only when it wins both (label 1), everything else is retained as label 0."""

from __future__ import annotations

from collections import Counter

from prism.config import persona_slug
from prism.engines.base import Prompt
from prism.stages.context import StageContext
from prism.stages.queries import kept_queries

OPTIONS = ("A", "B", "TIE")
ORDERS = ("persona_first", "persona_second")  # persona answer in slot A, then in slot B
JUDGE_SYSTEM = "You are an impartial judge of answer quality."
JUDGE_REQUEST = (
    "Compare two answers to the user's question.\n\n[Question]\n{question}\n\n[Answer A]\n{answer_a}\n\n"
    "[Answer B]\n{answer_b}\n\nWhich answer is better? Judge correctness first, then relevance, then "
    "helpfulness, then clarity. A longer answer is not a better answer. "
    "Reply with exactly one of: A, B, TIE."
)
JUDGE_PREFIX = "Verdict:"


def judge_prompt(question: str, answer_a: str, answer_b: str, max_chars: int) -> Prompt:
    request = JUDGE_REQUEST.format(question=question, answer_a=answer_a[:max_chars], answer_b=answer_b[:max_chars])
    return Prompt(request, system=JUDGE_SYSTEM, assistant_prefix=JUDGE_PREFIX)


JUDGE_MIN_CONSISTENCY = 0.5  # below this, the judge's winner follows the slot more than the answers
STRONGER_JUDGE_HINT = ("its labels carry no signal about the persona: judge with a stronger model through the "
                       "OpenAI-compatible engine (prism bootstrap --engine openai --base-url ... --engine-model ...)")


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


def winner(order: str, verdict: str) -> str:
    """'persona', 'plain' or 'tie': what a slot verdict says about the answers themselves."""
    if verdict == "TIE":
        return "tie"
    return "persona" if persona_won(order, verdict) else "plain"


def judge_quality(judgments: list[dict], calibration: str) -> dict:
    """How far the run's judge can be trusted, from its verdicts in both orders: the share of pairs whose
    winner is the same in both orders, the share of raw verdicts naming slot A, the probability mass the
    judge put on the option tokens, and the distill count under the paper's raw rule and under the
    position-calibrated one."""
    by_query: dict[str, dict[str, dict]] = {}
    for j in judgments:
        by_query.setdefault(j["query_id"], {})[j["order"]] = j
    pairs = [orders for orders in by_query.values() if set(orders) == set(ORDERS)]
    if not pairs:
        return {"pairs": 0}
    prior = position_prior([j["probs"] for orders in pairs for j in orders.values()])
    raw = [{o: decide(orders[o]["probs"]) for o in ORDERS} for orders in pairs]
    calibrated = [{o: decide(orders[o]["probs"], prior) for o in ORDERS} for orders in pairs]
    masses = [j["option_mass"] for orders in pairs for j in orders.values() if j.get("option_mass") is not None]
    consistency = sum(winner(ORDERS[0], v[ORDERS[0]]) == winner(ORDERS[1], v[ORDERS[1]]) for v in raw) / len(raw)
    return {
        "pairs": len(pairs),
        "order_consistency": consistency,
        "slot_a_share": sum(v[o] == "A" for v in raw for o in ORDERS) / (2 * len(raw)),
        "option_mass_mean": sum(masses) / len(masses) if masses else None,
        "distill_raw_rule": sum(both_orders_label(v) for v in raw),
        "distill_calibrated_rule": sum(both_orders_label(v) for v in calibrated),
        "rule_in_force": calibration,
        "position_bound": consistency < JUDGE_MIN_CONSISTENCY,
    }


def format_judge_quality(quality: dict) -> str:
    if not quality.get("pairs"):
        return "judge    no pair judged in both orders yet"
    mass = quality["option_mass_mean"]
    return (f"judge    same winner in both orders {100 * quality['order_consistency']:.0f}% of {quality['pairs']} "
            f"pairs, slot A {100 * quality['slot_a_share']:.0f}% of verdicts, option tokens hold "
            f"{'n/a' if mass is None else f'{100 * mass:.0f}%'} of its probability; persona wins both orders: "
            f"{quality['distill_raw_rule']} (raw rule), {quality['distill_calibrated_rule']} (position-calibrated), "
            f"rule in force: {'raw' if quality['rule_in_force'] == 'none' else 'position-calibrated'}")


def judge_warning(quality: dict) -> str | None:
    """One plain sentence when the judge is position-bound, else None."""
    if not quality.get("position_bound"):
        return None
    return (f"warning: the judge is position-bound (the same winner in both orders for only "
            f"{100 * quality['order_consistency']:.0f}% of pairs, below {100 * JUDGE_MIN_CONSISTENCY:.0f}%; "
            f"{100 * quality['slot_a_share']:.0f}% of its verdicts name slot A): {STRONGER_JUDGE_HINT}")


def persona_won(order: str, verdict: str) -> bool:
    return verdict == ("A" if order == "persona_first" else "B")


def both_orders_label(verdicts: dict[str, str]) -> int:
    """1 only when the persona answer wins in both orders; a single-order win is position noise."""
    return int(all(persona_won(order, verdicts[order]) for order in ORDERS))


def run(ctx: StageContext) -> None:
    cfg, run_dir = ctx.config, ctx.run
    queries = {q["id"]: q for q in kept_queries(run_dir.read("queries"))}
    answers = {(a["query_id"], a["variant"]): a["answer"] for a in run_dir.read("answers")}
    done = {j["id"] for j in run_dir.read("judgments")}
    jobs = [(qid, order) for qid in queries for order in ORDERS if f"{qid}:{order}" not in done]
    # Scored in chunks so each chunk is saved before the next starts (a kill loses one chunk at most).
    chunk = cfg.batch_size * 4
    for start in range(0, len(jobs), chunk):
        part = jobs[start : start + chunk]
        prompts = []
        for qid, order in part:
            persona, plain = answers[(qid, "persona")], answers[(qid, "plain")]
            a, b = (persona, plain) if order == "persona_first" else (plain, persona)
            prompts.append(judge_prompt(queries[qid]["query"], a, b, cfg.judge_max_chars))
        verdicts = ctx.generator.option_probs(prompts, OPTIONS, batch_size=cfg.batch_size,
                                              desc=f"verify {start + len(part)}/{len(jobs)}")
        records = []
        for (qid, order), verdict in zip(part, verdicts):
            records.append({"id": f"{qid}:{order}", "query_id": qid, "order": order, "probs": verdict.probs,
                            "option_mass": verdict.mass, "verdict_source": verdict.source,
                            "raw_verdict": decide(verdict.probs)})
        run_dir.append("judgments", records)
    write_labels(ctx)


def write_labels(ctx: StageContext) -> None:
    cfg, run_dir = ctx.config, ctx.run
    personas = {p["id"]: p for p in run_dir.read("personas")}
    queries = kept_queries(run_dir.read("queries"))
    answers = {(a["query_id"], a["variant"]): a["answer"] for a in run_dir.read("answers")}
    judgments = {(j["query_id"], j["order"]): j for j in run_dir.read("judgments")}
    prior = position_prior([j["probs"] for j in judgments.values()]) if cfg.judge_calibration == "position" else None
    labels = []
    for q in queries:
        verdicts = {order: decide(judgments[(q["id"], order)]["probs"], prior) for order in ORDERS}
        label = both_orders_label(verdicts)
        labels.append({
            "query_id": q["id"], "persona_id": q["persona_id"], "domain": q["domain"], "query": q["query"],
            "persona": personas[q["persona_id"]]["persona"],
            "persona_answer": answers[(q["id"], "persona")], "plain_answer": answers[(q["id"], "plain")],
            "label": label, "split": "distill" if label else "retain",
            "verdicts": {order: {"calibrated": verdicts[order], **judgments[(q["id"], order)]} for order in ORDERS},
            "position_prior": prior,
        })
    run_dir.rewrite("labels", labels)


def kway_classes(labels: list[dict], min_wins: int) -> tuple[list[str], dict[str, int]]:
    """k-way routing's classes from the labels: "base", then the persona of each domain with at least
    `min_wins` both-order wins (in domain order); and the domains merged into base with their win counts."""
    wins = Counter(r["domain"] for r in labels if r["label"] == 1)
    domains = list(dict.fromkeys(r["domain"] for r in labels))
    kept = [d for d in domains if wins[d] >= min_wins]
    return ["base", *(persona_slug(d) for d in kept)], {d: wins[d] for d in domains if d not in kept}


def kway_label(record: dict, classes: list[str]) -> int:
    """A query's k-way class: its domain's persona when that persona won both orders and has an adapter, else base."""
    slug = persona_slug(record["domain"])
    return classes.index(slug) if record["label"] == 1 and slug in classes else 0
