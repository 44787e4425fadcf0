"""Which gate feature to read: a finished run's own labels, scored for each decoder block and pooling.

For each (layer, pool) it computes the gate feature of the run's labelled queries, then runs the gate stage's own
selection (nested cross-validation over the classifier family, soft targets shrunk toward each domain's rate) and
reports the out-of-fold AUROC, balanced accuracy, the domain probe's accuracy and the expected gain per query at the
threshold chosen out of fold. No generation: only the run's records and the base model's first blocks.

    .venv/bin/python benchmarks/gate_features.py RUN [--layers 0,2,4,8,15] [--pools mean,last] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from prism.config import with_new_defaults
from prism.errors import PrismError
from prism.library_warnings import silence_library_warnings
from prism.lm.batching import gate_features
from prism.lm.gate import GateConfig
from prism.lm.models import chat_prompt, load_first_blocks
from prism.runs import RunDir
from prism.stages.gate import domain_separability, shrunk_targets, shrunk_win_rates
from prism.stages.gate_selection import candidates_for, choose, nested_cv, threshold_for_gain
from prism.stages.records import read_labels


def score_features(run: Path, layers: list[int], pools: list[str]) -> list[dict[str, Any]]:
    config = with_new_defaults(RunDir(run).manifest()["config"])
    records = read_labels(RunDir(run))
    if not records:
        raise PrismError(f"{run} has no labels: run the bootstrap up to its verify stage first")
    rates = torch.tensor([r.persona_win_rate for r in records])
    samples = torch.tensor([float(r.samples) for r in records])
    domains = [r.domain for r in records]
    labels = (rates > 0.5).long()

    targets_for = shrunk_targets(rates, samples, domains, config["gate_prior_strength"])
    lm = load_first_blocks(config["model"], device="cpu", layer=max(layers))
    prompts = [chat_prompt(lm.tokenizer, r.query) for r in records]
    rows = []
    for layer in layers:
        for pool in pools:
            started = time.perf_counter()
            features = gate_features(lm, prompts, layer, pool)
            feature_seconds = time.perf_counter() - started
            gate = GateConfig(input_dim=features.shape[1], layer=layer, pool=pool)
            family = candidates_for("auto", domains)
            training = {"epochs": config["gate_epochs"], "lr": config["gate_lr"], "seed": config["seed"],
                        "domains": domains}
            scored = nested_cv(features, labels, targets_for, gate, family, folds=5, **training)
            _, _, oof = choose(features, labels, targets_for, gate, family, folds=5, **training)
            shrunk, _ = shrunk_win_rates(rates, samples, domains, config["gate_prior_strength"])
            gain = threshold_for_gain(oof, 2 * shrunk - 1) if oof is not None else {}
            routed = (oof >= gain["threshold"]) if oof is not None else torch.zeros(len(domains), dtype=torch.bool)
            by_domain = {d: float(routed[[i for i, x in enumerate(domains) if x == d]].float().mean())
                         for d in dict.fromkeys(domains)}
            separability = domain_separability(features, domains, config["seed"]) if len(set(domains)) > 1 else {}
            rows.append({"layer": layer, "pool": pool, "auroc": scored.get("heldout_auroc"),
                         "balanced_accuracy": scored.get("heldout_balanced_accuracy"),
                         "accuracy": scored.get("heldout_accuracy"), "choices": scored.get("outer_choices"),
                         "oof_gain_per_query": gain.get("oof_gain_per_query"), "oof_routed_by_domain": by_domain,
                         "domain_probe": separability.get("accuracy"),
                         "feature_ms_per_query": 1000 * feature_seconds / len(prompts)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--layers", default="0,2,4,8,15")
    parser.add_argument("--pools", default="mean,last")
    parser.add_argument("--json")
    args = parser.parse_args()
    silence_library_warnings()
    torch.manual_seed(0)
    try:
        rows = score_features(Path(args.run), [int(x) for x in args.layers.split(",")], args.pools.split(","))
    except PrismError as exc:
        raise SystemExit(f"gate_features: error: {exc}") from None
    print(f"{'layer':>5} {'pool':>5} {'AUROC':>6} {'bal.acc':>7} {'probe':>6} {'gain/q':>7} {'ms/query':>8}  choices")
    for r in rows:
        def cell(value: float | None, width: int) -> str:
            return f"{value:>{width}.3f}" if value is not None else f"{'n/a':>{width}}"
        print(f"{r['layer']:>5} {r['pool']:>5} {cell(r['auroc'], 6)} {cell(r['balanced_accuracy'], 7)} "
              f"{cell(r['domain_probe'], 6)} {cell(r['oof_gain_per_query'], 7)} {r['feature_ms_per_query']:>8.1f}  "
              f"{r['choices']}; routed out of fold: "
              + ", ".join(f"{d} {100 * v:.0f}%" for d, v in r["oof_routed_by_domain"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
