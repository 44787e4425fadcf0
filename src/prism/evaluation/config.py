"""What `prism eval` runs: the systems, the benchmarks, and `EvalConfig` (its flags are generated from it).

Systems: `base` (no persona), `persona` (the matched expert persona as system prompt), `lora` (adapter
always on), `prism` (the gate decides); on a run bootstrapped with --routing kway also `kway` (the k-way
gate picks base or one persona's adapter) and `kway-lora` (always the k-way gate's most probable adapter, the
"always adapter" reference its threshold is calibrated against). All share the chat template and the
decoding settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from prism.config import DEFAULT_DEVICE, LOCAL_ENGINE, option
from prism.errors import PrismError
from prism.verifiers import check_spec

# nosystem: an explicit empty system message (base has none, so the chat template's default applies)
SYSTEMS = ("base", "nosystem", "persona", "lora", "prism", "kway", "kway-lora")
DEFAULT_SYSTEMS = ("base", "persona", "lora", "prism", "kway", "kway-lora")  # the k-way ones on k-way runs only
KWAY_SYSTEMS = ("kway", "kway-lora")
BENCHES = ("mmlu", "arc", "mtbench", "jbb", "harmbench", "pku", "verified")
REFUSAL_BENCHES = ("jbb", "harmbench", "pku")
BENCH_GROUPS = {"knowledge": ("mmlu", "arc"), "safety": REFUSAL_BENCHES, "all": ("mmlu", "arc", "mtbench", "jbb"),
                "paper": ("mtbench", "mmlu", "jbb", "harmbench", "pku")}
ROUTE = {"base": "base", "nosystem": "base", "persona": "base", "lora": "persona", "prism": "auto", "kway": "auto"}
ROUTING = {"prism": "binary", "kway": "kway"}  # which gate routes a gated system
GATED = {"prism": "lora", "kway": "kway-lora"}  # a gated system -> its "always adapter" reference
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


def parse_limit(text: str | None) -> int | dict[str, int] | None:
    """'8' (every benchmark) or 'mmlu=4,arc=100,mtbench=3,jbb=25' (per benchmark; unnamed ones: no limit)."""
    if not text:
        return None
    try:
        if "=" not in text:
            return int(text)
        return {name.strip(): int(value) for name, value in (part.split("=", 1) for part in text.split(","))}
    except ValueError:
        raise PrismError(f"--limit {text!r}: give a number, or name=number pairs like mmlu=4,arc=100") from None


def parse_data(text: str | None) -> dict[str, str]:
    """'mmlu=cais/mmlu,arc=allenai/ai2_arc' (per benchmark: a Hub dataset id or a local folder)."""
    if not text:
        return {}
    pairs = [part.split("=", 1) for part in text.split(",")]
    if any(len(pair) != 2 or not pair[1].strip() for pair in pairs):
        raise PrismError(f"--data {text!r}: give benchmark=source pairs like mmlu=cais/mmlu,jbb=./my_jbb "
                         "(a whole local folder goes to --data-dir)")
    return {name.strip(): value.strip() for name, value in pairs}


@dataclass
class EvalConfig:
    benches: list[str] = option("mmlu,arc,mtbench,jbb,harmbench,pku,verified (held-out queries of the run's domains, "
                                "scored by its verifiers), or knowledge (mmlu+arc), safety (jbb+harmbench+pku), all "
                                "(mmlu,arc,mtbench,jbb) or paper (mtbench,mmlu and the three safety sets)",
                                flag="--bench", default_factory=lambda: list(BENCH_GROUPS["all"]))
    systems: list[str] = option("which of base,nosystem,persona,lora,prism,kway,kway-lora (base is always added; "
                                "kway and kway-lora need a run bootstrapped with --routing kway)",
                                default_factory=lambda: list(DEFAULT_SYSTEMS))
    limit: int | dict[str, int] | None = option(
        "items per MMLU subject, per ARC split, per MT-Bench category, per JBB kind and per verified domain: one "
        "number, or per benchmark like mmlu=4,arc=100,mtbench=3,jbb=25 (default: everything; verified: the run's "
        "queries_per_persona)", parse=parse_limit,
        default=None)
    data_dir: str | None = option("benchmark data (mmlu/, arc/, mt_bench/, jbb/); default $PRISM_BENCHMARKS or "
                                  "../shared/benchmarks", default=None)
    data: dict[str, str] = option(
        "per benchmark, a Hugging Face dataset id (ID or ID:CONFIG) or a local folder, e.g. mmlu=cais/mmlu,"
        "arc=allenai/ai2_arc,jbb=JailbreakBench/JBB-Behaviors,mtbench=lighteval/mt-bench (MT-Bench judge prompts "
        "still come from --data-dir); harmbench and pku also take a local file in their published schema "
        "(harmbench_behaviors_text_all.csv; PKU-SafeRLHF rows with a prompt column); verified takes a JSONL file of "
        "{\"domain\", \"query\"} instead of generated held-out queries", parse=parse_data,
        default_factory=dict)
    scoring: str = option("multiple choice: the answer letter's log-likelihood, or each choice's length-normalized "
                          "log-likelihood (cloze)", choices=("letter", "cloze"), default="letter")
    arc_splits: list[str] = option("ARC splits", default_factory=lambda: ["easy", "challenge"])
    batch_size: int = option("requests generated or scored together", default=16)
    mtbench_max_tokens: int | None = option("MT-Bench answer cap (FastChat: 1024); default 1024 for a run "
                                            "bootstrapped with --preset paper, else 256", default=None)
    jbb_max_tokens: int = option("answer cap on the safety sets (JailbreakBench, HarmBench, PKU-SafeRLHF)", default=96)
    verified_max_tokens: int | None = option("answer cap on the verified benchmark (default: the run's "
                                             "answer_max_tokens, as its bootstrap answers had)", default=None)
    verifier: str | None = option("score the verified benchmark with this verifier in every domain instead of the "
                                  "run's own (max-words:N, json, ..., module:function)", default=None)
    judge_base_url: str | None = option("an OpenAI-compatible judge (default: the base model judges itself)",
                                        default=None)
    judge_model: str | None = option("the judge's model name on that server", default=None)
    judge_api_key: str | None = option("the judge server's API key", env="PRISM_JUDGE_API_KEY", default=None)

    def limit_for(self, bench: str) -> int | None:
        return self.limit.get(bench) if isinstance(self.limit, dict) else self.limit

    def __post_init__(self) -> None:
        self.benches = [b for name in self.benches for b in BENCH_GROUPS.get(name, (name,))]
        unknown = sorted(set(self.benches) - set(BENCHES)) + sorted(set(self.systems) - set(SYSTEMS))
        if unknown:
            raise PrismError(f"unknown benchmark or system {', '.join(unknown)}: benchmarks are "
                             f"{', '.join(BENCHES)} (or {', '.join(BENCH_GROUPS)}); systems are {', '.join(SYSTEMS)}")
        if self.scoring not in ("letter", "cloze"):
            raise PrismError(f"--scoring must be letter or cloze, got {self.scoring!r}")
        if self.judge_base_url and not self.judge_model:
            raise PrismError("--judge-base-url needs --judge-model (the judge's model name on that server)")
        if set(self.data) - set(BENCHES):
            raise PrismError(f"--data names unknown benchmarks {', '.join(sorted(set(self.data) - set(BENCHES)))}: "
                             f"use {', '.join(BENCHES)}")
        if isinstance(self.limit, dict) and set(self.limit) - set(BENCHES):
            raise PrismError(f"--limit names unknown benchmarks {', '.join(sorted(set(self.limit) - set(BENCHES)))}")
        unbundled = [b for b in ("harmbench", "pku") if b in self.benches and b not in self.data]
        if unbundled:
            raise PrismError(f"{', '.join(unbundled)} {'is' if len(unbundled) == 1 else 'are'} not bundled: pass "
                             "--data harmbench=harmbench_behaviors_text_all.csv,pku=PKU-Alignment/PKU-SafeRLHF "
                             "(a Hub id or a local file in the published schema)")
        if self.verifier is not None:
            check_spec(self.verifier)
        if "base" not in self.systems:
            self.systems.insert(0, "base")  # every comparison is against base


HARNESS_SYSTEMS = ("base", "persona", "lora", "prism")
HARNESS_BATCH = 16  # `prism lm-eval`: a route forced, or the gate's


@dataclass
class HarnessConfig:
    """`prism lm-eval`: which harness tasks, for which systems, and how."""

    tasks: list[str] = option("harness tasks: prism_mmlu, prism_arc (the project's, offline) or "
                              "any task the harness or --include-path defines",
                              default_factory=lambda: ["prism_arc"])
    systems: list[str] = option("base, persona, lora, prism",
                                default_factory=lambda: ["base", "persona", "lora", "prism"])
    include_path: str | None = option("a folder of the harness's task YAML files", default=None)
    limit: int | None = option("documents per task (default: all)", default=None)
    num_fewshot: int | None = option("few-shot examples (default: the task's own)", default=None)
    batch_size: int = option("requests per scoring batch (routes mixed in a batch)", default=HARNESS_BATCH)
    out: str | None = option("where lm_eval.json goes (default: RUN/eval)", default=None)
    data_dir: str | None = option("benchmark data of prism_mmlu and prism_arc (mmlu/, arc/); default "
                                  "$PRISM_BENCHMARKS or ../shared/benchmarks", default=None)
    engine: str = option("transformers (as prism eval scores) or llamacpp (the run's GGUF)", default=LOCAL_ENGINE,
                         choices=("transformers", "llamacpp"))
    persona_domain: str | None = option("system persona: the run's domain whose persona every task gets "
                                        "(default: the MMLU subject's domain, STEM for ARC)", default=None)

    def __post_init__(self) -> None:
        unknown = [s for s in self.systems if s not in HARNESS_SYSTEMS]
        if unknown or not self.systems:
            raise PrismError(f"--systems: unknown {', '.join(unknown) or '(none given)'}; choose from "
                             f"{', '.join(HARNESS_SYSTEMS)}")
        if not self.tasks:
            raise PrismError("--tasks is empty: name at least one task, e.g. --tasks prism_arc")
        for name in ("limit", "batch_size", "num_fewshot"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "num_fewshot" else 1):
                raise PrismError(f"--{name.replace('_', '-')} must be positive, got {value}")


@dataclass
class CompareConfig:
    """`prism compare OLD NEW`: the held-out prompts and how both runs answer them."""

    out: str | None = option("where the answers, verdicts and compare.json go (default: NEW/compare)", default=None)
    max_tokens: int = option("answer cap of both runs (greedy)", default=128)
    limit: int | None = option("at most this many prompts (default: all)", default=None)
    batch_size: int = option("prompts generated or judged together", default=16)
    device: str = option("'auto', 'cpu', 'cuda', ...", default=DEFAULT_DEVICE)

    def __post_init__(self) -> None:
        for name in ("max_tokens", "batch_size", "limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise PrismError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
