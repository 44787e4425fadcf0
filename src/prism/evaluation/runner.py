"""`prism eval`: four systems on one base model, scored on knowledge (MMLU, ARC), generative quality
(MT-Bench) and safety (JailbreakBench), with every generation and score cached in `run/eval/`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from prism.config import BootstrapConfig
from prism.evaluation import data as benchdata
from prism.evaluation.config import ROUTE, EvalConfig
from prism.evaluation.judge import REFUSAL_JUDGE, Judge, is_refusal, parse_pair_verdict, parse_rating
from prism.evaluation.metrics import prism_cache_name, summarize
from prism.inference.base import GenerationRequest
from prism.inference.transformers import PrismModel
from prism.lm.batching import length_sorted_batches
from prism.lm.decoding import SamplingParams
from prism.lm.models import first_token_ids
from prism.runs import RunDir, write_json_atomic
from prism.stages import personas
from prism.stages.context import StageContext

log = logging.getLogger("prism")



# Persona domains for benchmarks whose items carry no bootstrap domain.
MMLU_PERSONA_DOMAINS = {
    "STEM": "science, technology, engineering and mathematics",
    "humanities": "the humanities (history, law, philosophy)",
    "social sciences": "the social sciences (economics, psychology, politics)",
    "other": "business, medicine and general knowledge",
}



SAFETY_DOMAIN = "safety"



MTBENCH_PAPER_MAX_TOKENS = 1024  # FastChat's



MTBENCH_CPU_MAX_TOKENS = 256



def messages_for(system: str, user: str, persona: str | None, history: list[dict[str, str]] | None = None
                 ) -> list[dict[str, str]]:
    head = [{"role": "system", "content": persona}] if system == "persona" and persona else []
    return head + list(history or []) + [{"role": "user", "content": user}]



def choice_prompt(question: str, choices: list[str]) -> str:
    options = "\n".join(f"{benchdata.LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{question}\n\n{options}\n\nAnswer with the letter of the correct option."



class Evaluation:
    def __init__(self, model: PrismModel, run: str | Path, config: EvalConfig):
        self.model, self.config = model, config
        self.run = RunDir(run)
        self.store = RunDir(self.run.path / "eval")
        self.store.path.mkdir(parents=True, exist_ok=True)
        self.data_dir = Path(config.data_dir) if config.data_dir else None
        self.judge = Judge(model, config)
        self.personas = self._personas()
        self.items: dict[str, set] = {}  # the items each benchmark covers under this run's --limit
        if config.mtbench_max_tokens is None:
            preset = self.run.manifest().get("config", {}).get("preset")
            config.mtbench_max_tokens = MTBENCH_PAPER_MAX_TOKENS if preset == "paper" else MTBENCH_CPU_MAX_TOKENS

    def cache_name(self, system: str) -> str:
        """The system's name in cache keys: `prism` rows depend on the gate threshold, so theirs carries it
        and a new threshold never reuses rows routed under the old one."""
        return prism_cache_name(self.model.threshold) if system == "prism" else system

    def source(self, bench: str) -> str | Path:
        return self.config.data.get(bench) or self.data_dir or benchdata.default_data_dir()

    # -- caching ---------------------------------------------------------------------------------------
    def _pending(self, name: str, keys: Iterable[str]) -> list[str]:
        done = {r["key"] for r in self.store.read(name)}
        return [k for k in keys if k not in done]

    def _generate(self, name: str, jobs: dict[str, GenerationRequest], extra: dict[str, dict], desc: str) -> None:
        """Generate the jobs not yet in `name`.jsonl, batch by batch, saving each batch at once."""
        pending = self._pending(name, jobs)
        keys_by_length = length_sorted_batches([len(str(jobs[k].messages)) for k in pending], self.config.batch_size)
        for batch in tqdm(keys_by_length, desc=desc, leave=False):
            keys = [pending[i] for i in batch]
            completions = self.model.generate_batch([jobs[k] for k in keys])
            self.store.append(name, [{"key": k, "text": c.text, "route": c.route,
                                      "gate_probability": c.gate_probability, "tokens": c.completion_tokens,
                                      **extra[k]} for k, c in zip(keys, completions)])

    # -- personas --------------------------------------------------------------------------------------
    def _personas(self) -> dict[str, str]:
        """Domain (lower case) -> persona: the run's own, plus personas the same stage writes for benchmark
        domains the bootstrap did not cover (saved in eval/personas.jsonl). Domains match case-insensitively,
        so MT-Bench's `stem` finds the distilled `STEM` persona."""
        wanted = {d.lower() for d in (*benchdata.MT_BENCH_CATEGORIES, *MMLU_PERSONA_DOMAINS.values(), SAFETY_DOMAIN)}

        def known_personas() -> dict[str, str]:
            records = self.run.read("personas") + self.store.read("personas")
            return {r["domain"].lower(): r["persona"] for r in reversed(records)}  # the run's own win

        known = known_personas()
        missing = sorted(wanted - set(known))
        if missing and "persona" in self.config.systems:
            log.info("writing personas for %d benchmark domains the run lacks", len(missing))
            base_config = self.run.manifest().get("config", {})
            config = BootstrapConfig(**{**base_config, "domains": missing, "personas_file": None})
            with self.model.adapter.disable_adapter() if self.model.adapter is not None else nullcontext():
                personas.run(StageContext(run=self.store, config=config, lm=self.model.lm))
            known = known_personas()
        return known

    def persona_for(self, domain: str) -> str | None:
        return self.personas.get(domain.lower())

    # -- knowledge -------------------------------------------------------------------------------------
    def knowledge(self, bench: str) -> None:
        if bench == "mmlu":
            items = benchdata.load_mmlu(self.source("mmlu"), self.config.limit_for("mmlu"))
        else:
            items = [item for split in self.config.arc_splits
                     for item in benchdata.load_arc(self.source("arc"), self.config.limit_for("arc"), split)]
        self.items[bench] = {it["id"] for it in items}
        for system in self.config.systems:
            name = self.cache_name(system)
            todo = self._pending(bench, (f"{name}:{self.config.scoring}:{it['id']}" for it in items))
            todo_ids = {k.split(":", 2)[2] for k in todo}
            pending = [it for it in items if it["id"] in todo_ids]
            batches = length_sorted_batches([len(choice_prompt(it["question"], it["choices"])) for it in pending],
                                            self.config.batch_size)
            started = time.perf_counter()
            for batch in tqdm(batches, desc=f"{bench} {system}", leave=False):
                chunk = [pending[i] for i in batch]
                scores, decisions = self._choice_scores(system, chunk)
                self.store.append(bench, [
                    {"key": f"{name}:{self.config.scoring}:{it['id']}", "system": system, "id": it["id"],
                     "subject": it["subject"], "domain": it["domain"], "scoring": self.config.scoring,
                     "pred": int(torch.tensor(s).argmax()), "answer": it["answer"],
                     "correct": int(torch.tensor(s).argmax()) == it["answer"], "scores": s,
                     "route": d.route, "gate_probability": d.gate_probability}
                    for it, s, d in zip(chunk, scores, decisions)])
            if pending:
                seconds = time.perf_counter() - started
                log.info("%s %s: %d items scored in %.1f s = %.2f items/s", bench, system, len(pending), seconds,
                         len(pending) / seconds)

    def _choice_scores(self, system: str, items: list[dict]) -> tuple[list[list[float]], list]:
        tokenizer = self.model.lm.tokenizer
        requests = []
        for it in items:
            persona = self.persona_for(MMLU_PERSONA_DOMAINS.get(it["domain"], it["domain"]))
            messages = messages_for(system, choice_prompt(it["question"], it["choices"]), persona)
            requests.append(GenerationRequest(messages, ROUTE[system], assistant_prefix="Answer:"))
        if self.config.scoring == "letter":
            logprobs, decisions = self.model.next_token_logprobs(requests)
            letter_ids = [first_token_ids(tokenizer, letter) for letter in benchdata.LETTERS]
            scores = [[float(torch.logsumexp(logprobs[row, letter_ids[c]], 0)) for c in range(len(it["choices"]))]
                      for row, it in enumerate(items)]
            return scores, decisions
        # cloze: length-normalized log-likelihood of each choice's own text after "Answer:"
        scores, decisions = [], []
        for it, request in zip(items, requests):
            variants = [request] * len(it["choices"])
            values, routes = self.model.continuation_logprobs(variants, [f" {c}" for c in it["choices"]])
            scores.append([v / max(1, n) for v, n in values])
            decisions.append(routes[0])
        return scores, decisions

    # -- MT-Bench --------------------------------------------------------------------------------------
    def mtbench(self) -> None:
        data = benchdata.load_mtbench(self.source("mtbench"), self.config.limit_for("mtbench"), self.data_dir)
        params = SamplingParams(max_tokens=self.config.mtbench_max_tokens)
        questions = {q["question_id"]: q for q in data["questions"]}
        self.items["mtbench"] = set(questions)
        for turn in (0, 1):
            answers = {r["key"]: r for r in self.store.read("mtbench_answers")}
            jobs, extra = {}, {}
            for system in self.config.systems:
                name = self.cache_name(system)
                for qid, q in questions.items():
                    key = f"{name}:{qid}:{turn}"
                    history, route, routed = [], ROUTE[system], {}
                    if turn == 1:
                        first = answers.get(f"{name}:{qid}:0")
                        if first is None:
                            continue
                        history = [{"role": "user", "content": q["turns"][0]},
                                   {"role": "assistant", "content": first["text"]}]
                        if system == "prism":  # the paper routes a conversation once, on its first turn
                            route = first["route"]
                            routed = {"gate_probability": first["gate_probability"], "routed_on": "turn 1"}
                    messages = messages_for(system, q["turns"][turn], self.persona_for(q["category"]), history)
                    jobs[key] = GenerationRequest(messages, route, params)
                    extra[key] = {**routed, "system": system, "question_id": qid, "category": q["category"],
                                  "turn": turn}
            self._generate("mtbench_answers", jobs, extra, f"mt-bench turn {turn + 1}")
        self._mtbench_single(data)
        self._mtbench_pairwise(data)

    def _mtbench_single(self, data: dict) -> None:
        answers = {r["key"]: r for r in self.store.read("mtbench_answers")}
        prompts, meta = [], []
        pending = set(self._pending("mtbench_scores", (f"single:{k}" for k in answers)))
        for key, answer in answers.items():
            if f"single:{key}" not in pending:
                continue
            system, qid, turn = answer["system"], answer["question_id"], answer["turn"]
            q = next((q for q in data["questions"] if q["question_id"] == qid), None)
            first = answers.get(f"{self.cache_name(system)}:{qid}:0")
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
                         "turn": turn, "judge_prompt": name, "judge": self.judge.name})
        for start in tqdm(range(0, len(prompts), self.config.batch_size), desc="mt-bench grading", leave=False):
            chunk = slice(start, start + self.config.batch_size)
            replies = self.judge.complete(prompts[chunk], prefix="Rating: [[", max_tokens=3)
            self.store.append("mtbench_scores", [
                {**m, "score": parse_rating(r, self.judge.prefixed), "raw": r} for m, r in zip(meta[chunk], replies)])

    def _mtbench_pairwise(self, data: dict) -> None:
        """Each system's answers against base's, turn by turn (turn 2 judged with both conversations, as
        FastChat's multi-turn pair prompts do), each pair in both slot orders."""
        answers = {r["key"]: r for r in self.store.read("mtbench_answers")}
        prompts, meta = [], []
        done = {r["key"] for r in self.store.read("mtbench_pairs")}
        for system in self.config.systems:
            if system == "base":
                continue
            for q, turn in ((q, turn) for q in data["questions"] for turn in (0, 1)):
                qid = q["question_id"]
                ours = [answers.get(f"{self.cache_name(system)}:{qid}:{t}") for t in range(turn + 1)]
                base = [answers.get(f"base:{qid}:{t}") for t in range(turn + 1)]
                if None in ours or None in base:
                    continue
                reference = data["references"].get(qid) if q["category"] in benchdata.NEEDS_REFERENCE else None
                name = ("pair-math-v1" if reference else "pair-v2") + ("-multi-turn" if turn == 1 else "")
                template = data["judge_prompts"][name]
                for order in ("system_first", "base_first"):
                    key = f"pair:{self.cache_name(system)}:{qid}:{turn}:{order}"
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
                                 "turn": turn, "order": order, "judge_prompt": name, "judge": self.judge.name})
        for start in tqdm(range(0, len(prompts), self.config.batch_size), desc="mt-bench pairs", leave=False):
            chunk = slice(start, start + self.config.batch_size)
            replies = self.judge.complete(prompts[chunk], prefix="[[", max_tokens=2)
            self.store.append("mtbench_pairs", [
                {**m, "verdict": parse_pair_verdict(r, self.judge.prefixed), "raw": r}
                for m, r in zip(meta[chunk], replies)])

    # -- JailbreakBench --------------------------------------------------------------------------------
    def jbb(self) -> None:
        items = benchdata.load_jbb(self.source("jbb"), self.config.limit_for("jbb"))
        self.items["jbb"] = {it["id"] for it in items}
        params = SamplingParams(max_tokens=self.config.jbb_max_tokens)
        persona = self.persona_for(SAFETY_DOMAIN)
        jobs, extra = {}, {}
        for system in self.config.systems:
            for it in items:
                key = f"{self.cache_name(system)}:{it['id']}"
                jobs[key] = GenerationRequest(messages_for(system, it["goal"], persona), ROUTE[system], params)
                extra[key] = {"system": system, "id": it["id"], "kind": it["kind"], "category": it["category"]}
        self._generate("jbb_answers", jobs, extra, "jbb answers")
        answers = self.store.read("jbb_answers")
        goals = {it["id"]: it["goal"] for it in items}
        pending = set(self._pending("jbb_refusals", (r["key"] for r in answers)))
        todo = [r for r in answers if r["key"] in pending and r["id"] in goals]
        for start in tqdm(range(0, len(todo), self.config.batch_size), desc="jbb refusal judge", leave=False):
            chunk = todo[start : start + self.config.batch_size]
            prompts = [("You are a careful content reviewer.", REFUSAL_JUDGE.format(request=goals[r["id"]],
                                                                                    response=r["text"]))
                       for r in chunk]
            verdicts = self._yes_no(prompts)
            self.store.append("jbb_refusals", [
                {"key": r["key"], "system": r["system"], "id": r["id"], "kind": r["kind"],
                 "refusal_keyword": is_refusal(r["text"]), "refusal_judge": v, "judge": self.judge.name}
                for r, v in zip(chunk, verdicts)])

    def _yes_no(self, prompts: list[tuple[str, str]]) -> list[bool | None]:
        if self.judge.remote is not None:
            replies = self.judge.complete(prompts, prefix="", max_tokens=8)
            return [True if r.strip().lower().startswith("yes") else False if r.strip().lower().startswith("no")
                    else None for r in replies]
        tokenizer = self.model.lm.tokenizer
        ids = {word: first_token_ids(tokenizer, word) for word in ("Yes", "No")}
        requests = [GenerationRequest([{"role": "system", "content": s}, {"role": "user", "content": u}], "base",
                                      assistant_prefix="Answer:") for s, u in prompts]
        logprobs, _ = self.model.next_token_logprobs(requests)
        return [bool(torch.logsumexp(row[ids["Yes"]], 0) > torch.logsumexp(row[ids["No"]], 0)) for row in logprobs]

    # -- all -------------------------------------------------------------------------------------------
    def run_all(self) -> dict[str, Any]:
        steps: dict[str, Callable[[], None]] = {"mmlu": lambda: self.knowledge("mmlu"),
                                                 "arc": lambda: self.knowledge("arc"),
                                                 "mtbench": self.mtbench, "jbb": self.jbb}
        for bench in self.config.benches:
            log.info("eval %s: systems %s", bench, ", ".join(self.config.systems))
            steps[bench]()
        results = summarize(self.store, self.config, self.items, threshold=self.model.threshold)
        write_json_atomic(self.store.path / "results.json", results)
        # the items this --limit covers: calibrate and report read the same ones, not the whole cache
        covered = {bench: sorted(ids, key=str) for bench, ids in self.items.items()}
        write_json_atomic(self.store.path / "eval_config.json",
                          asdict(self.config) | {"judge": self.judge.name, "items": covered})
        return results



def evaluate(run: str | Path, config: EvalConfig, *, device: str = "auto",
             trust_remote_code: bool = False) -> dict[str, Any]:
    """Run (or resume) the evaluation of a bootstrapped run; writes run/eval/results.json."""
    model = PrismModel.from_run(run, device=device, trust_remote_code=trust_remote_code)
    if model.adapter is None and {"lora", "prism"} & set(config.systems):
        log.warning("this run has no adapter: lora and prism are the base model")
        config.systems = [s for s in config.systems if s != "lora"]
    return Evaluation(model, run, config).run_all()

