"""Stage 5: a small classifier on the base model's hidden state after block `gate_layer` (pooled over the prompt, no
persona) that decides per query: base model (0) or adapter (1), trained on each query's persona win rate shrunk
toward its domain's (a soft target); its kind chosen and its threshold set by cross-validation
(prism.stages.gate_selection). Before it trains, a linear probe says how well that feature tells the run's domains
apart (no gate routes better than its input allows). A k-way run also trains one over base and each kept
persona's adapter (RUN/kway/gate), on the same features."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace
from typing import Any

import torch

from prism.errors import PrismError
from prism.lm.batching import gate_features
from prism.lm.gate import GATE_CONFIG, Gate, GateConfig, feature_description
from prism.lm.models import chat_prompt, decoder_layers, gate_feature_model
from prism.runs import GATE_DIR, KWAY_GATE, RunDir
from prism.stages import negatives
from prism.stages.context import StageContext
from prism.stages.gate_selection import Targets, candidates_for, choose, fit, nested_cv, threshold_for_gain
from prism.stages.records import read_labels
from prism.stages.verify import kway_classes, kway_label

log = logging.getLogger("prism")


def as_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, C) class probabilities: soft targets as given, hard classes one-hot."""
    if labels.is_floating_point():
        return labels
    return torch.nn.functional.one_hot(labels, num_classes).float()


def shrunk_win_rates(rates: torch.Tensor, samples: torch.Tensor, domains: list[str], strength: float,
                     fit_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Each query's persona win rate shrunk toward its domain's mean rate: (K r + m d) / (K + m), K its answer pairs,
    m `strength`. A query's own rate rests on K coin flips; its domain's on many queries. The domain means come from
    `fit_rows` only (a training fold), or from every row; a domain with no row there keeps the query's own rate."""
    fit = range(len(rates)) if fit_rows is None else fit_rows.tolist()
    totals: dict[str, list[float]] = {}
    for i in fit:
        totals.setdefault(domains[i], []).append(float(rates[i]))
    means = {d: sum(v) / len(v) for d, v in totals.items()}
    prior = torch.tensor([means.get(d, float(rates[i])) for i, d in enumerate(domains)])
    return (samples * rates + strength * prior) / (samples + strength), means


def shrunk_targets(rates: torch.Tensor, samples: torch.Tensor, domains: list[str], strength: float) -> Targets:
    """The gate's soft targets of some rows: (1 - r, r) with r their win rates shrunk toward their domains' means,
    the means taken over those rows alone (a training fold never sees its test rows' rates)."""
    def targets_for(rows: torch.Tensor) -> torch.Tensor:
        shrunk, _ = shrunk_win_rates(rates, samples, domains, strength, fit_rows=rows)
        return torch.stack([1 - shrunk[rows], shrunk[rows]], dim=1)

    return targets_for


def domain_rate_auroc(labels: torch.Tensor, domains: list[str], domain_rates: dict[str, float]) -> float | None:
    """The AUROC of scoring every query by its domain's win rate, against the gate's labels: what a router that knew
    each query's domain and nothing else would reach (in-sample). Within a domain such a router cannot rank, so a
    gate that routes by domain is bounded near it, however well it tells the domains apart."""
    from sklearn.metrics import roc_auc_score

    if len(labels.unique()) < 2:
        return None
    return float(roc_auc_score(labels.numpy(), [domain_rates[d] for d in domains]))


SEPARABILITY_FOLDS = 5
# Below chance + this share of the way to 1, a probe barely tells the domains apart: the gate cannot either.
NEAR_CHANCE_SHARE = 0.25
CONFUSED_SHARE = 0.25  # a pair of domains is named as confused when this share of their queries is mistaken


def domain_separability(features: torch.Tensor, domains: list[str], seed: int) -> dict[str, Any]:
    """How well the gate's feature tells the run's domains apart, before anything is trained on them: the
    out-of-fold accuracy of a linear probe (standardized features, L2 logistic regression, stratified k-fold;
    scikit-learn) that predicts each query's domain, beside chance (the largest domain's share), and the pairs of
    domains it confuses."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    names = list(dict.fromkeys(domains))
    counts = Counter(domains)
    folds = min(SEPARABILITY_FOLDS, min(counts.values()))
    chance = max(counts.values()) / len(domains)
    if len(names) < 2 or folds < 2:
        return {"accuracy": None, "chance": chance, "domains": len(names),
                "why": "one domain" if len(names) < 2 else "a domain has fewer than 2 queries"}
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
    predicted = cross_val_predict(probe, features.numpy(), domains,
                                  cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    accuracy = sum(p == d for p, d in zip(predicted, domains)) / len(domains)
    confused = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            mistaken = sum((d, p) in ((a, b), (b, a)) for d, p in zip(domains, predicted))
            share = mistaken / (counts[a] + counts[b])
            if share >= CONFUSED_SHARE:
                confused.append({"domains": [a, b], "mistaken_share": share})
    confused.sort(key=lambda c: -c["mistaken_share"])
    return {"accuracy": accuracy, "chance": chance, "domains": len(names), "queries": len(domains),
            "method": f"L2 logistic regression on the standardized gate feature, stratified {folds}-fold, out-of-fold",
            "near_chance": accuracy < chance + NEAR_CHANCE_SHARE * (1 - chance), "confused": confused}


def separability_warning(separability: dict[str, Any] | None) -> str | None:
    """One plain sentence when the gate's feature barely tells the domains apart, else None."""
    if not separability or not separability.get("near_chance"):
        return None
    pairs = "; ".join(" and ".join(c["domains"]) for c in separability["confused"]) or "all of them"
    return (f"warning: a probe tells the run's domains apart from the gate's feature only at "
            f"{separability['accuracy']:.2f} out-of-fold (chance {separability['chance']:.2f}), confusing {pairs}: no "
            "gate can route between these domains: give example queries (domains: {name: {examples: [...]}} in the "
            "config, or --examples FILE) or real ones (--queries FILE)")


def fit_gate(ctx: StageContext, features: torch.Tensor | None, labels: torch.Tensor, config: GateConfig,
             directory: str, targets_for: Targets | None = None, gains: torch.Tensor | None = None,
             domains: list[str] | None = None) -> dict:
    """Choose the gate's classifier by cross-validation on `labels` (fitted to the soft targets `targets_for(rows)`
    gives, or to the labels; the domain gate also to each row's `domains`), score that choice on rows it never saw,
    pick the threshold that maximises the chosen classifier's out-of-fold `gains` of the routed rows (binary; none
    given: 0.5), fit on every row and save it under RUN/`directory`; return its metrics. Data of one class gives a
    constant gate (no features needed)."""
    cfg = ctx.config
    if targets_for is None:
        def targets_for(rows: torch.Tensor) -> torch.Tensor:
            return as_targets(labels[rows], config.num_classes)
    counts = torch.bincount(labels, minlength=config.num_classes).tolist()
    majority = max(counts) / len(labels)
    if sum(c > 0 for c in counts) == 1:
        config.constant_route = int(labels[0])
        route = (config.classes or ["the base model", "the adapter"])[config.constant_route]
        log.warning("every query has class %d: the gate in %s routes everything to %s", config.constant_route,
                    directory, route)
        Gate(config).save(ctx.run.path / directory)
        return {"kind": "constant", "constant_route": config.constant_route, "examples": len(labels),
                "train_accuracy": 1.0, "heldout_accuracy": None, "majority_baseline": majority}
    assert features is not None
    family = candidates_for(cfg.gate_classifier, domains)
    training = {"epochs": cfg.gate_epochs, "lr": cfg.gate_lr, "seed": cfg.seed, "domains": domains}
    metrics = nested_cv(features, labels, targets_for, config, family, folds=cfg.gate_folds, **training)
    everything = torch.arange(len(labels))
    candidate, scores, oof = choose(features, labels, targets_for, config, family, folds=cfg.gate_folds, **training)
    threshold: dict[str, Any] = {"threshold": config.threshold, "chosen_by": "default"}
    if gains is not None and oof is not None:
        threshold = {**threshold_for_gain(oof, gains),
                     "chosen_by": f"the expected gain of the {candidate.name} gate's out-of-fold probabilities"}
    gate = fit(candidate, features, targets_for(everything), replace(config, threshold=threshold["threshold"]),
               **training)
    gate.save(ctx.run.path / directory)
    train_accuracy = float((gate.route(features) == labels).float().mean())
    return {"kind": candidate.kind, "classifier": {"chosen": candidate.name, "cv_brier": scores},
            "threshold": threshold, "examples": len(labels), "positives": len(labels) - counts[0],
            "train_accuracy": train_accuracy, "majority_baseline": majority, **metrics}


NEGATIVES_DOMAIN = "(gold questions)"  # the clean negatives' group: their targets shrink toward 0, their own rate


def learns_from(run_dir: RunDir) -> str:
    """The labels the binary gate learns from: the adapter's own outcomes when the adapter_outcomes stage made
    them, else the teacher's verdicts."""
    return "adapter_labels" if run_dir.stage_status("adapter_outcomes") == "done" else "labels"


def run(ctx: StageContext) -> dict:
    cfg, run_dir = ctx.config, ctx.run
    source = learns_from(run_dir)
    records = read_labels(run_dir, source)
    teacher = records if source == "labels" else read_labels(run_dir)  # the k-way classes are the teacher's
    if not records:
        raise PrismError("the gate has no labelled queries to learn from: the verify stage produced none")
    info: dict[str, Any] = {}
    negative_info = negatives.run(ctx)
    extra = negatives.base_examples(ctx) if negative_info else []
    if negative_info:
        info["negatives"] = negative_info
    queries = [r.query for r in records] + extra
    rates = torch.tensor([r.persona_win_rate for r in records] + [0.0] * len(extra))
    samples = torch.tensor([float(r.samples) for r in records] + [1.0] * len(extra))
    domains = [r.domain for r in records] + [NEGATIVES_DOMAIN] * len(extra)
    labelled = [r.domain for r in records]
    # the gate's class: the persona does better than base on this query (its win rate, ties half, above 0.5)
    labels = (rates > 0.5).long()
    kway = kway_classes(teacher, cfg.kway_min_wins) if cfg.routing == "kway" else None
    kway_labels = torch.tensor([kway_label(r, kway[0]) for r in teacher] + [0] * len(extra)) if kway else None
    layer = cfg.gate_layer_of(len(decoder_layers(ctx.model.model)))
    info["layer"], info["pool"] = layer, cfg.gate_pool
    features = None
    if len(set(labelled)) > 1 or len(labels.unique()) > 1 or (kway_labels is not None
                                                               and len(kway_labels.unique()) > 1):
        prompts = [chat_prompt(ctx.model.tokenizer, q) for q in queries]
        feature_model = gate_feature_model(ctx.model, cfg.model, cfg.trust_remote_code, layer)
        features = gate_features(feature_model, prompts, layer, cfg.gate_pool, cfg.batch_size)
    if features is not None and len(set(labelled)) > 1:
        info["domain_separability"] = domain_separability(features[: len(records)], labelled, cfg.seed)
        warning = separability_warning(info["domain_separability"])
        if warning:
            log.warning(warning)
    base_config = GateConfig(input_dim=ctx.model.model.config.hidden_size, hidden=cfg.gate_hidden,
                             dropout=cfg.gate_dropout, layer=layer, pool=cfg.gate_pool,
                             feature=feature_description(layer, cfg.gate_pool))

    soft_targets = shrunk_targets(rates, samples, domains, cfg.gate_prior_strength)
    shrunk, domain_rates = shrunk_win_rates(rates, samples, domains, cfg.gate_prior_strength)
    won = "adapter's" if source == "adapter_labels" else "persona's"
    targets_info = {"kind": f"the {won} win rate against plain, shrunk toward its domain's", "labels": source,
                    "prior_strength": cfg.gate_prior_strength,
                    "label_samples": int(samples.max()), "domain_win_rates": domain_rates,
                    "domain_rate_auroc": domain_rate_auroc(labels, domains, domain_rates)}
    # a binary run turned k-way keeps its binary gate (and a threshold calibrated for it)
    kept = run_dir.manifest()["stages"].get("gate", {}).get("binary_gate")
    if kept and (run_dir.path / GATE_DIR / GATE_CONFIG).is_file():
        info.update(kept)
    else:
        # routing a query to the adapter gains its wins and costs its losses: win rate (ties half) - loss rate, from
        # the rate shrunk toward its domain's (a tie in a domain the persona loses is no free pass to the adapter)
        info.update(fit_gate(ctx, features, labels, base_config, GATE_DIR, soft_targets, gains=2 * shrunk - 1,
                             domains=domains), targets=targets_info)
    if kway is not None and kway_labels is not None:
        classes, merged = kway
        config = replace(base_config, classes=classes)
        info["kway"] = {"classes": classes, "merged_into_base": merged, "min_wins": cfg.kway_min_wins,
                        "class_counts": torch.bincount(kway_labels, minlength=len(classes)).tolist(),
                        **fit_gate(ctx, features, kway_labels, config, KWAY_GATE, domains=domains)}
    return info
