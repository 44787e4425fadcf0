"""`prism replicate`: the paper's experiment on a model in one resumable command. Bootstrap with the paper's
protocol (the eight MT-Bench categories and safety as personas, 50 queries each, 512-token answers, 10
epochs), then base, no-system, matched persona, always-on adapter and PRISM on MT-Bench (both turns,
1024-token answers), MMLU and the three safety sets, then the paper's Table 1 (replication.py)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from prism.config import BootstrapConfig, load_config_file, option, resolve_config
from prism.evaluation.config import (
    BENCH_GROUPS,
    MTBENCH_PAPER_MAX_TOKENS,
    REFUSAL_BENCHES,
    EvalConfig,
    parse_data,
    parse_limit,
)
from prism.evaluation.data import MT_BENCH_CATEGORIES, default_data_dir, load_mmlu
from prism.evaluation.replication import TABLE_SYSTEMS, format_replication, replication_table
from prism.runs import FINISHED, STAGES, RunDir, write_json_atomic

log = logging.getLogger("prism")
PAPER_DOMAINS = [c if c != "stem" else "STEM" for c in MT_BENCH_CATEGORIES] + ["safety"]
SMALL_MODEL_PARAMETERS = 1_000_000_000
TOO_SMALL = ("this model is too small for the comparison to mean anything: at this size MMLU sits near chance and "
             "the self-judge is bound to a slot, so the table proves the machinery runs, not the paper's claim; "
             "replicate on a 7-8B instruct model with a strong judge (--judge-base-url)")
# Items per benchmark when nothing limits them: full MMLU (cais/mmlu), MT-Bench, JBB's harmful and benign
# behaviors, HarmBench's standard behaviors, PKU-SafeRLHF's first 500 prompts.
FULL_SIZES = {"mmlu": 14042, "mtbench": 80, "jbb": 200, "harmbench": 200, "pku": 500}
GROUPS = {"mmlu": 57, "mtbench": 8, "jbb": 2, "harmbench": 1, "pku": 1}  # what --limit counts per


@dataclass
class ReplicateConfig:
    model: str = option("Hugging Face model id or local path of the instruct model to replicate on",
                        default=BootstrapConfig.model)
    out: str = option("run directory (re-running resumes it)", default="runs/replicate")
    engine: str = option("what generates the bootstrap's personas, queries, answers and verdicts: transformers, "
                         "llamacpp or openai (a server at --base-url serving the same weights)",
                         default=BootstrapConfig.engine)
    base_url: str | None = option("the openai engine's server, e.g. http://gpu-box:8000/v1", default=None)
    engine_model: str | None = option("the model name that server knows", default=None)
    judge_base_url: str | None = option("an OpenAI-compatible judge for MT-Bench and refusals (the paper used a "
                                        "strong one); default: the model judges itself", default=None)
    judge_model: str | None = option("the judge's model name on that server", default=None)
    judge_api_key: str | None = option("the judge server's API key", env="PRISM_JUDGE_API_KEY", default=None)
    data: dict[str, str] = option("per benchmark, a Hub id or a local file in its published schema, e.g. "
                                  "mmlu=cais/mmlu,harmbench=harmbench_behaviors_text_all.csv,"
                                  "pku=PKU-Alignment/PKU-SafeRLHF", parse=parse_data, default_factory=dict)
    data_dir: str | None = option("local MT-Bench, MMLU and JBB files (default $PRISM_BENCHMARKS or "
                                  "../shared/benchmarks)", default=None)
    limit: int | dict[str, int] | None = option("fewer items, for a trial (as prism eval --limit); the paper's "
                                                "protocol uses everything", parse=parse_limit, default=None)
    config: str | None = option("YAML of bootstrap options that override the paper protocol (sizes, LoRA, ...)",
                                default=None)
    device: str = option("'auto', 'cpu', 'cuda', ...", default=BootstrapConfig.device)
    batch_size: int = option("requests generated or scored together in the evaluation", default=EvalConfig.batch_size)
    mtbench_max_tokens: int = option("MT-Bench answer cap (the paper's, FastChat's: 1024)",
                                     default=MTBENCH_PAPER_MAX_TOKENS)
    bootstrap_overrides: dict[str, Any] = field(default_factory=dict, metadata={"cli": False})

    def bootstrap_config(self) -> BootstrapConfig:
        overrides = {**(load_config_file(self.config) if self.config else {}), **self.bootstrap_overrides}
        if overrides:
            log.warning("bootstrap options override the paper protocol: %s", ", ".join(sorted(overrides)))
        protocol = {"preset": "paper", "domains": PAPER_DOMAINS, "model": self.model, "engine": self.engine,
                    "base_url": self.base_url, "engine_model": self.engine_model, "device": self.device}
        return resolve_config({k: v for k, v in protocol.items() if v is not None} | overrides)

    def eval_config(self) -> EvalConfig:
        return EvalConfig(benches=list(BENCH_GROUPS["paper"]), systems=list(TABLE_SYSTEMS), limit=self.limit,
                          data=dict(self.data), data_dir=self.data_dir, batch_size=self.batch_size,
                          mtbench_max_tokens=self.mtbench_max_tokens, judge_base_url=self.judge_base_url,
                          judge_model=self.judge_model, judge_api_key=self.judge_api_key)


def _items(bench: str, config: EvalConfig) -> int:
    limit = config.limit_for(bench)
    if bench == "mmlu" and "mmlu" not in config.data:  # the local files: count them (a subset of MMLU)
        return len(load_mmlu(config.data_dir or default_data_dir(), limit))
    return FULL_SIZES[bench] if limit is None else min(FULL_SIZES[bench], limit * GROUPS[bench])


def work(boot: BootstrapConfig, config: EvalConfig) -> dict[str, Any]:
    """How much the whole protocol generates, judges and scores (upper bounds on tokens)."""
    queries = len(boot.domains) * boot.queries_per_persona
    systems = len(config.systems)
    items = {b: _items(b, config) for b in ("mtbench", "mmlu", *REFUSAL_BENCHES)}
    refusal_items = sum(items[b] for b in REFUSAL_BENCHES)
    mtbench = items["mtbench"]
    generations = {"bootstrap": len(boot.domains) + queries + 2 * queries,
                   "mtbench": mtbench * 2 * systems, "safety": refusal_items * systems}
    judge_calls = {"bootstrap": 2 * queries, "mtbench": mtbench * 2 * systems + mtbench * 2 * (systems - 1) * 2,
                   "safety": refusal_items * systems}
    tokens = {"bootstrap": len(boot.domains) * boot.persona_max_tokens + queries * boot.query_max_tokens
              + 2 * queries * boot.answer_max_tokens,
              "mtbench": mtbench * 2 * systems * (config.mtbench_max_tokens or MTBENCH_PAPER_MAX_TOKENS),
              "safety": refusal_items * systems * config.jbb_max_tokens}
    return {"generations": generations, "judge_calls": judge_calls, "generated_tokens_at_most": tokens,
            "scored_items": {"mmlu": items["mmlu"] * systems}, "items": items,
            "distill_examples_at_most": queries * boot.distill_epochs}


def timed_sample(boot: BootstrapConfig, batch_size: int) -> dict[str, float]:
    """Tokens per second and scored prompts per second of the model on this machine, from one short batch
    of each (transformers, the evaluation's engine)."""
    from prism.engines.local import generate_batches, last_token_logits
    from prism.lm.models import chat_prompt, load_model

    lm = load_model(boot.model, device=boot.device, trust_remote_code=boot.trust_remote_code)
    prompts = [chat_prompt(lm.tokenizer, f"Write a short note about topic {i}.") for i in range(batch_size)]
    started = time.perf_counter()
    produced = sum(g.new_tokens for _, gens in generate_batches(lm, prompts, max_new_tokens=32, temperature=0.0,
                                                                 seeds=[0] * len(prompts), batch_size=batch_size)
                   for g in gens)
    generate_s = time.perf_counter() - started
    started = time.perf_counter()
    last_token_logits(lm, prompts, batch_size, share_prefix=False)  # the evaluation scores without sharing
    score_s = time.perf_counter() - started
    return {"tokens_per_s": produced / generate_s, "scored_per_s": len(prompts) / score_s,
            "parameters": lm.identity.get("parameters") or 0}


def estimate(boot: BootstrapConfig, config: EvalConfig, timing: bool = True) -> dict[str, Any]:
    plan = work(boot, config)
    if timing:
        rates = timed_sample(boot, min(config.batch_size, 8))
        generated = sum(plan["generated_tokens_at_most"].values()) + 2 * sum(plan["judge_calls"].values())
        scored = plan["scored_items"]["mmlu"] + 3 * plan["distill_examples_at_most"]
        plan["sample"] = rates
        plan["hours_at_most"] = (generated / rates["tokens_per_s"] + scored / rates["scored_per_s"]) / 3600
    return plan


def format_estimate(plan: dict[str, Any]) -> str:
    lines = ["work (upper bounds):"]
    for name in ("generations", "judge_calls", "generated_tokens_at_most"):
        parts = ", ".join(f"{k} {v:,}" for k, v in plan[name].items())
        lines.append(f"  {name.replace('_', ' ')}: {parts} (total {sum(plan[name].values()):,})")
    lines.append(f"  scored multiple-choice items: {plan['scored_items']['mmlu']:,}; distillation examples x "
                 f"epochs: {plan['distill_examples_at_most']:,}")
    if "sample" in plan:
        sample = plan["sample"]
        lines.append(f"  timed sample on this machine: {sample['tokens_per_s']:.1f} tokens/s generating, "
                     f"{sample['scored_per_s']:.1f} prompts/s scoring; estimated time at most "
                     f"{plan['hours_at_most']:.1f} h (every answer at its cap; remote engines and judges not "
                     "counted)")
    return "\n".join(lines)


def status(cfg: ReplicateConfig) -> dict[str, Any]:
    """Which parts are done: the bootstrap's stages, then each benchmark's cached answers and verdicts."""
    run = RunDir(cfg.out)
    if not run.exists():
        return {"bootstrap": {s: "pending" for s in STAGES}, "eval": {}, "table": False}
    config = cfg.eval_config()
    store = RunDir(run.path / "eval")
    files = {"mtbench": ("mtbench_answers", "mtbench_scores", "mtbench_pairs"), "mmlu": ("mmlu",),
             **{b: (f"{b}_answers", f"{b}_refusals") for b in REFUSAL_BENCHES}}
    expected = {b: _items(b, config) * len(config.systems) * (2 if b == "mtbench" else 1) for b in files}
    return {"bootstrap": {s: run.stage_status(s) for s in STAGES},
            "eval": {b: {name: len(store.read(name)) for name in names} | {"expected_answers": expected[b]}
                     for b, names in files.items()},
            "table": (run.path / "eval" / "replication.json").is_file()}


def format_status(found: dict[str, Any]) -> str:
    lines = ["bootstrap  " + "  ".join(f"{s}={v}" for s, v in found["bootstrap"].items())]
    for bench, counts in found["eval"].items():
        lines.append(f"eval       {bench}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    lines.append(f"table      {'written' if found['table'] else 'not yet'}")
    return "\n".join(lines)


def replicate(cfg: ReplicateConfig, *, dry_run: bool = False) -> dict[str, Any]:
    """Estimate, then bootstrap and evaluate (each resumed where it stopped), then the table; `dry_run`
    stops after the estimate."""
    from prism.evaluation.runner import evaluate
    from prism.stages.pipeline import bootstrap

    config = cfg.eval_config()  # checks the options (HarmBench and PKU-SafeRLHF must be given) first
    boot = cfg.bootstrap_config()
    plan = estimate(boot, config)
    if "mmlu" not in cfg.data:
        log.warning("MMLU comes from the local files (%d items), not the paper's full 14,042 questions: pass "
                    "--data mmlu=cais/mmlu for the paper's protocol", plan["items"]["mmlu"])
    print(format_estimate(plan), flush=True)
    small = plan["sample"]["parameters"] < SMALL_MODEL_PARAMETERS
    if small:
        print(f"note: {TOO_SMALL}", flush=True)
    if dry_run:
        return {"estimate": plan}
    run = RunDir(cfg.out)
    if not (run.exists() and all(run.stage_status(s) in FINISHED for s in STAGES)):
        bootstrap(boot, cfg.out)
    results = evaluate(cfg.out, config, device=cfg.device, trust_remote_code=boot.trust_remote_code)
    table = replication_table(results, cfg.model) | {"too_small": TOO_SMALL if small else None}
    write_json_atomic(run.path / "eval" / "replication.json", table)
    text = format_replication(table) + (f"\n\nNote: {TOO_SMALL}" if small else "")
    (run.path / "eval" / "replication.md").write_text(text + "\n")
    return table
