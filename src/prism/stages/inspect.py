"""What a run directory holds: stage status, record counts, the judge's quality, gate and adapter metrics
(`inspect_run`), and the same as the lines `prism inspect` and `prism bootstrap` print (`format_summary`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prism.lm.gate import GATE_WEIGHTS
from prism.runs import FILES, GATE_DIR, STAGES, RunDir, adapter_dir, has_adapter_weights
from prism.stages import queries, verify
from prism.stages.gate import separability_warning
from prism.stages.records import Label, read_judgments, read_labels


def inspect_run(path: str | Path) -> dict[str, Any]:
    """What a run holds: stage status, record counts, gate, adapter and distillation metrics."""
    run = RunDir(path)
    manifest = run.manifest()
    stages = manifest.get("stages", {})
    labels, judgments = read_labels(run), read_judgments(run)
    query_records = run.read("queries")
    summary: dict[str, Any] = {
        "path": str(run.path),
        "stages": {s: stages.get(s, {}).get("status", "pending") for s in STAGES},
        "counts": {
            "personas": len(run.read("personas")),
            "query_candidates": len(query_records),
            "queries": len(queries.kept_queries(query_records)),
            "answers": len(run.read("answers")),
            "judgments": len(judgments),
            "distill": sum(1 for r in labels if r.label == 1),
            "retain": sum(1 for r in labels if r.label == 0),
        },
        "seconds": {s: stages.get(s, {}).get("seconds") for s in STAGES},
        "model": (manifest.get("model") or {}).get("name", manifest.get("config", {}).get("model")),
        "config_fingerprint": manifest.get("config_fingerprint"),
    }
    summary["verify"] = verify.judge_quality(judgments, labels, manifest.get("config", {}))
    gate_info = stages.get("gate", {})
    summary["gate"] = {k: gate_info.get(k) for k in (
        "kind", "classifier", "heldout_accuracy", "heldout_balanced_accuracy", "heldout_auroc", "heldout_intervals",
        "heldout_recall", "heldout_method", "threshold", "train_accuracy", "majority_baseline", "examples",
        "positives", "constant_route", "targets") if k in gate_info}
    summary["domain_separability"] = gate_info.get("domain_separability")
    summary["labels"] = label_summary(labels, stages.get("verify", {}))
    outcomes_info = stages.get("adapter_outcomes", {})
    summary["adapter_outcomes"] = {k: outcomes_info.get(k) for k in ("adapter_outcomes", "queries", "why")
                                   if k in outcomes_info}
    distill_info = stages.get("distill", {})
    summary["adapter"] = {k: distill_info.get(k) for k in ("trainable_params", "share_of_base") if k in distill_info}
    summary["distill"] = {k: distill_info.get(k) for k in ("persona_signal", "loss_first", "loss_last", "steps",
                                                           "examples", "skipped") if k in distill_info}
    kway_gate = gate_info.get("kway")
    if kway_gate:
        adapters = distill_info.get("kway_adapters") or {}
        summary["kway"] = {
            "classes": kway_gate["classes"], "merged_into_base": kway_gate["merged_into_base"],
            "min_wins": kway_gate["min_wins"], "class_counts": kway_gate["class_counts"],
            "gate": {k: kway_gate.get(k) for k in ("kind", "classifier", "heldout_accuracy",
                                                   "heldout_balanced_accuracy", "heldout_auroc", "heldout_recall",
                                                   "heldout_method", "train_accuracy", "majority_baseline",
                                                   "constant_route") if k in kway_gate},
            "adapters": {name: {k: a.get(k) for k in ("examples", "steps", "loss_first", "loss_last", "persona_signal")}
                         for name, a in adapters.items()},
        }
    summary["files"] = {name: (run.path / file).is_file() for name, file in FILES.items()}
    summary["files"].update(adapter=has_adapter_weights(adapter_dir(run.path)),
                            gate=(run.path / GATE_DIR / GATE_WEIGHTS).is_file())
    return summary


def label_summary(labels: list[Label], verify_info: dict[str, Any]) -> dict[str, Any]:
    """The labels' samples and reliability: K answer pairs per query, the mean persona win rate, and the agreement
    of two disjoint halves of the K samples (from K = 2)."""
    if not labels:
        return {}
    return {"label_samples": max(r.samples for r in labels),
            "mean_win_rate": sum(r.persona_win_rate for r in labels) / len(labels),
            "reliability": verify_info.get("label_reliability")}


def format_summary(summary: dict[str, Any]) -> str:
    stages = "  ".join(f"{name}={status}" for name, status in summary["stages"].items())
    c = summary["counts"]
    lines = [
        f"run      {summary['path']}   model: {summary['model']}",
        f"stages   {stages}",
        f"counts   personas {c['personas']}, queries {c['queries']} (of {c['query_candidates']} candidates), "
        f"answers {c['answers']}, judgments {c['judgments']}, distill {c['distill']}, retain {c['retain']}",
    ]
    labels = summary.get("labels") or {}
    if labels:
        reliability = labels.get("reliability")
        agreement = (f"; split-half agreement {reliability['split_half_agreement']:.2f} over {reliability['queries']} "
                     "queries" if reliability else "")
        lines.append(f"labels   {labels['label_samples']} answer pair(s) per query, mean persona win rate "
                     f"{labels['mean_win_rate']:.2f}{agreement}")
    separability = summary.get("domain_separability")
    if separability and separability.get("accuracy") is not None:
        lines.append(f"domains  a probe tells the {separability['domains']} domains apart from the gate's feature at "
                     f"{separability['accuracy']:.2f} out-of-fold (chance {separability['chance']:.2f})")
    outcomes = summary.get("adapter_outcomes") or {}
    if "adapter_outcomes" in outcomes:
        counts = outcomes["adapter_outcomes"]
        lines.append(f"adapter  its own answers against plain, judged (what the gate learns from): {counts['win']} "
                     f"wins, {counts['tie']} ties, {counts['loss']} losses over {outcomes['queries']} queries")
    gate = summary.get("gate") or {}
    if gate.get("kind") == "constant":
        target = "the adapter" if gate["constant_route"] else "the base model"
        lines.append(f"gate     constant: every query goes to {target}")
    elif gate:
        lines.extend(format_gate(gate))
    adapter = summary.get("adapter") or {}
    if adapter:
        lines.append(f"adapter  {adapter['trainable_params']:,} trainable parameters "
                     f"({100 * adapter['share_of_base']:.2f}% of the base model)")
    dist = summary.get("distill") or {}
    if dist.get("skipped"):
        lines.append(f"distill  skipped: {dist['skipped']}")
    elif "loss_first" in dist:
        signal = dist.get("persona_signal")
        lines.append(f"distill  persona signal (KL at step 0) {'n/a' if signal is None else f'{signal:.4f}'}; "
                     f"KL loss {dist['loss_first']:.4f} -> {dist['loss_last']:.4f} over {dist['steps']} steps")
    lines.extend(format_kway(summary.get("kway")))
    judge = summary.get("verify") or {}
    if judge.get("pairs"):
        lines[3:3] = verify.format_judge_quality(judge)
    for warning in (separability_warning(separability), verify.judge_warning(judge)):
        if warning:
            lines.append(warning)  # the last lines a bootstrap prints
    return "\n".join(lines)


def _with_interval(gate: dict[str, Any], key: str) -> str:
    value = gate.get(f"heldout_{key}")
    if value is None:
        return "n/a"
    interval = (gate.get("heldout_intervals") or {}).get(key)
    return f"{value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def format_gate(gate: dict[str, Any]) -> list[str]:
    """The gate's lines: its classifier, its scores on rows it never saw beside the majority baseline, its
    threshold and what routing with it gained out of fold."""
    chosen = (gate.get("classifier") or {}).get("chosen") or gate.get("kind")
    lines = [f"gate     {chosen}: held-out accuracy {_with_interval(gate, 'accuracy')}, balanced "
             f"{_with_interval(gate, 'balanced_accuracy')}, AUROC {_with_interval(gate, 'auroc')}; majority-class "
             f"baseline {gate['majority_baseline']:.3f}, train {gate['train_accuracy']:.3f}"]
    if gate.get("heldout_method"):
        lines.append(f"         ({gate['heldout_method']})")
    by_domain = (gate.get("targets") or {}).get("domain_rate_auroc")
    if by_domain is not None:
        lines.append(f"         AUROC of scoring each query by its domain's win rate alone: {by_domain:.3f} (a gate "
                     "that routes by domain cannot rank the queries inside one, so it stays near this)")
    threshold = gate.get("threshold")
    if isinstance(threshold, dict) and "oof_gain_per_query" in threshold:
        lines.append(f"         threshold {threshold['threshold']:.3f} ({threshold['chosen_by']}): routes "
                     f"{100 * threshold['oof_routed_share']:.0f}% to the adapter, gain per query (win rate - loss "
                     f"rate) {threshold['oof_gain_per_query']:+.3f} against {threshold['oof_gain_all_adapter']:+.3f} "
                     "with every query on the adapter and 0 with none")
    return lines


def format_kway(kway: dict[str, Any] | None) -> list[str]:
    """The k-way lines of `prism inspect`: the classes, the domains merged into base, the gate, the adapters."""
    if not kway:
        return []
    counts = dict(zip(kway["classes"], kway["class_counts"]))
    lines = [f"k-way    {len(kway['classes']) - 1} persona adapters + base: "
             + ", ".join(f"{name} ({counts[name]} queries)" for name in kway["classes"])]
    if kway["merged_into_base"]:
        lines.append(f"k-way    merged into base (fewer than {kway['min_wins']} wins): "
                     + ", ".join(f"{domain} ({wins})" for domain, wins in kway["merged_into_base"].items()))
    gate = kway["gate"]
    if gate.get("kind") == "constant":
        lines.append(f"k-way    gate constant: every query goes to {kway['classes'][gate['constant_route']]}")
    elif gate:
        held = gate.get("heldout_accuracy")
        recall = ", ".join(f"{k} {v:.2f}" for k, v in (gate.get("heldout_recall") or {}).items())
        held_text = "n/a (a class has fewer than 2 queries)" if held is None else f"{held:.3f}"
        lines.append(f"k-way    gate held-out accuracy {held_text}{f' (recall: {recall})' if recall else ''}, "
                     f"train {gate['train_accuracy']:.3f}, majority-class baseline {gate['majority_baseline']:.3f}")
    for name, adapter in kway["adapters"].items():
        if adapter.get("loss_first") is not None:
            lines.append(f"k-way    adapter {name}: {adapter['examples']} examples, KL loss "
                         f"{adapter['loss_first']:.4f} -> {adapter['loss_last']:.4f} over {adapter['steps']} steps")
    return lines
