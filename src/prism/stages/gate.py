"""Stage 5: a small MLP on the base model's hidden state after block 0 (last prompt token, no persona)
that decides per query: base model (0) or adapter (1), trained on each query's persona win rate shrunk toward its
domain's (a soft target). Before it trains, a linear probe says how well that feature tells the run's domains
apart (no gate routes better than its input allows). A k-way run also trains one over base and each kept
persona's adapter (RUN/kway/gate), on the same features."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from prism.errors import PrismError
from prism.lm.batching import block0_features
from prism.lm.gate import GATE_CONFIG, Gate, GateConfig
from prism.lm.models import chat_prompt, gate_feature_model
from prism.runs import GATE_DIR, KWAY_GATE
from prism.stages import negatives
from prism.stages.context import StageContext
from prism.stages.records import read_labels
from prism.stages.verify import kway_classes, kway_label

log = logging.getLogger("prism")
SINGLE_SPLIT_MIN = 200  # below this many examples, held-out accuracy comes from k-fold


def class_weights(labels: torch.Tensor, num_classes: int = 2) -> torch.Tensor:
    """w_c = N / (C N_c), so every route counts equally however rare the persona wins are; `labels` are classes, or
    (N, C) class probabilities whose sums per class are the (soft) counts."""
    counts = labels.sum(0) if labels.is_floating_point() else torch.bincount(labels, minlength=num_classes).float()
    return len(labels) / (num_classes * counts.clamp(min=1))


def as_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, C) class probabilities: soft targets as given, hard classes one-hot."""
    if labels.is_floating_point():
        return labels
    return torch.nn.functional.one_hot(labels, num_classes).float()


def train_gate(features: torch.Tensor, labels: torch.Tensor, config: GateConfig, *, epochs: int, lr: float,
               seed: int, minibatch: int = 32) -> Gate:
    """The gate trained on `labels`: classes (long), or (N, C) class probabilities (the soft targets of win rates)."""
    torch.manual_seed(seed)
    gate = Gate(config)
    gate.mean.copy_(features.mean(0))
    gate.std.copy_(features.std(0).clamp(min=1e-4) if len(features) > 1 else torch.ones(features.shape[1]))
    targets = as_targets(labels, config.num_classes)
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(targets, config.num_classes))
    optimizer = torch.optim.AdamW(gate.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    gate.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(targets), generator=generator).split(minibatch):
            optimizer.zero_grad()
            loss_fn(gate(features[batch]), targets[batch]).backward()
            optimizer.step()
    return gate.eval()


def stratified_folds(labels: torch.Tensor, k: int, seed: int) -> list[torch.Tensor]:
    """The test indices of each of k stratified folds (scikit-learn's StratifiedKFold, shuffled by `seed`)."""
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [torch.tensor(sorted(test)) for _, test in splitter.split(labels.numpy().reshape(-1, 1), labels.numpy())]


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


def heldout_accuracy(features: torch.Tensor, labels: torch.Tensor, config: GateConfig, *, epochs: int, lr: float,
                     folds: int, seed: int,
                     targets_for: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Accuracy on examples the gate did not train on: one stratified 80/20 split on large data,
    k-fold cross-validation on small data; with the balanced accuracy and each class's recall. `labels` are the
    classes scored; `targets_for(train rows)` gives the training rows' targets (default: their labels), computed
    from the training rows alone."""
    minority = int(torch.bincount(labels, minlength=config.num_classes).min())
    if minority < 2:
        return {"heldout_accuracy": None, "heldout_method": "none (fewer than 2 examples of a class)"}
    k = 5 if len(labels) >= SINGLE_SPLIT_MIN else min(folds, minority)
    splits = stratified_folds(labels, k, seed)
    evaluate = splits[:1] if len(labels) >= SINGLE_SPLIT_MIN else splits
    correct = total = 0
    balanced = []
    hits, seen = torch.zeros(config.num_classes), torch.zeros(config.num_classes)
    for test in evaluate:
        train = torch.tensor(sorted(set(range(len(labels))) - set(test.tolist())))
        targets = targets_for(train) if targets_for is not None else labels[train]
        gate = train_gate(features[train], targets, config, epochs=epochs, lr=lr, seed=seed)
        predicted = gate.route(features[test])
        correct += int((predicted == labels[test]).sum())
        total += len(test)
        recalls = [float((predicted[labels[test] == c] == c).float().mean()) for c in range(config.num_classes)
                   if (labels[test] == c).any()]
        balanced.append(sum(recalls) / len(recalls))
        hits += torch.bincount(labels[test][predicted == labels[test]], minlength=config.num_classes)
        seen += torch.bincount(labels[test], minlength=config.num_classes)
    method = "stratified 80/20 split" if len(evaluate) == 1 else f"stratified {k}-fold cross-validation"
    names = config.classes or ["base", "persona"]
    return {"heldout_accuracy": correct / total, "heldout_balanced_accuracy": sum(balanced) / len(balanced),
            "heldout_recall": {name: float(h / n) for name, h, n in zip(names, hits, seen) if n},
            "heldout_method": method}


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
             directory: str, targets_for: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Train the gate on `labels` (or on the soft targets `targets_for(rows)` gives; held-out metrics first), save it
    under RUN/`directory`, return its metrics. Data of one class gives a constant gate (no features needed)."""
    cfg = ctx.config
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
    metrics = heldout_accuracy(features, labels, config, epochs=cfg.gate_epochs, lr=cfg.gate_lr,
                               folds=cfg.gate_folds, seed=cfg.seed, targets_for=targets_for)
    everything = torch.arange(len(labels))
    gate = train_gate(features, targets_for(everything) if targets_for is not None else labels, config,
                      epochs=cfg.gate_epochs, lr=cfg.gate_lr, seed=cfg.seed)
    gate.save(ctx.run.path / directory)
    train_accuracy = float((gate.route(features) == labels).float().mean())
    return {"kind": "mlp", "examples": len(labels), "positives": len(labels) - counts[0],
            "train_accuracy": train_accuracy, "majority_baseline": majority, **metrics}


NEGATIVES_DOMAIN = "(gold questions)"  # the clean negatives' group: their targets shrink toward 0, their own rate


def run(ctx: StageContext) -> dict:
    cfg, run_dir = ctx.config, ctx.run
    records = read_labels(run_dir)
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
    kway = kway_classes(records, cfg.kway_min_wins) if cfg.routing == "kway" else None
    kway_labels = torch.tensor([kway_label(r, kway[0]) for r in records] + [0] * len(extra)) if kway else None
    features = None
    if len(set(labelled)) > 1 or len(labels.unique()) > 1 or (kway_labels is not None
                                                               and len(kway_labels.unique()) > 1):
        prompts = [chat_prompt(ctx.model.tokenizer, q) for q in queries]
        feature_model = gate_feature_model(ctx.model, cfg.model, cfg.trust_remote_code)
        features = block0_features(feature_model, prompts, cfg.batch_size)
    if features is not None and len(set(labelled)) > 1:
        info["domain_separability"] = domain_separability(features[: len(records)], labelled, cfg.seed)
        warning = separability_warning(info["domain_separability"])
        if warning:
            log.warning(warning)
    hidden = ctx.model.model.config.hidden_size

    def soft_targets(rows: torch.Tensor) -> torch.Tensor:
        shrunk, _ = shrunk_win_rates(rates, samples, domains, cfg.gate_prior_strength, fit_rows=rows)
        return torch.stack([1 - shrunk[rows], shrunk[rows]], dim=1)

    _, domain_rates = shrunk_win_rates(rates, samples, domains, cfg.gate_prior_strength)
    targets_info = {"kind": "persona win rate shrunk toward its domain's", "prior_strength": cfg.gate_prior_strength,
                    "label_samples": int(samples.max()), "domain_win_rates": domain_rates}
    # a binary run turned k-way keeps its binary gate (and a threshold calibrated for it)
    kept = run_dir.manifest()["stages"].get("gate", {}).get("binary_gate")
    if kept and (run_dir.path / GATE_DIR / GATE_CONFIG).is_file():
        info.update(kept)
    else:
        info.update(fit_gate(ctx, features, labels, GateConfig(input_dim=hidden, hidden=cfg.gate_hidden,
                                                               dropout=cfg.gate_dropout), GATE_DIR, soft_targets),
                    targets=targets_info)
    if kway is not None and kway_labels is not None:
        classes, merged = kway
        config = GateConfig(input_dim=hidden, hidden=cfg.gate_hidden, dropout=cfg.gate_dropout, classes=classes)
        info["kway"] = {"classes": classes, "merged_into_base": merged, "min_wins": cfg.kway_min_wins,
                        "class_counts": torch.bincount(kway_labels, minlength=len(classes)).tolist(),
                        **fit_gate(ctx, features, kway_labels, config, KWAY_GATE)}
    return info
