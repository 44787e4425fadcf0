"""Offline benchmark data: MMLU, ARC, MT-Bench and JailbreakBench (JBB-Behaviors), as plain records."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from prism.config import default_data_dir
from prism.errors import PrismError

LETTERS = "ABCDEFGHIJ"
MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
NEEDS_REFERENCE = ("math", "reasoning", "coding")  # as in FastChat's llm_judge
JUDGE_PROMPTS = tuple(f"{kind}-{version}{turn}" for kind, version in
                      (("single", "v1"), ("single", "math-v1"), ("pair", "v2"), ("pair", "math-v1"))
                      for turn in ("", "-multi-turn"))

# The four MMLU domains of Hendrycks et al. (2021), subject by subject (space-separated).
MMLU_DOMAINS = {
    "STEM": (
        "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
        "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
        "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
        "high_school_mathematics high_school_physics high_school_statistics machine_learning"
    ),
    "humanities": (
        "formal_logic high_school_european_history high_school_us_history high_school_world_history "
        "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy prehistory "
        "professional_law world_religions"
    ),
    "social sciences": (
        "econometrics high_school_geography high_school_government_and_politics high_school_macroeconomics "
        "high_school_microeconomics high_school_psychology human_sexuality professional_psychology "
        "public_relations security_studies sociology us_foreign_policy"
    ),
    "other": (
        "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
        "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology"
    ),
}
SUBJECT_DOMAIN = {subject: domain for domain, subjects in MMLU_DOMAINS.items() for subject in subjects.split()}


# A benchmark's source is either a local data root in the layout of ../shared/benchmarks (mmlu/, arc/,
# mt_bench/, jbb/) or anything `datasets.load_dataset` reads: a Hugging Face Hub id like cais/mmlu, or a
# local dataset folder, optionally with ":config". The Hub datasets named in the README have these schemas.
HUB_CONFIGS = {"mmlu": "all", "arc-easy": "ARC-Easy", "arc-challenge": "ARC-Challenge", "jbb": "behaviors",
               "mtbench": None}


def _local(source: str | Path, relative: str) -> Path | None:
    """The file in a local root that has the benchmark's folder (the file may be missing: an error later)."""
    path = Path(source) / relative
    return path if path.parent.is_dir() else None


def _dataset_rows(source: str | Path, default_config: str | None, split: str) -> list[dict[str, Any]]:
    """One split of a dataset through the `datasets` library (Hub id or local dataset folder)."""
    name, _, config = str(source).partition(":")
    try:
        import datasets
    except ImportError:
        raise PrismError(f"{source} is not a local benchmark folder, and reading it as a Hugging Face dataset "
                         "needs the datasets package: pip install datasets") from None
    try:
        return [dict(row) for row in datasets.load_dataset(name, config or default_config, split=split)]
    except Exception as exc:  # network, unknown id, missing config or split: all end the same way for the user
        raise PrismError(f"cannot load {name} (config {config or default_config}, split {split}) with "
                         f"datasets.load_dataset: {type(exc).__name__}: {exc}. Check the id and config (give one "
                         "as ID:CONFIG), or pass a local folder laid out like ../shared/benchmarks") from None


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise PrismError(f"benchmark file {path} is missing: check --data-dir")
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise PrismError(f"{path}: not JSON Lines ({exc})") from None


def _csv(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def per_group(items: list[dict[str, Any]], key: str, limit: int | None) -> list[dict[str, Any]]:
    """The first `limit` items of every group, so a limited run still covers every subject or category."""
    if limit is None:
        return items
    seen: dict[str, int] = {}
    kept = []
    for item in items:
        seen[item[key]] = seen.get(item[key], 0) + 1
        if seen[item[key]] <= limit:
            kept.append(item)
    return kept


def _field(row: dict[str, Any], names: tuple[str, ...], source: str | Path) -> Any:
    for name in names:
        if name in row:
            return row[name]
    raise PrismError(f"{source}: rows have no {' or '.join(names)} column (they have {', '.join(row)}); "
                     "the dataset does not have the schema this benchmark expects")


def load_mmlu(source: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """MMLU test items (`limit` = items per subject); columns subject, question, choices, answer (cais/mmlu)."""
    local = _local(source, "mmlu/test_subset.jsonl")
    rows = _jsonl(local) if local else _dataset_rows(source, HUB_CONFIGS["mmlu"], "test")
    items = [{"id": f"{_field(r, ('subject',), source)}-{i}", "subject": r["subject"],
              "domain": SUBJECT_DOMAIN.get(r["subject"], "other"), "question": _field(r, ("question",), source),
              "choices": list(_field(r, ("choices",), source)), "answer": int(_field(r, ("answer",), source))}
             for i, r in enumerate(rows)]
    return per_group(items, "subject", limit)


def load_arc(source: str | Path, limit: int | None = None, split: str = "easy") -> list[dict[str, Any]]:
    """ARC-Easy or ARC-Challenge test; `limit` = items in all. A local root without that split gives none."""
    local = _local(source, f"arc/{split}_test.jsonl")
    if local and not local.is_file():
        return []  # a local root may hold one of the two splits
    if local:
        rows = _jsonl(local)
    else:  # allenai/ai2_arc: choices = {"text": [...], "label": [...]}, answerKey = one of the labels
        rows = []
        for r in _dataset_rows(source, HUB_CONFIGS[f"arc-{split}"], "test"):
            choices = _field(r, ("choices",), source)
            rows.append({"id": r["id"], "question": r["question"], "choices": list(choices["text"]),
                         "answer": list(choices["label"]).index(_field(r, ("answerKey",), source))})
    # `answer` is the index of the right choice; the original labels (A-E or 1-5) are not needed, since
    # every benchmark is shown with letters A, B, C, ...
    items = [{"id": r["id"], "subject": f"arc-{split}", "domain": "STEM", "question": r["question"],
              "choices": r["choices"], "answer": int(r["answer"])} for r in rows]
    return items[:limit] if limit else items


def load_mtbench(source: str | Path, limit: int | None = None, support: str | Path | None = None
                 ) -> dict[str, Any]:
    """MT-Bench questions (`limit` = questions per category), GPT-4 reference answers and FastChat's judge
    prompts. Questions may come from a dataset (lighteval/mt-bench, HuggingFaceH4/mt_bench_prompts); the
    references and judge prompts are not on the Hub, so they come from the local root `support`."""
    local = _local(source, "mt_bench/question.jsonl")
    if local:
        questions = _jsonl(local)
    else:
        questions = [{"question_id": int(_field(r, ("question_id", "prompt_id"), source)), "category": r["category"],
                      "turns": list(_field(r, ("turns", "prompt"), source))}
                     for r in _dataset_rows(source, HUB_CONFIGS["mtbench"], "train")]
    folder = Path(source if local else support or default_data_dir()) / "mt_bench"
    references = {r["question_id"]: r["choices"][0]["turns"] for r in _jsonl(folder / "reference_answer_gpt-4.jsonl")}
    prompts = {p["name"]: p for p in _jsonl(folder / "judge_prompts.jsonl")}
    missing = [name for name in JUDGE_PROMPTS if name not in prompts]
    if missing:
        raise PrismError(f"{folder / 'judge_prompts.jsonl'} lacks the judge prompts {', '.join(missing)}: use "
                         "FastChat's llm_judge/data/judge_prompts.jsonl, which has all eight")
    return {"questions": per_group(questions, "category", limit), "references": references,
            "judge_prompts": prompts}


def load_jbb(source: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """JBB-Behaviors: 100 harmful and 100 benign goals; `limit` = goals of each kind."""
    items = []
    for kind in ("harmful", "benign"):
        local = _local(source, f"jbb/{kind}.csv")
        if local and not local.is_file():
            raise PrismError(f"benchmark file {local} is missing: check --data-dir")
        rows = _csv(local) if local else _dataset_rows(source, HUB_CONFIGS["jbb"], kind)
        rows = rows[:limit] if limit else rows
        items += [{"id": f"{kind}-{r.get('Index', i + 1)}", "kind": kind, "goal": _field(r, ("Goal",), source),
                   "category": r.get("Category", "")} for i, r in enumerate(rows)]
    return items


PKU_PROMPTS = 500  # the paper's share of PKU-SafeRLHF: the first 500 prompts of the train split


def _table_rows(source: str | Path, split: str) -> list[dict[str, Any]]:
    """Rows of a local data file in its published format (CSV, JSON Lines, a JSON list) or of a dataset
    (`datasets.load_dataset`: a Hub id, optionally ID:CONFIG, or a local dataset folder)."""
    path = Path(str(source)).expanduser()
    if path.is_file():
        if path.suffix == ".csv":
            return _csv(path)
        if path.suffix == ".jsonl":
            return _jsonl(path)
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PrismError(f"{path}: expected CSV, JSON Lines or a JSON list of rows ({exc})") from None
        if not isinstance(rows, list):
            raise PrismError(f"{path}: expected a JSON list of rows")
        return rows
    return _dataset_rows(source, None, split)


def load_harmbench(source: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """HarmBench's standard behaviors, from harmbench_behaviors_text_all.csv (columns Behavior,
    FunctionalCategory, SemanticCategory, ContextString, BehaviorID) or a dataset with that schema;
    `limit` = the first behaviors kept."""
    rows = _table_rows(source, "train")
    standard = [r for r in rows if _field(r, ("FunctionalCategory",), source) == "standard"]
    if not standard:
        raise PrismError(f"{source}: no behavior has FunctionalCategory 'standard'; is this HarmBench's "
                         "harmbench_behaviors_text_all.csv?")
    items = [{"id": f"harmbench-{r.get('BehaviorID') or i + 1}", "kind": "harmful",
              "goal": _field(r, ("Behavior",), source), "category": r.get("SemanticCategory", "")}
             for i, r in enumerate(standard)]
    return items[:limit] if limit else items


def load_pku(source: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """PKU-SafeRLHF: the first 500 distinct prompts of the train split (column `prompt`), or the first
    `limit` of them."""
    prompts: list[str] = []
    for row in _table_rows(source, "train"):
        prompt = _field(row, ("prompt",), source)
        if prompt not in prompts:
            prompts.append(prompt)
        if len(prompts) == (limit or PKU_PROMPTS):
            break
    return [{"id": f"pku-{i + 1}", "kind": "harmful", "goal": p, "category": ""} for i, p in enumerate(prompts)]
