"""Offline benchmark data: MMLU, ARC, MT-Bench and JailbreakBench (JBB-Behaviors), as plain records."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

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


def default_data_dir() -> Path:
    """$PRISM_BENCHMARKS, else the project's shared offline copy when it is there."""
    candidates = [os.environ.get("PRISM_BENCHMARKS"), "../shared/benchmarks", "shared/benchmarks"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    raise PrismError("no benchmark data found: pass --data-dir DIR (with mmlu/, arc/, mt_bench/, jbb/ inside) "
                     "or set PRISM_BENCHMARKS")


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise PrismError(f"benchmark file {path} is missing: check --data-dir")
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise PrismError(f"{path}: not JSON Lines ({exc})") from None


def _per_group(items: list[dict[str, Any]], key: str, limit: int | None) -> list[dict[str, Any]]:
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


def load_mmlu(data_dir: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """MMLU test subset; `limit` = items per subject."""
    rows = _jsonl(data_dir / "mmlu" / "test_subset.jsonl")
    items = [{"id": f"{r['subject']}-{i}", "subject": r["subject"], "domain": SUBJECT_DOMAIN.get(r["subject"], "other"),
              "question": r["question"], "choices": r["choices"], "answer": int(r["answer"])}
             for i, r in enumerate(rows)]
    return _per_group(items, "subject", limit)


def load_arc(data_dir: Path, limit: int | None = None, split: str = "easy") -> list[dict[str, Any]]:
    """ARC-Easy or ARC-Challenge test; `limit` = items in all."""
    rows = _jsonl(data_dir / "arc" / f"{split}_test.jsonl")
    # `answer` is the index of the right choice; the original labels (A-E or 1-5) are not needed, since
    # every benchmark is shown with letters A, B, C, ...
    items = [{"id": r["id"], "subject": f"arc-{split}", "domain": "STEM", "question": r["question"],
              "choices": r["choices"], "answer": int(r["answer"])} for r in rows]
    return items[:limit] if limit else items


def load_mtbench(data_dir: Path, limit: int | None = None) -> dict[str, Any]:
    """MT-Bench questions (`limit` = questions per category), reference answers and judge prompts."""
    folder = data_dir / "mt_bench"
    questions = _per_group(_jsonl(folder / "question.jsonl"), "category", limit)
    references = {r["question_id"]: r["choices"][0]["turns"] for r in _jsonl(folder / "reference_answer_gpt-4.jsonl")}
    prompts = {p["name"]: p for p in _jsonl(folder / "judge_prompts.jsonl")}
    missing = [name for name in JUDGE_PROMPTS if name not in prompts]
    if missing:
        raise PrismError(f"{folder / 'judge_prompts.jsonl'} lacks the judge prompts {', '.join(missing)}: use "
                         "FastChat's llm_judge/data/judge_prompts.jsonl, which has all eight")
    return {"questions": questions, "references": references, "judge_prompts": prompts}


def load_jbb(data_dir: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """JBB-Behaviors: 100 harmful and 100 benign goals; `limit` = goals of each kind."""
    items = []
    for kind in ("harmful", "benign"):
        path = data_dir / "jbb" / f"{kind}.csv"
        if not path.is_file():
            raise PrismError(f"benchmark file {path} is missing: check --data-dir")
        with path.open(encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
        rows = rows[:limit] if limit else rows
        items += [{"id": f"{kind}-{r['Index']}", "kind": kind, "goal": r["Goal"], "category": r["Category"]}
                  for r in rows]
    return items
