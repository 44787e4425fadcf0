"""What every benchmark of `prism eval` receives (`Evaluation`): the model, the config, the eval store with its
cached records, the judge, and the personas. A benchmark module is one `run(ev, bench)` over it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path

from tqdm.auto import tqdm

from prism.config import BootstrapConfig, with_new_defaults
from prism.evaluation import data as benchdata
from prism.evaluation.config import (
    MMLU_PERSONA_DOMAINS,
    MTBENCH_CPU_MAX_TOKENS,
    MTBENCH_PAPER_MAX_TOKENS,
    REFUSAL_BENCHES,
    ROUTE,
    ROUTING,
    SAFETY_DOMAIN,
    EvalConfig,
)
from prism.evaluation.judge import Judge, JudgePrompt
from prism.evaluation.metrics import prism_cache_name
from prism.inference.base import GenerationRequest, gate_prompt
from prism.inference.transformers import PrismModel
from prism.lm.batching import gate_features, length_sorted_batches
from prism.lm.decoding import SamplingParams
from prism.runs import EVAL_DIR, RunDir
from prism.stages import personas
from prism.stages.context import StageContext

log = logging.getLogger("prism")


def messages_for(system: str, user: str, persona: str | None, history: list[dict[str, str]] | None = None
                 ) -> list[dict[str, str]]:
    head = [{"role": "system", "content": persona}] if system == "persona" and persona else \
        [{"role": "system", "content": ""}] if system == "nosystem" else []
    return head + list(history or []) + [{"role": "user", "content": user}]


def run_personas(run: RunDir) -> dict[str, str]:
    """Domain (lower case) -> persona: the run's own, then those `prism eval` wrote for benchmark domains into
    RUN/eval/personas.jsonl (the run's own win)."""
    records = run.read("personas") + RunDir(run.path / EVAL_DIR).read("personas")
    return {r["domain"].lower(): r["persona"] for r in reversed(records)}


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
        """The system's name in cache keys: the rows of a gated system (`prism`, `kway`) depend on its gate's
        threshold, so theirs carry it and a new threshold never reuses rows routed under the old one."""
        if system in ROUTING:
            return prism_cache_name(self.model.gates[ROUTING[system]].config.threshold, system)
        return system

    def thresholds(self) -> dict[str, float]:
        """The threshold in force for each gated system evaluated."""
        return {s: self.model.gates[ROUTING[s]].config.threshold for s in self.config.systems if s in ROUTING}

    def requests(self, system: str, conversations: list[list[dict[str, str]]], params: SamplingParams | None = None,
                 assistant_prefix: str = "") -> list[GenerationRequest]:
        """The requests `system` answers `conversations` with: its route (and gate), or for `kway-lora` each
        conversation's most probable k-way adapter."""
        params = params or SamplingParams()
        if system == "kway-lora":
            return [GenerationRequest(m, "persona" if p else "base", params, assistant_prefix=assistant_prefix,
                                      persona=p) for m, p in zip(conversations, self.best_personas(conversations))]
        return [GenerationRequest(m, ROUTE[system], params, assistant_prefix=assistant_prefix,
                                  routing=ROUTING.get(system)) for m in conversations]

    def best_personas(self, conversations: list[list[dict[str, str]]]) -> list[str | None]:
        """The k-way gate's most probable adapter for each conversation, whatever its threshold."""
        gate = self.model.gates["kway"]
        features = gate_features(self.model.gate_lm, [gate_prompt(self.model.tokenizer, m) for m in conversations],
                                 gate.config.layer, gate.config.pool)
        return [gate.persona_of(c) for c in gate.best_adapter(features).tolist()]

    def source(self, bench: str) -> str | Path:
        return self.config.data.get(bench) or self.data_dir or benchdata.default_data_dir()

    # -- caching ---------------------------------------------------------------------------------------
    def pending(self, name: str, keys: Iterable[str]) -> list[str]:
        done = {r["key"] for r in self.store.read(name)}
        return [k for k in keys if k not in done]

    def generate(self, name: str, jobs: dict[str, GenerationRequest], extra: dict[str, dict], desc: str) -> None:
        """Generate the jobs not yet in `name`.jsonl, batch by batch, saving each batch at once."""
        pending = self.pending(name, jobs)
        keys_by_length = length_sorted_batches([len(str(jobs[k].messages)) for k in pending], self.config.batch_size)
        for batch in tqdm(keys_by_length, desc=desc, leave=False):
            keys = [pending[i] for i in batch]
            completions = self.model.generate_batch([jobs[k] for k in keys])
            self.store.append(name, [{"key": k, "text": c.text, "route": c.route,
                                      "gate_probability": c.gate_probability, "tokens": c.completion_tokens,
                                      **({"persona": c.persona} if c.persona else {}), **extra[k]}
                                     for k, c in zip(keys, completions)])

    def judge_in_chunks(self, name: str, prompts: list[JudgePrompt], meta: list[dict], desc: str,
                        grade: Callable[[list[JudgePrompt]], list[dict]]) -> None:
        """Judge `prompts` a batch at a time into `name`.jsonl: each record is its `meta` plus what `grade`
        made of its prompt, and each batch is saved at once."""
        size = self.config.batch_size
        for start in tqdm(range(0, len(prompts), size), desc=desc, leave=False):
            chunk = slice(start, start + size)
            self.store.append(name, [{**m, **g} for m, g in zip(meta[chunk], grade(prompts[chunk]))])

    # -- personas --------------------------------------------------------------------------------------
    def _personas(self) -> dict[str, str]:
        """Domain (lower case) -> persona: the run's own, plus personas the same stage writes for the domains of
        the benchmarks asked for that the bootstrap did not cover (saved in eval/personas.jsonl). Domains match
        case-insensitively, so MT-Bench's `stem` finds the distilled `STEM` persona."""
        benches = set(self.config.benches)
        wanted = {d.lower() for d in (*(benchdata.MT_BENCH_CATEGORIES if "mtbench" in benches else ()),
                                      *(MMLU_PERSONA_DOMAINS.values() if benches & {"mmlu", "arc"} else ()),
                                      *((SAFETY_DOMAIN,) if benches & set(REFUSAL_BENCHES) else ()))}

        known = run_personas(self.run)
        missing = sorted(wanted - set(known))
        if missing and "persona" in self.config.systems:
            log.info("writing personas for %d benchmark domains the run lacks", len(missing))
            base_config = self.run.manifest().get("config", {})
            # a config for the persona stage alone: the run's judge settings name the run's domains, not these
            config = BootstrapConfig(**{**with_new_defaults(base_config), "domains": missing, "personas_file": None,
                                        "judge": "pairwise", "verifier": None, "verifiers": {},
                                        "domain_personas": {}, "domain_examples": {}})
            with self.model.adapter.disable_adapter() if self.model.adapter is not None else nullcontext():
                personas.run(StageContext(run=self.store, config=config, lm=self.model.lm))
            known = run_personas(self.run)
        return known

    def persona_for(self, domain: str) -> str | None:
        return self.personas.get(domain.lower())
