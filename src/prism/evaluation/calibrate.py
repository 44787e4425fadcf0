"""Routing curves and threshold calibration from the cached eval records (no model needed).

Each item has an outcome on the base route (system `base`), on the adapter route (system `lora`) and a
gate probability (system `prism`); a k-way run's gate is calibrated the same way, with `kway-lora` (each
item on its most probable adapter) as the adapter route and `kway` giving P(an adapter). Routing the items
with P(persona) >= t to the adapter gives one point per threshold t: (share routed, mean outcome). Two
references, as in RouteLLM's evaluation: random routing at the same share, and the oracle that takes the
better route per item.

The threshold is chosen on one half of the items and every figure reported at it (and the curves) comes
from the other half: a threshold picked on the items it is then scored on would report an optimistic,
in-sample value. The halves are fixed by a hash of each item's id, so they do not change between runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prism.config import ROUTINGS, option
from prism.errors import PrismError
from prism.evaluation.config import GATED
from prism.lm.gate import GATE_CONFIG, save_threshold
from prism.runs import EVAL_DIR, RunDir, gate_dir, write_json_atomic


@dataclass
class Outcomes:
    """Per-item outcomes of one benchmark metric on both routes, with the gate's probability."""
    metric: str
    base: list[float]
    adapter: list[float]
    probability: list[float]
    ids: list[str]

    def subset(self, keep: list[bool]) -> Outcomes:
        def pick(values: list) -> list:
            return [v for v, k in zip(values, keep) if k]

        return Outcomes(self.metric, pick(self.base), pick(self.adapter), pick(self.probability), pick(self.ids))


SPLIT = "items split in two halves by a hash of their id: the threshold is chosen on one, reported on the other"


def split_halves(outcomes: Outcomes) -> tuple[Outcomes, Outcomes]:
    """(selection, held-out): items ordered by a hash of their id and dealt alternately, so both halves get
    items (a metric with one item cannot be split: it goes to the held-out half)."""
    order = sorted(range(len(outcomes.ids)), key=lambda i: hashlib.sha256(outcomes.ids[i].encode()).hexdigest())
    selected = set(order[1::2])
    keep = [i in selected for i in range(len(outcomes.ids))]
    return outcomes.subset(keep), outcomes.subset([not k for k in keep])


def collect_outcomes(store: RunDir, routing: str = ROUTINGS[0]) -> dict[str, Outcomes]:
    """MMLU accuracy, MT-Bench turn score, JBB refusal of harmful goals, from eval/*.jsonl: over the items
    (and the MMLU scoring) of the last `prism eval`, as its eval_config.json records them; for the binary
    gate (systems base, lora, prism) or the k-way one (base, kway-lora, kway)."""
    gated = "kway" if routing == "kway" else "prism"
    always = GATED[gated]
    config_path = store.path / "eval_config.json"
    last_eval = json.loads(config_path.read_text()) if config_path.is_file() else {}
    covered = {bench: set(ids) for bench, ids in last_eval.get("items", {}).items()}
    found: dict[str, Outcomes] = {}

    def pair_up(metric: str, bench: str, records: list[dict], key: str, value: str, gate_records: list[dict]
                ) -> None:
        def inside(r: dict) -> bool:
            return bench not in covered or r[key if bench != "mtbench" else "question_id"] in covered[bench]

        by_system: dict[str, dict[Any, Any]] = {"base": {}, always: {}}
        for r in records:
            if r["system"] in by_system and r.get(value) is not None and inside(r):
                by_system[r["system"]][r[key]] = float(r[value])
        gate = {r[key]: r["gate_probability"] for r in gate_records
                if r["system"] == gated and r.get("gate_probability") is not None and inside(r)}
        ids = sorted(set(by_system["base"]) & set(by_system[always]) & set(gate), key=str)
        if ids:
            found[metric] = Outcomes(metric, [by_system["base"][i] for i in ids], [by_system[always][i] for i in ids],
                                     [gate[i] for i in ids], [str(i) for i in ids])

    scoring = last_eval.get("scoring", "letter")
    mmlu = [r for r in store.read("mmlu") if r.get("scoring", "letter") == scoring]
    pair_up("mmlu_accuracy", "mmlu", mmlu, "id", "correct", mmlu)
    answers = store.read("mtbench_answers")
    for record in answers:
        record["item"] = f"{record['question_id']}:{record['turn']}"
    scores = store.read("mtbench_scores")
    for record in scores:
        record["item"] = f"{record['question_id']}:{record['turn']}"
    pair_up("mtbench_score", "mtbench", scores, "item", "score", answers)
    jbb_answers = [r for r in store.read("jbb_answers") if r["kind"] == "harmful"]
    refusals = [r for r in store.read("jbb_refusals") if r["kind"] == "harmful"]
    pair_up("jbb_refusal_harmful", "jbb", refusals, "id", "refusal_judge", jbb_answers)
    return found


def routing_curve(outcomes: Outcomes) -> dict[str, Any]:
    thresholds = _candidates(outcomes.probability)
    n = len(outcomes.base)
    mean_base, mean_adapter = sum(outcomes.base) / n, sum(outcomes.adapter) / n
    points = []
    for t in thresholds:
        routed = [p >= t for p in outcomes.probability]
        share = sum(routed) / n
        value = sum(a if r else b for a, b, r in zip(outcomes.adapter, outcomes.base, routed)) / n
        points.append({"threshold": t, "share": share, "value": value,
                       "random": share * mean_adapter + (1 - share) * mean_base})
    oracle_routed = [a > b for a, b in zip(outcomes.adapter, outcomes.base)]
    oracle = {"share": sum(oracle_routed) / n, "value": sum(max(a, b) for a, b in zip(outcomes.adapter,
                                                                                     outcomes.base)) / n}
    return {"metric": outcomes.metric, "items": n, "base": mean_base, "adapter": mean_adapter, "points": points,
            "oracle": oracle}


def _candidates(probabilities: list[float]) -> list[float]:
    """Every threshold that changes a decision: 0 (always persona), each probability, and just above
    the largest (never persona)."""
    return sorted({0.0, *probabilities, min(1.0, max(probabilities, default=0.0) + 1e-6)})


def value_at(outcomes: Outcomes, threshold: float) -> float:
    routed = [p >= threshold for p in outcomes.probability]
    return sum(a if r else b for a, b, r in zip(outcomes.adapter, outcomes.base, routed)) / len(routed)


@dataclass
class Objective:
    """Maximize MT-Bench (scaled to 0-1) + harmful-refusal rate, keeping MMLU within max_mmlu_drop points
    of the base model (for the gate `routing` names)."""
    max_mmlu_drop: float = option("largest MMLU accuracy loss against base allowed, in points", default=0.5)
    routing: str = option("which gate: binary (base, lora, prism records) or kway (base, kway-lora, kway records)",
                          choices=ROUTINGS, default=ROUTINGS[0])

    def score(self, found: dict[str, Outcomes], threshold: float) -> float:
        total = 0.0
        if "mtbench_score" in found:
            total += value_at(found["mtbench_score"], threshold) / 10
        if "jbb_refusal_harmful" in found:
            total += value_at(found["jbb_refusal_harmful"], threshold)
        return total

    def allowed(self, found: dict[str, Outcomes], threshold: float) -> bool:
        if "mmlu_accuracy" not in found:
            return True
        mmlu = found["mmlu_accuracy"]
        return 100 * (value_at(mmlu, threshold) - sum(mmlu.base) / len(mmlu.base)) >= -self.max_mmlu_drop


def calibrate(run_path: str | Path, objective: Objective | None = None, save: bool = True) -> dict[str, Any]:
    """Pick the gate threshold that maximizes the objective on one half of the items, report it on the
    other; write eval/calibration.json (eval/calibration-kway.json for the k-way gate) and the threshold
    into the run's gate when `save`. The objective's `routing` names the gate: 'binary' or 'kway'."""
    run = RunDir(run_path)
    store = RunDir(run.path / EVAL_DIR)
    objective = objective or Objective()
    routing = objective.routing
    if routing not in ROUTINGS:
        raise PrismError(f"--routing must be binary or kway, got {routing!r}")
    if routing == "kway" and not (run.path / gate_dir(routing) / GATE_CONFIG).is_file():
        raise PrismError(f"{run.path} has no k-way gate: it was bootstrapped with --routing binary")
    everything = collect_outcomes(store, routing)
    systems = "base, kway-lora and kway" if routing == "kway" else "base, lora and prism"
    if not {"mtbench_score", "jbb_refusal_harmful"} & set(everything):
        raise PrismError(f"{store.path} has no MT-Bench or JBB records for {systems}: run "
                         f"`prism eval {run.path} --bench mtbench,jbb,mmlu` first")
    halves = {m: split_halves(o) for m, o in everything.items()}
    chosen_on = {m: pair[0] for m, pair in halves.items() if pair[0].ids}
    held_out = {m: pair[1] for m, pair in halves.items()}
    if not {"mtbench_score", "jbb_refusal_harmful"} & set(chosen_on):
        raise PrismError("too few MT-Bench or JBB items to choose a threshold on half of them and report it on the "
                         "other half: evaluate more items (a larger --limit)")
    candidates = _candidates([p for o in chosen_on.values() for p in o.probability])
    allowed = [t for t in candidates if objective.allowed(chosen_on, t)]
    if not allowed:
        raise PrismError("no threshold keeps MMLU within the allowed drop; even 'never persona' fails it")
    best = max(allowed, key=lambda t: (objective.score(chosen_on, t), t))  # ties: the higher threshold
    gate = run.manifest().get("stages", {}).get("gate", {})
    gate = gate.get("kway", {}) if routing == "kway" else gate
    result = {
        "routing": routing,
        "threshold": best, "objective": asdict(objective) | {"text": " ".join(Objective.__doc__.split())},
        "selection": SPLIT,
        "items": {m: {"selection": len(chosen_on[m].ids) if m in chosen_on else 0, "held_out": len(o.ids)}
                  for m, o in held_out.items()},
        "objective_value_selection": objective.score(chosen_on, best),
        "objective_value": objective.score(held_out, best),
        "at_threshold": {m: value_at(o, best) for m, o in held_out.items()},
        "share_routed": {m: sum(p >= best for p in o.probability) / len(o.probability) for m, o in held_out.items()},
        "gate_heldout_accuracy": gate.get("heldout_accuracy"), "gate_heldout_method": gate.get("heldout_method"),
        "curves": {m: routing_curve(o) for m, o in held_out.items()}, "saved": save,
    }
    write_json_atomic(store.path / calibration_file(routing), result)
    if save:
        save_threshold(run.path / gate_dir(routing), best)
    return result


def calibration_file(routing: str = ROUTINGS[0]) -> str:
    return "calibration-kway.json" if routing == "kway" else "calibration.json"


def load_calibration(run_path: str | Path, routing: str = ROUTINGS[0]) -> dict[str, Any] | None:
    path = Path(run_path) / EVAL_DIR / calibration_file(routing)
    return json.loads(path.read_text()) if path.is_file() else None


def format_calibration(result: dict[str, Any]) -> str:
    gate = "the k-way gate's " if result.get("routing") == "kway" else ""
    lines = [f"{gate}threshold {result['threshold']:.4f} ({'saved in the run' if result['saved'] else 'not saved'}); "
             f"objective: {result['objective']['text']}",
             f"  {result['selection']}; the figures below are the held-out half's"]
    for metric, value in result["at_threshold"].items():
        curve = result["curves"][metric]
        lines.append(f"  {metric:<20} {value:.3f} at this threshold (base {curve['base']:.3f}, always adapter "
                     f"{curve['adapter']:.3f}, oracle {curve['oracle']['value']:.3f}); "
                     f"{100 * result['share_routed'][metric]:.0f}% routed to the adapter, {curve['items']} items")
    held = result.get("gate_heldout_accuracy")
    lines.append(f"  gate held-out accuracy: {'n/a' if held is None else f'{held:.3f}'} "
                 f"({result.get('gate_heldout_method') or 'n/a'})")
    return "\n".join(lines)
