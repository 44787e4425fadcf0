"""`prism compare OLD NEW --queries FILE`: two runs on the same held-out prompts (`prism discover`'s
holdout.jsonl): per domain, the share of prompts each run's gate sends to its adapter, and the judge's verdict
of NEW's answers against OLD's (the bootstrap's pairwise judge on NEW's base model, both orders: a win or a
loss needs both), in OUT/compare.json. The answers, verdicts and labels stay in OUT as a run's records, so an
interrupted comparison resumes."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from prism.config import resolve_config, with_options
from prism.errors import PrismError
from prism.evaluation.config import CompareConfig
from prism.evaluation.persona_ab import summarize_ab
from prism.inference.base import GenerationRequest
from prism.inference.transformers import PrismModel
from prism.lm.decoding import SamplingParams
from prism.lm.models import load_model
from prism.runs import RunDir, write_json_atomic
from prism.stages import verify
from prism.stages.context import StageContext
from prism.stages.queries import read_real_queries
from prism.stages.records import read_judgments, read_labels

log = logging.getLogger("prism")
NEW_ID = "new-run"  # the "persona" side of the judged pairs: NEW's answer; the plain side is OLD's


def compare_runs(old: str | Path, new: str | Path, queries_file: str | Path, config: CompareConfig | None = None,
                 **options: Any) -> dict[str, Any]:
    """`queries_file`: held-out prompts, JSONL of {"query", "domain"} (prism discover's holdout.jsonl)."""
    config = with_options(CompareConfig, config, **options)
    queries = read_real_queries(queries_file)[: config.limit]
    if not queries:
        raise PrismError(f"{queries_file} holds no prompts")
    out = RunDir(config.out or Path(new) / "compare")
    out.path.mkdir(parents=True, exist_ok=True)
    answered = _answered(out, queries)  # an interrupted comparison keeps its answers
    routing = {}
    answers: dict[str, list[str]] = {}
    for side, run in (("old", old), ("new", new)):
        routing[side], answers[side] = _answer(run, queries, config, generate=not answered)
    if not answered:
        _write_pairs(out, queries, answers["old"], answers["new"])
    manifest = RunDir(new).manifest().get("config", {})
    domains = sorted({q["domain"] for q in queries})
    judge_config = resolve_config(model=manifest.get("model", "embedded"), domains=domains, judge="pairwise",
                                  batch_size=config.batch_size, device=config.device,
                                  **{k: manifest[k] for k in ("judge_max_chars", "seed") if k in manifest})
    lm = load_model(judge_config.model, device=config.device)
    verify.run(StageContext(run=out, config=judge_config, lm=lm))
    labels = read_labels(out)
    result = {"old": str(old), "new": str(new), "queries": str(queries_file), "prompts": len(queries),
              "routing": routing, "verdict": summarize_ab(labels),
              "judge": verify.judge_quality(read_judgments(out), labels, judge_config.to_dict())}
    write_json_atomic(out.path / "compare.json", result)
    return result


def _answer(run: str | Path, queries: list[dict[str, str]], config: CompareConfig, generate: bool
            ) -> tuple[dict[str, float], list[str]]:
    """Per domain the share of prompts the run routes to an adapter, and (`generate`) its gated answers."""
    model = PrismModel.from_run(run, device=config.device)
    conversations = [[{"role": "user", "content": q["query"]}] for q in queries]
    routed: dict[str, list[bool]] = defaultdict(list)
    for query, decision in zip(queries, model.decide(conversations)):
        routed[query["domain"]].append(decision.route != "base")
    params = SamplingParams(max_tokens=config.max_tokens, temperature=0.0)
    texts: list[str] = []
    for start in range(0, len(conversations) if generate else 0, config.batch_size):
        chunk = conversations[start:start + config.batch_size]
        texts += [c.text.strip() for c in model.generate_batch([GenerationRequest(m, "auto", params) for m in chunk])]
    return {domain: sum(flags) / len(flags) for domain, flags in sorted(routed.items())}, texts


def _answered(out: RunDir, queries: list[dict[str, str]]) -> bool:
    if not out.read("answers"):
        return False
    if [r["query"] for r in out.read("queries")] != [q["query"] for q in queries]:
        raise PrismError(f"{out.path} holds a comparison of other prompts: choose another --out")
    return True


def _write_pairs(out: RunDir, queries: list[dict[str, str]], old: list[str], new: list[str]) -> None:
    """The pairs as a run's records, NEW's answer as the "persona" one."""
    out.append("personas", [{"id": NEW_ID, "domain": "compare", "persona": "(the new run's answer)"}])
    out.append("queries", [{"id": f"q{i}", "persona_id": NEW_ID, "domain": q["domain"], "query": q["query"],
                            "status": "kept"} for i, q in enumerate(queries)])
    out.append("answers", [{"id": f"q{i}:{variant}", "query_id": f"q{i}", "variant": variant, "answer": text,
                            "new_tokens": 0, "finished": True}
                           for i, pair in enumerate(zip(old, new))
                           for variant, text in zip(("plain", "persona"), pair)])


def format_comparison(result: dict[str, Any]) -> str:
    lines = [f"{result['prompts']} held-out prompts; share routed to an adapter (old -> new):"]
    for domain in sorted(set(result["routing"]["old"]) | set(result["routing"]["new"])):
        lines.append(f"  {domain:<32} {result['routing']['old'].get(domain, 0):6.1%} -> "
                     f"{result['routing']['new'].get(domain, 0):6.1%}")
    lines.append("the judge on new vs old answers (a win or loss needs both orders):")
    for domain, row in result["verdict"].items():
        lines.append(f"  {domain:<32} n={row['n']:<4} new wins {row['win_rate']:6.1%}, loses {row['loss_rate']:6.1%}, "
                     f"ties {row['tie_rate']:6.1%}")
    warning = verify.judge_warning(result["judge"])
    if warning:
        lines.append(warning)
    return "\n".join(lines)
