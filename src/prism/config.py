"""Bootstrap configuration: one dataclass, three presets, and the merge order preset < file < flags."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from prism.errors import PrismError
from prism.verifiers import check_spec, verifier_specs

# The eight MT-Bench categories, safety, and one plain factual-recall domain so the gate also sees
# queries where a persona is not expected to help.
DEFAULT_DOMAINS = [
    "writing",
    "roleplay",
    "reasoning",
    "math",
    "coding",
    "extraction",
    "STEM",
    "humanities",
    "safety",
    "factual recall (short knowledge questions)",
]

PRESETS: dict[str, dict[str, Any]] = {
    # A smoke run of a few minutes on 2 CPU cores with the embedded 135M model.
    "tiny": {
        "queries_per_persona": 4,
        "query_max_tokens": 40,
        "answer_max_tokens": 64,
        "distill_epochs": 4,
        "distill_batch_size": 2,
    },
    # The CPU default: enough data for a meaningful adapter within ~20 minutes on 2 cores.
    "small": {
        "queries_per_persona": 12,
        "query_max_tokens": 48,
        "answer_max_tokens": 160,
        "distill_epochs": 3,
        "distill_batch_size": 8,
    },
    # The paper's sizes.
    "paper": {
        "queries_per_persona": 50,
        "query_max_tokens": 200,
        "answer_max_tokens": 512,
        "distill_epochs": 10,
        "distill_batch_size": 16,
    },
}
DEFAULT_PRESET = "small"

# Fields that change how a run is executed but not what it computes (a run may be resumed with
# another engine: the manifest records which engine made each stage).
RUNTIME_FIELDS = {"device", "threads", "engine", "gguf", "gguf_weights", "base_url", "engine_model",
                  "engine_concurrency", "engine_timeout", "engine_max_retries", "distill_gradient_checkpointing"}
ENGINES = ("transformers", "llamacpp", "openai")
GGUF_WEIGHTS = ("auto", "as-is", "q8_0", "f16")  # what llama.cpp decodes with (prism.lm.llama_weights)
DEFAULT_GGUF_WEIGHTS = GGUF_WEIGHTS[0]
GGUF_WEIGHTS_HELP = ("the weights llama.cpp decodes with: as-is (the GGUF's own), q8_0 or f16 (re-encoded once by "
                     "llama.cpp's quantizer, cached); auto: q8_0 when several sequences decode at once on a CPU and "
                     "the GGUF's type has no batched kernel there (Q4_1, the embedded model's)")
DEFAULT_DEVICE = "auto"  # torch's device: CUDA when there is one, else the CPU
DEFAULT_SEED = 0
LOCAL_ENGINE = "transformers"  # the model in this process, on PyTorch
ROUTINGS = ("binary", "kway")
GATE_POOLS = ("last", "mean")  # the gate feature's pooling over the prompt's tokens
GATE_DEPTH_SHARE_INVERSE = 15  # the default gate block: 1/15 of the depth (2 of 30: measured, docs/results.md)
GATE_CLASSIFIERS = ("auto", "logistic", "mlp", "knn", "domain")
GATE_LABELS = ("persona", "adapter")  # what the gate learns from: the teacher's verdicts, or the adapter's own
# Fields that decide only the gate and distill stages: a run may change them and keep its earlier stages.
ROUTING_FIELDS = {"routing", "kway_min_wins"}
JUDGES = ("pairwise", "pointwise", "verifier")
QUERY_SOURCES = ("real", "synthetic")
# Fields that decide only the verify stage and what follows it: a run may change them and keep its personas,
# queries and answers (the verdicts, labels, gate and adapters are made again).
JUDGE_FIELDS = {"judge", "verifier", "verifiers", "pointwise_margin", "judge_calibration", "judge_max_chars",
                "distill_min_win_rate"}
# Fields that decide only the gate stage (gate_layer also the adapters, which train above it): a run may change
# them and keep everything up to its labels.
GATE_FIELDS = {"gate_layer", "gate_pool", "gate_classifier", "gate_hidden", "gate_dropout", "gate_lr", "gate_epochs",
               "gate_folds", "gate_prior_strength", "gate_labels"}
# Input files: a run's identity holds their content, not their path (a moved run resumes).
CONTENT_FIELDS = {"personas_file", "examples_file", "queries_file", "negatives"}
# What a run made before a field existed did, where today's default does something else: a run that records no
# gate_labels learnt its gate from the teacher's verdicts; one that records no query_top_p sampled its queries
# without a nucleus.
BEFORE_THE_FIELD = {"gate_labels": "persona", "query_top_p": 1.0}
# Fields that matter to a run only under one setting of another field: outside it they are not its identity.
CONDITIONAL_FIELDS = {"kway_min_wins": ("routing", "kway"), "verifier": ("judge", "verifier"),
                      "verifiers": ("judge", "verifier"), "pointwise_margin": ("judge", "pointwise"),
                      "judge_calibration": ("judge", "pairwise")}


def default_data_dir() -> Path:
    """$PRISM_BENCHMARKS, else the project's shared offline copy when it is there."""
    candidates = [os.environ.get("PRISM_BENCHMARKS"), "../shared/benchmarks", "shared/benchmarks"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    raise PrismError("no benchmark data found: pass --data-dir DIR (with mmlu/, arc/, mt_bench/, jbb/ inside) "
                     "or set PRISM_BENCHMARKS")


def persona_slug(domain: str) -> str:
    """A domain's name as k-way routing uses it: adapter names, directories and `prism-persona-<slug>` models."""
    return re.sub(r"[^a-z0-9]+", "-", domain.lower()).strip("-") or "domain"


def option(help: str, *, flag: str | None = None, parse: Callable[[str], Any] | None = None,
           choices: Sequence[str] | None = None, env: str | None = None, cli: bool = True, **kwargs: Any) -> Any:
    """A config field and what its command-line flag needs: the help text and, when they are not the
    default ones, the flag's name, a parser of its text, its choices, or an environment variable that gives
    the flag's default (`cli=False`: no flag, the field is set from a config file or Python). The CLI
    generates every flag of a config from these, so defaults live here only."""
    metadata = {"help": help, "flag": flag, "parse": parse, "choices": choices, "env": env,
                "cli": None if cli else False}
    return field(metadata={k: v for k, v in metadata.items() if v is not None}, **kwargs)


@dataclass
class BootstrapConfig:
    model: str = option("Hugging Face model id or local path; 'embedded' = SmolLM2-135M-Instruct", default="embedded")
    domains: list[str] = option("domain names, one persona each", default_factory=lambda: list(DEFAULT_DOMAINS))
    personas_file: str | None = option("user-written personas (JSON/JSONL/YAML) instead of generated ones",
                                       flag="--personas", default=None)
    preset: str = option("size preset: tiny, small or paper", default=DEFAULT_PRESET)
    seed: int = option("seed for every sampled step", default=DEFAULT_SEED)
    trust_remote_code: bool = option("allow model code from the Hub (off unless you trust the model)", default=False)

    persona_max_tokens: int = option("max new tokens for a generated persona", default=120)
    persona_attempts: int = option("tries per domain before a template persona is used", default=3)
    queries_per_persona: int = option("queries kept per persona", default=12)
    query_max_tokens: int = option("max new tokens per generated query", default=48)
    query_temperature: float = option("sampling temperature for queries", default=0.9)
    # Nucleus sampling's usual 0.9 (Holtzman et al. 2020) cuts the tail where a small model's queries turn into
    # non-words ("manderwelter"); self-instruct's 0.5 made the embedded model copy its examples (docs/results.md).
    query_top_p: float = option("nucleus sampling mass for queries (1: off)", default=0.9)
    query_min_chars: int = option("queries of this many characters or fewer are dropped", default=15)
    domain_personas: dict[str, str] = option(
        "persona text per domain, from a config file (domains: {name: {persona: ...}}); a domain it does not name gets "
        "a generated persona", cli=False, default_factory=dict)
    domain_examples: dict[str, list[str]] = option(
        "a few example queries per domain, from a config file (domains: {name: {examples: [...]}}) or Python: shown "
        "to the model when it writes queries, never used as queries themselves", cli=False, default_factory=dict)
    examples_file: str | None = option("example queries per domain (JSONL of {\"domain\", \"query\"}), added to "
                                       "domain_examples", flag="--examples", default=None)
    query_examples_shown: int = option("example queries shown in each query-writing prompt (drawn per query)",
                                       default=3)
    queries_file: str | None = option("real queries to use (JSONL of {\"query\", \"domain\"}, e.g. `prism discover`'s "
                                      "queries.jsonl): up to --queries-per-persona of each domain, in file order",
                                      flag="--queries", default=None)
    queries_mix: list[str] | None = option("real (the --queries file's only), synthetic (generated only) or "
                                           "real,synthetic (both); default real with --queries, else synthetic",
                                           default=None)
    query_dedup_rouge_l: float = option("drop a query whose ROUGE-L F1 with a kept one reaches this", default=0.7)
    query_rounds: int = option("generation rounds to reach queries_per_persona", default=4)
    answer_max_tokens: int = option("max new tokens per answer", default=160)
    answer_temperature: float = option("sampling temperature for answers", default=0.7)
    judge_max_chars: int = option("answers are truncated to this many characters for the judge", default=1500)
    judge: str = option(
        "how verify decides whether the persona answer is the better one: 'pairwise' (the paper's: both answers in "
        "one prompt, judged in both orders), 'pointwise' (each answer rated 1-10 alone, scored by the expected "
        "rating under the judge's token probabilities) or 'verifier' (code decides: --verifier)",
        choices=JUDGES, default="pairwise")
    verifier: str | None = option(
        "with --judge verifier, the check every domain's answers get: max-words:N, min-words:N, json, "
        "numbered-steps:N, refusal, regex:PATTERN, or module:function (path/file.py:function) for your own "
        "(domain, query, answer) -> float | bool; the persona wins when its answer scores higher", default=None)
    verifiers: dict[str, str] = option("per-domain verifier specs, from a config file (verifiers: {domain: spec}); "
                                       "a domain it does not name gets --verifier", cli=False, default_factory=dict)
    pointwise_margin: float = option("with --judge pointwise, the persona wins when its expected rating beats the "
                                     "plain answer's by more than this (ratings 1-10)", default=0.5)
    judge_calibration: str = option(
        "pairwise judge: 'position' divides out the judge's average preference for slot A/B before deciding; 'none'",
        default="position",
    )
    label_samples: int = option("K: answers per side per query, each pair judged; a query's label is its persona "
                                "win rate over the K pairs (ties count half)", default=1)
    distill_min_win_rate: float = option("a query's persona answer is distilled when its win rate reaches this (with "
                                         "K=1: a win)", default=0.75)
    batch_size: int = option("prompts per generation / scoring batch", default=32)

    routing: str = option(
        "'binary' (the paper's: one adapter for every persona that won, a gate between base and it) or 'kway' "
        "(also one adapter per persona with enough wins and a gate over base and each of them)",
        choices=ROUTINGS, default="binary")
    kway_min_wins: int = option("k-way: a persona needs this many both-order wins for its own adapter; a domain "
                                "with fewer routes to base", default=4)

    gate_layer: int | None = option(
        "the decoder block whose hidden states the gate reads; the adapter trains only on the blocks above it, so "
        "the prefill up to it is shared by both routes (default: the block at 1/15 of the depth, block 2 of the "
        "embedded 30-block model: the best of blocks 0-8 measured on its known-answer runs)", default=None)
    gate_pool: str = option("the gate's pooling of that block's states: 'mean' over the prompt from the user turn "
                            "on, or the 'last' prompt token (the paper's)", choices=GATE_POOLS, default="mean")
    gate_classifier: str = option(
        "the gate's classifier: 'auto' (chosen by cross-validation among L2 logistic regression, k nearest "
        "neighbours, the MLP and the domain gate: a probe of the query's domain weighing each domain's mean label) "
        "or one of them", choices=GATE_CLASSIFIERS, default="auto")
    gate_labels: str = option(
        "what the gate learns from: 'adapter' (after distill, the adapter answers every query itself and the judge "
        "compares that answer with the plain one: the gate learns where the adapter it routes to helps and where "
        "it hurts) or 'persona' (the teacher's verdicts, persona prompt against plain: the paper's; no extra "
        "generation)", choices=GATE_LABELS, default="adapter")
    gate_hidden: int = option("gate MLP hidden size", default=256)
    gate_dropout: float = option("gate MLP dropout", default=0.1)
    gate_lr: float = option("gate learning rate (AdamW)", default=1e-3)
    gate_epochs: int = option("gate training epochs", default=30)
    gate_folds: int = option("k of the gate's outer cross-validation (its held-out scores and threshold)", default=5)
    negatives: str | None = option(
        "clean negatives for the gate: questions with gold answers (mmlu: the shipped MMLU dev split, or a JSONL of "
        "{question, choices, answer}) answered with and without a persona; where the persona does not raise "
        "correctness, the question is a base example", default=None)
    negatives_count: int = option("gold questions scored for --negatives", default=40)
    gate_prior_strength: float = option(
        "the gate learns each query's persona win rate shrunk toward its domain's: (K * rate + m * domain rate) / "
        "(K + m), m this strength (0: the query's own rate)", default=2.0)

    lora_r: int = option("LoRA rank", default=16)
    lora_alpha: int = option("LoRA alpha", default=32)
    lora_dropout: float = option("LoRA dropout", default=0.05)
    lora_target_modules: list[str] = option(
        "projections that get LoRA (layers 1..N-1 only)",
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    distill_top_k: int = option("teacher logits kept per position", default=64)
    distill_temperature: float = option("distillation temperature T (loss is scaled by T^2)", default=2.0)
    distill_lr: float = option("adapter learning rate (AdamW)", default=2e-4)
    distill_weight_decay: float = option("AdamW weight decay", default=0.01)
    distill_warmup_ratio: float = option("share of steps with linear warmup", default=0.1)
    distill_epochs: int = option("distillation epochs", default=3)
    distill_batch_size: int = option("effective batch size (gradient accumulation)", default=8)
    distill_micro_batch_size: int = option("sequences per forward pass", default=4)
    distill_max_length: int = option("max tokens per training sequence", default=1024)
    distill_grad_clip: float = option("gradient norm clip", default=1.0)
    distill_gradient_checkpointing: str = option(
        "recompute activations in the backward pass: 'on', 'off', or 'auto' (on when a CUDA device's free memory "
        "looks short for the micro-batch's activations)", default="auto")

    device: str = option("'auto', 'cpu', 'cuda', ...", default=DEFAULT_DEVICE)
    threads: int = option("torch CPU threads (0 = torch's default)", default=0)

    engine: str = option("what runs the personas, queries, answers and verify stages: 'transformers' (this "
                        "process, batched), 'llamacpp' (this process, llama.cpp on the model's GGUF, --batch-size "
                        "prompts at once) or 'openai' (an OpenAI-compatible server at --base-url); gate and distill "
                        "always load the model here", default=LOCAL_ENGINE)
    gguf: str | None = option("the llamacpp engine's GGUF of --model (default: the embedded model's own file)",
                             default=None)
    gguf_weights: str = option(f"the llamacpp engine: {GGUF_WEIGHTS_HELP}", choices=GGUF_WEIGHTS,
                              default=DEFAULT_GGUF_WEIGHTS)
    base_url: str | None = option("the openai engine's server, e.g. http://localhost:8000/v1", default=None)
    engine_model: str | None = option("the model name the openai engine's server knows (serving --model)",
                                     default=None)
    engine_concurrency: int = option("requests in flight at once with the openai engine", default=8)
    engine_timeout: float = option("seconds before an openai engine request is retried", default=120.0)
    engine_max_retries: int = option("retries (exponential backoff) on 429/5xx/timeouts/dropped connections",
                                    default=8)

    def __post_init__(self) -> None:
        split_list_fields(self)
        self.validate()

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise PrismError(f"unknown preset {self.preset!r}: choose one of {', '.join(PRESETS)}")
        self.domains = [d.strip() for d in self.domains if d and d.strip()]
        if not self.domains and not self.personas_file:
            raise PrismError("the domain list is empty: pass --domains 'writing,safety,...' or --personas FILE")
        if len({d.lower() for d in self.domains}) != len(self.domains):
            raise PrismError(f"duplicate domain names in {self.domains}: each domain gets one persona")
        if self.distill_gradient_checkpointing not in ("auto", "on", "off"):
            raise PrismError("--distill-gradient-checkpointing must be auto, on or off, got "
                             f"{self.distill_gradient_checkpointing!r}")
        if self.engine not in ENGINES:
            raise PrismError(f"unknown engine {self.engine!r}: choose one of {', '.join(ENGINES)}")
        if self.gguf_weights not in GGUF_WEIGHTS:
            raise PrismError(f"--gguf-weights must be one of {', '.join(GGUF_WEIGHTS)}, got {self.gguf_weights!r}")
        if self.engine == "openai" and not (self.base_url and self.engine_model):
            raise PrismError("--engine openai needs --base-url (e.g. http://localhost:8000/v1) and --engine-model "
                             "(the model name that server serves: the same weights as --model)")
        if self.routing not in ROUTINGS:
            raise PrismError(f"unknown routing {self.routing!r}: choose one of {', '.join(ROUTINGS)}")
        if self.gate_pool not in GATE_POOLS:
            raise PrismError(f"unknown gate_pool {self.gate_pool!r}: choose one of {', '.join(GATE_POOLS)}")
        if self.gate_labels not in GATE_LABELS:
            raise PrismError(f"unknown gate_labels {self.gate_labels!r}: choose one of {', '.join(GATE_LABELS)}")
        if self.gate_classifier not in GATE_CLASSIFIERS:
            raise PrismError(f"unknown gate_classifier {self.gate_classifier!r}: choose one of "
                             f"{', '.join(GATE_CLASSIFIERS)}")
        if self.gate_classifier == "domain" and len(self.domains) == 1 and not self.negatives:
            raise PrismError("--gate-classifier domain tells the run's domains apart, and this run has one domain: "
                             "add a domain or --negatives, or use auto, logistic, knn or mlp")
        slugs = [persona_slug(d) for d in self.domains]
        if self.routing == "kway" and len(set(slugs)) != len(slugs):
            raise PrismError(f"--routing kway names each adapter after its domain, and {self.domains} give the same "
                             f"name twice ({', '.join(slugs)}): rename a domain")
        self._validate_judge()
        self._validate_queries()
        if self.judge_calibration not in ("position", "none"):
            raise PrismError(f"judge_calibration must be 'position' or 'none', not {self.judge_calibration!r}")
        self._validate_domain_extras()
        if not 0.0 < self.distill_min_win_rate <= 1.0:
            raise PrismError(f"distill_min_win_rate is a share of wins: pass a value in (0, 1], got "
                             f"{self.distill_min_win_rate}")
        if self.gate_layer is not None and self.gate_layer < 0:
            raise PrismError(f"gate_layer is a decoder block, 0 or more; got {self.gate_layer} (omit it for the "
                             "default, the block at 1/15 of the model's depth)")
        if not 0.0 < self.query_top_p <= 1.0:
            raise PrismError(f"query_top_p is a probability mass: pass a value in (0, 1] (1 turns nucleus sampling "
                             f"off), got {self.query_top_p}")
        if self.gate_prior_strength < 0:
            raise PrismError(f"gate_prior_strength must not be negative, got {self.gate_prior_strength}")
        for name in ("queries_per_persona", "answer_max_tokens", "batch_size", "distill_epochs", "distill_batch_size",
                     "distill_micro_batch_size", "lora_r", "gate_epochs", "persona_attempts", "query_rounds",
                     "engine_concurrency", "kway_min_wins", "label_samples", "query_examples_shown",
                     "negatives_count"):
            if getattr(self, name) < 1:
                raise PrismError(f"{name} must be at least 1, got {getattr(self, name)}")

    def _validate_domain_extras(self) -> None:
        for name, kind in (("domain_personas", str), ("domain_examples", list)):
            mapping = getattr(self, name)
            if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, kind)
                                                        for k, v in mapping.items()):
                what = "persona texts" if kind is str else "lists of queries"
                raise PrismError(f"{name} must map domain names to {what}, got {mapping!r}")
        self.domain_examples = {domain: [str(q).strip() for q in queries if str(q).strip()]
                                for domain, queries in self.domain_examples.items()}
        if not self.personas_file:
            self._check_named_domains([*self.domain_personas, *self.domain_examples], "personas or examples")

    def _check_named_domains(self, named: list[str], what: str) -> None:
        """A per-domain setting may name only the run's domains (case-insensitive)."""
        unknown = sorted({d.lower() for d in named} - {d.lower() for d in self.domains})
        if unknown:
            raise PrismError(f"{what} name domains the run does not have: {', '.join(unknown)} "
                             f"(domains: {', '.join(self.domains)})")

    def query_sources(self) -> list[str]:
        """Where the queries stage takes queries from: "real" (the --queries file) and/or "synthetic"."""
        return self.queries_mix or (["real"] if self.queries_file else ["synthetic"])

    def _validate_queries(self) -> None:
        mix = self.queries_mix
        if mix is not None:
            self.queries_mix = mix = [m.strip() for m in mix if m and m.strip()]
            wrong = [m for m in mix if m not in QUERY_SOURCES]
            if wrong or not mix:
                raise PrismError(f"--queries-mix takes real, synthetic or real,synthetic, got {','.join(mix)!r}")
        if "real" in self.query_sources() and not self.queries_file:
            raise PrismError("--queries-mix real needs the queries: --queries FILE (e.g. `prism discover`'s "
                             "queries.jsonl)")
        if self.queries_file and "real" not in self.query_sources():
            raise PrismError("--queries is given but --queries-mix leaves real queries out: add real to it")

    def _validate_judge(self) -> None:
        if self.judge not in JUDGES:
            raise PrismError(f"unknown judge {self.judge!r}: choose one of {', '.join(JUDGES)}")
        if not isinstance(self.verifiers, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                           for k, v in self.verifiers.items()):
            raise PrismError(f"verifiers must map domain names to verifier specs, got {self.verifiers!r}")
        for spec in [self.verifier, *self.verifiers.values()]:
            if spec is not None:
                check_spec(spec)
        if self.pointwise_margin < 0:
            raise PrismError(f"pointwise_margin must not be negative, got {self.pointwise_margin}")
        if self.judge != "verifier":
            if self.verifier or self.verifiers:
                raise PrismError(f"a verifier is given but the judge is {self.judge!r}: add --judge verifier")
            return
        if not self.verifier and not self.verifiers:
            raise PrismError("--judge verifier needs a check: --verifier SPEC (e.g. max-words:25), or a per-domain "
                             "mapping in the config file (verifiers: {domain: spec})")
        if not self.personas_file:  # with a personas file the domains are known once it is read
            self._check_named_domains(list(self.verifiers), "verifiers")
            verifier_specs(self.domains, self.verifier, self.verifiers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The fields that decide what a run computes (see `identity_of`)."""
        return identity_of(self.to_dict())

    def gate_layer_of(self, num_layers: int) -> int:
        """The gate's block in a model of `num_layers` blocks: `gate_layer`, or the block at 1/15 of the depth."""
        return self.gate_layer if self.gate_layer is not None else round(num_layers / GATE_DEPTH_SHARE_INVERSE)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


def split_list_fields(config: Any) -> None:
    """Every list field of a config takes a list or a comma-separated string (`queries_mix: real` in a YAML file,
    `--queries-mix real,synthetic` on the command line, a string from Python), never a string's letters."""
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if isinstance(value, str) and _is_list_type(item.type):
            setattr(config, item.name, [part.strip() for part in value.split(",") if part.strip()])


def _is_list_type(hint: Any) -> bool:
    return (hint if isinstance(hint, str) else repr(hint)).startswith("list[")


FIELD_NAMES = [f.name for f in dataclasses.fields(BootstrapConfig)]
Config = TypeVar("Config")


def with_options(config_class: type[Config], config: Config | None = None, **options: Any) -> Config:
    """`config` (default: the class's own defaults) with `options` set, each a field of `config_class`: what the
    Python API's keyword arguments mean where a function takes a config."""
    known = {f.name for f in dataclasses.fields(config_class)}  # type: ignore[arg-type]
    unknown = sorted(set(options) - known)
    if unknown:
        raise PrismError(f"unknown {config_class.__name__} option(s) {', '.join(unknown)}; valid: "
                         f"{', '.join(sorted(known))}")
    return dataclasses.replace(config or config_class(), **options)  # type: ignore[type-var]


def identity_of(values: dict[str, Any]) -> dict[str, Any]:
    """The fields of a config's values that decide what a run computes: a run directory is tied to these
    (kway_min_wins only matters to a k-way run, the verifiers to a verifier-judged run, and so on:
    CONDITIONAL_FIELDS). An input file counts by its content, not its path (CONTENT_FIELDS): a run moved or copied
    with its files to another folder or machine is the same run."""
    return {k: file_identity(v) if k in CONTENT_FIELDS else v for k, v in values.items() if k not in RUNTIME_FIELDS
            and (k not in CONDITIONAL_FIELDS or values.get(CONDITIONAL_FIELDS[k][0]) == CONDITIONAL_FIELDS[k][1])}


def file_identity(value: Any) -> Any:
    """An existing file's content digest ("sha256:..."), else the value as given (a name such as `mmlu`, or a
    path that is not there)."""
    if isinstance(value, str) and Path(value).is_file():
        return "sha256:" + hashlib.sha256(Path(value).read_bytes()).hexdigest()
    return value


def with_new_defaults(recorded: dict[str, Any]) -> dict[str, Any]:
    """A config a run recorded, with the defaults of fields added since (a run made before `routing` existed
    is a binary run, and resumes as one). A gate trained before gate_layer and gate_pool existed says what it reads
    in its own config.json (block 0, last token); the run resumes as it is."""
    defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(BootstrapConfig)} | BEFORE_THE_FIELD
    return {**{k: v for k, v in defaults.items() if k not in recorded}, **recorded}


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise PrismError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PrismError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise PrismError(f"config file {path} must hold a mapping of option: value")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    for flag_name, field_name in (("personas", "personas_file"), ("queries", "queries_file")):
        if flag_name in values:  # the CLI flag's name, accepted in files too
            values[field_name] = values.pop(flag_name)
    unknown = sorted(set(values) - set(FIELD_NAMES) - {"out"})
    if unknown:
        raise PrismError(f"config file {path}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(FIELD_NAMES)}")
    return values


def domain_mapping(domains: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A config file's `domains: {name: {persona: ..., examples: [...]}}` (or {name: None}) as the fields it sets:
    the domain names, and each domain's persona and example queries where given."""
    personas, examples = dict(values.get("domain_personas") or {}), dict(values.get("domain_examples") or {})
    for name, entry in domains.items():
        entry = entry if entry is not None else {}
        if not isinstance(entry, dict) or set(entry) - {"persona", "examples"}:
            raise PrismError(f"domain {name!r}: give a mapping with 'persona' (text) and/or 'examples' (a list of "
                             f"queries), got {entry!r}")
        if entry.get("persona") is not None:
            personas[str(name)] = str(entry["persona"])
        if entry.get("examples") is not None:
            listed = entry["examples"]
            examples[str(name)] = [listed] if isinstance(listed, str) else list(listed)
    return {"domains": [str(name) for name in domains], "domain_personas": personas, "domain_examples": examples}


def resolve_config(file_values: dict[str, Any] | None = None, **overrides: Any) -> BootstrapConfig:
    """Merge preset < config file < explicit overrides (CLI flags or Python keyword arguments)."""
    values = {k: v for k, v in (file_values or {}).items() if k != "out"}  # where to write is not config
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - set(FIELD_NAMES))
    if unknown:
        raise PrismError(f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(FIELD_NAMES)}")
    preset = values.get("preset", DEFAULT_PRESET)
    if preset not in PRESETS:
        raise PrismError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if isinstance(values.get("domains"), dict):
        values.update(domain_mapping(values["domains"], values))
    merged = {**PRESETS[preset], **values}
    try:
        return BootstrapConfig(**merged)
    except TypeError as exc:
        raise PrismError(f"invalid configuration: {exc}") from None
