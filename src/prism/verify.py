"""Stage 4: the model judges each (plain, persona) pair in both orders; the persona answer is kept for
distillation only when it wins both (label 1), everything else is retained as label 0."""

from __future__ import annotations

from prism.engine import Prompt
from prism.queries import kept_queries
from prism.runs import StageContext

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


def position_prior(all_probs: list[dict[str, float]]) -> dict[str, float]:
    """The judge's average preference per slot. Every pair is judged in both orders, so the content
    balances out and what remains is position bias (contextual calibration, Zhao et al. 2021)."""
    if not all_probs:
        return {option: 1 / len(OPTIONS) for option in OPTIONS}
    return {option: sum(p[option] for p in all_probs) / len(all_probs) for option in OPTIONS}


def decide(probs: dict[str, float], prior: dict[str, float] | None = None) -> str:
    # an option no judgment ever gave probability to has prior 0 (parsed text verdicts are one-hot)
    scores = {o: probs[o] / max(prior[o], 1e-9) if prior else probs[o] for o in OPTIONS}
    return max(OPTIONS, key=lambda o: scores[o])


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
