"""MT-Bench: two-turn answers from every system, graded 1-10 by the judge (FastChat's single-answer prompts)
and judged against base in both slot orders (its pairwise prompts)."""

from __future__ import annotations

from prism.evaluation import data as benchdata
from prism.evaluation.context import Evaluation, messages_for
from prism.evaluation.judge import parse_pair_verdict, parse_rating
from prism.inference.base import GenerationRequest
from prism.lm.decoding import SamplingParams

ROUTED_ONCE = ("prism", "kway", "kway-lora")  # systems whose route (and adapter) the first turn decides


def run(ev: Evaluation, bench: str = "mtbench") -> None:
    """Both turns of every question for every system, then single-answer grades and pairs against base."""
    data = benchdata.load_mtbench(ev.source("mtbench"), ev.config.limit_for("mtbench"), ev.data_dir)
    params = SamplingParams(max_tokens=ev.config.mtbench_max_tokens)
    questions = {q["question_id"]: q for q in data["questions"]}
    ev.items["mtbench"] = set(questions)
    for turn in (0, 1):
        answers = {r["key"]: r for r in ev.store.read("mtbench_answers")}
        jobs, extra = {}, {}
        for system in ev.config.systems:
            name = ev.cache_name(system)
            todo: list[tuple[int, list[dict[str, str]], dict]] = []
            for qid, q in questions.items():
                if f"{name}:{qid}:{turn}" in answers:  # cached
                    continue
                history, first = [], answers.get(f"{name}:{qid}:0")
                if turn == 1:
                    if first is None:
                        continue
                    history = [{"role": "user", "content": q["turns"][0]},
                               {"role": "assistant", "content": first["text"]}]
                messages = messages_for(system, q["turns"][turn], ev.persona_for(q["category"]), history)
                todo.append((qid, messages, first))
            if turn == 0 or system not in ROUTED_ONCE:
                requests = ev.requests(system, [messages for _, messages, _ in todo], params)
            else:  # the paper routes a conversation once, on its first turn: turn 2 keeps turn 1's route
                requests = [GenerationRequest(messages, first["route"], params, persona=first.get("persona"))
                            for _, messages, first in todo]
            for (qid, _, first), request in zip(todo, requests):
                key = f"{name}:{qid}:{turn}"
                jobs[key] = request
                routed = ({"gate_probability": first["gate_probability"], "routed_on": "turn 1"}
                          if turn == 1 and system in ROUTED_ONCE else {})
                extra[key] = {**routed, "system": system, "question_id": qid, "category": questions[qid]["category"],
                              "turn": turn}
        ev.generate("mtbench_answers", jobs, extra, f"mt-bench turn {turn + 1}")
    grade_single(ev, data)
    grade_pairs(ev, data)


def grade_single(ev: Evaluation, data: dict) -> None:
    answers = {r["key"]: r for r in ev.store.read("mtbench_answers")}
    prompts, meta = [], []
    pending = set(ev.pending("mtbench_scores", (f"single:{k}" for k in answers)))
    for key, answer in answers.items():
        if f"single:{key}" not in pending:
            continue
        system, qid, turn = answer["system"], answer["question_id"], answer["turn"]
        q = next((q for q in data["questions"] if q["question_id"] == qid), None)
        first = answers.get(f"{ev.cache_name(system)}:{qid}:0")
        if q is None or (turn == 1 and first is None):
            continue
        reference = data["references"].get(qid) if q["category"] in benchdata.NEEDS_REFERENCE else None
        name = ("single-math-v1" if reference else "single-v1") + ("-multi-turn" if turn == 1 else "")
        template = data["judge_prompts"][name]
        fields = {"question": q["turns"][0], "answer": answer["text"], "question_1": q["turns"][0],
                  "question_2": q["turns"][1], "answer_1": (first or answer)["text"], "answer_2": answer["text"],
                  "ref_answer_1": (reference or ["", ""])[0], "ref_answer_2": (reference or ["", ""])[1]}
        prompts.append((template["system_prompt"], template["prompt_template"].format(**fields)))
        meta.append({"key": f"single:{key}", "system": system, "question_id": qid, "category": q["category"],
                     "turn": turn, "judge_prompt": name, "judge": ev.judge.name})
    ev.judge_in_chunks("mtbench_scores", prompts, meta, "mt-bench grading", lambda chunk: [
        {"score": parse_rating(r, ev.judge.prefixed), "raw": r}
        for r in ev.judge.complete(chunk, prefix="Rating: [[", max_tokens=3)])


def grade_pairs(ev: Evaluation, data: dict) -> None:
    """Each system's answers against base's, turn by turn (turn 2 judged with both conversations, as
    FastChat's multi-turn pair prompts do), each pair in both slot orders."""
    answers = {r["key"]: r for r in ev.store.read("mtbench_answers")}
    prompts, meta = [], []
    done = {r["key"] for r in ev.store.read("mtbench_pairs")}
    for system in ev.config.systems:
        if system == "base":
            continue
        for q, turn in ((q, turn) for q in data["questions"] for turn in (0, 1)):
            qid = q["question_id"]
            ours = [answers.get(f"{ev.cache_name(system)}:{qid}:{t}") for t in range(turn + 1)]
            base = [answers.get(f"base:{qid}:{t}") for t in range(turn + 1)]
            if None in ours or None in base:
                continue
            reference = data["references"].get(qid) if q["category"] in benchdata.NEEDS_REFERENCE else None
            name = ("pair-math-v1" if reference else "pair-v2") + ("-multi-turn" if turn == 1 else "")
            template = data["judge_prompts"][name]
            for order in ("system_first", "base_first"):
                key = f"pair:{ev.cache_name(system)}:{qid}:{turn}:{order}"
                if key in done:
                    continue
                a, b = (ours, base) if order == "system_first" else (base, ours)
                fields = {"question": q["turns"][0], "question_1": q["turns"][0], "question_2": q["turns"][1],
                          "answer_a": a[0]["text"], "answer_b": b[0]["text"],
                          "answer_a_1": a[0]["text"], "answer_b_1": b[0]["text"],
                          "answer_a_2": a[-1]["text"], "answer_b_2": b[-1]["text"],
                          "ref_answer_1": (reference or ["", ""])[0], "ref_answer_2": (reference or ["", ""])[1]}
                prompts.append((template["system_prompt"], template["prompt_template"].format(**fields)))
                meta.append({"key": key, "system": system, "question_id": qid, "category": q["category"],
                             "turn": turn, "order": order, "judge_prompt": name, "judge": ev.judge.name})
    ev.judge_in_chunks("mtbench_pairs", prompts, meta, "mt-bench pairs", lambda chunk: [
        {"verdict": parse_pair_verdict(r, ev.judge.prefixed), "raw": r}
        for r in ev.judge.complete(chunk, prefix="[[", max_tokens=2)])

