"""Knowledge benchmarks (MMLU, ARC): each system's choice among the options, scored by the log-likelihood of
the answer letter after the prompt or of each choice's own text (cloze); no generation."""

from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from prism.evaluation import data as benchdata
from prism.evaluation.config import MMLU_PERSONA_DOMAINS
from prism.evaluation.context import Evaluation, messages_for
from prism.lm.batching import length_sorted_batches
from prism.lm.models import first_token_ids

log = logging.getLogger("prism")


def choice_prompt(question: str, choices: list[str]) -> str:
    options = "\n".join(f"{benchdata.LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{question}\n\n{options}\n\nAnswer with the letter of the correct option."


def run(ev: Evaluation, bench: str) -> None:
    """Score every system on MMLU or ARC (`bench`), by letter or cloze log-likelihood."""
    if bench == "mmlu":
        items = benchdata.load_mmlu(ev.source("mmlu"), ev.config.limit_for("mmlu"))
    else:
        items = [item for split in ev.config.arc_splits
                 for item in benchdata.load_arc(ev.source("arc"), ev.config.limit_for("arc"), split)]
    ev.items[bench] = {it["id"] for it in items}
    for system in ev.config.systems:
        name = ev.cache_name(system)
        todo = ev.pending(bench, (f"{name}:{ev.config.scoring}:{it['id']}" for it in items))
        todo_ids = {k.split(":", 2)[2] for k in todo}
        pending = [it for it in items if it["id"] in todo_ids]
        batches = length_sorted_batches([len(choice_prompt(it["question"], it["choices"])) for it in pending],
                                        ev.config.batch_size)
        started = time.perf_counter()
        for batch in tqdm(batches, desc=f"{bench} {system}", leave=False):
            chunk = [pending[i] for i in batch]
            scores, decisions = choice_scores(ev, system, chunk)
            ev.store.append(bench, [
                {"key": f"{name}:{ev.config.scoring}:{it['id']}", "system": system, "id": it["id"],
                 "subject": it["subject"], "domain": it["domain"], "scoring": ev.config.scoring,
                 "pred": int(torch.tensor(s).argmax()), "answer": it["answer"],
                 "correct": int(torch.tensor(s).argmax()) == it["answer"], "scores": s,
                 "route": d.route, "gate_probability": d.gate_probability,
                 **({"persona": d.persona} if d.persona else {})}
                for it, s, d in zip(chunk, scores, decisions)])
        if pending:
            seconds = time.perf_counter() - started
            log.info("%s %s: %d items scored in %.1f s = %.2f items/s", bench, system, len(pending), seconds,
                     len(pending) / seconds)


def choice_scores(ev: Evaluation, system: str, items: list[dict]) -> tuple[list[list[float]], list]:
    tokenizer = ev.model.lm.tokenizer
    conversations = [messages_for(system, choice_prompt(it["question"], it["choices"]),
                                  ev.persona_for(MMLU_PERSONA_DOMAINS.get(it["domain"], it["domain"])))
                     for it in items]
    requests = ev.requests(system, conversations, assistant_prefix="Answer:")
    if ev.config.scoring == "letter":
        logprobs, decisions = ev.model.next_token_logprobs(requests)
        letter_ids = [first_token_ids(tokenizer, letter) for letter in benchdata.LETTERS]
        scores = [[float(torch.logsumexp(logprobs[row, letter_ids[c]], 0)) for c in range(len(it["choices"]))]
                  for row, it in enumerate(items)]
        return scores, decisions
    # cloze: length-normalized log-likelihood of each choice's own text after "Answer:"
    scores, decisions = [], []
    for it, request in zip(items, requests):
        variants = [request] * len(it["choices"])
        values, routes = ev.model.continuation_logprobs(variants, [f" {c}" for c in it["choices"]])
        scores.append([v / max(1, n) for v, n in values])
        decisions.append(routes[0])
    return scores, decisions

