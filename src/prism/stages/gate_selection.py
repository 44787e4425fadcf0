"""The gate's classifier, chosen by cross-validation on the run's own labels, and its threshold, chosen for gain.

A small family is tried (`CANDIDATES`: L2 logistic regression at three strengths, k nearest neighbours on the
standardized feature, the MLP, and a domain gate: a probe of the query's domain whose probabilities weigh each
domain's mean target), each fitted to soft targets (class probabilities). Nested cross-validation
(scikit-learn's splitters): an inner stratified k-fold picks the candidate with the lowest out-of-fold Brier score
against the targets; an outer repeated stratified k-fold scores that choice on rows it never saw (accuracy,
balanced accuracy, AUROC, with their spread over folds). The gate that ships is the candidate a repeated stratified
k-fold over every row picks; its threshold is chosen on that candidate's own out-of-fold probabilities (its scale,
not another kind's) to maximise the expected gain of the routed rows (persona win rate minus loss rate), base when
no threshold gains."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from prism.errors import PrismError
from prism.lm.gate import Gate, GateConfig

log = logging.getLogger("prism")
Targets = Callable[[torch.Tensor], torch.Tensor]  # training rows -> their (rows, classes) targets
Domains = list[str] | None  # each row's domain (None: not known, no domain gate)


@dataclass(frozen=True)
class Candidate:
    kind: str
    params: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kind + "".join(f" {k}={v:g}" for k, v in self.params.items())


CANDIDATES = (Candidate("logistic", {"C": 0.01}), Candidate("logistic", {"C": 0.1}), Candidate("logistic", {"C": 1.0}),
              Candidate("knn", {"neighbors": 5}), Candidate("knn", {"neighbors": 15}), Candidate("mlp"),
              Candidate("domain", {"C": 1.0}))
INNER_FOLDS, OUTER_REPEATS = 3, 3


def candidates_for(kind: str, domains: Domains = None) -> tuple[Candidate, ...]:
    """The family searched: every candidate ("auto") or those of one kind; the domain gate only where the rows
    come from at least two domains."""
    several = domains is not None and len(set(domains)) > 1
    if kind == "domain" and not several:
        raise PrismError("--gate-classifier domain tells the run's domains apart, and this run's labelled queries "
                         "come from one domain: use auto, logistic, knn or mlp")
    family = CANDIDATES if kind == "auto" else tuple(c for c in CANDIDATES if c.kind == kind)
    return tuple(c for c in family if c.kind != "domain" or several)


def _rows_of(domains: Domains, rows: torch.Tensor) -> Domains:
    return None if domains is None else [domains[i] for i in rows.tolist()]


def class_weights(targets: torch.Tensor) -> torch.Tensor:
    """w_c = N / (C N_c) from (N, C) class probabilities (their sums are the soft counts), so every route counts
    equally however rare the persona wins are."""
    return len(targets) / (targets.shape[1] * targets.sum(0).clamp(min=1))


def _standardized(gate: Gate, features: torch.Tensor) -> torch.Tensor:
    gate.mean.copy_(features.mean(0))
    gate.std.copy_(features.std(0).clamp(min=1e-4) if len(features) > 1 else torch.ones(features.shape[1]))
    return (features - gate.mean) / gate.std


def fit(candidate: Candidate, features: torch.Tensor, targets: torch.Tensor, config: GateConfig, *, epochs: int,
        lr: float, seed: int, domains: Domains = None, minibatch: int = 32) -> Gate:
    """A gate of `candidate`'s kind fitted to (N, C) class probabilities (the domain gate: and to each row's
    domain)."""
    names = None
    if candidate.kind == "domain":
        if domains is None:
            raise ValueError("the domain gate is fitted to each row's domain: pass domains")
        names = list(dict.fromkeys(domains))
    config = replace(config, kind=candidate.kind, neighbors=int(candidate.params.get("neighbors", 0)),
                     memory=len(features) if candidate.kind == "knn" else 0, domains=names)
    torch.manual_seed(seed)
    gate = Gate(config)
    standardized = _standardized(gate, features)
    if candidate.kind == "knn":
        gate.points.copy_(standardized)
        gate.targets.copy_(targets)
    elif candidate.kind == "logistic":
        rows, classes = targets.shape
        weights = (targets * class_weights(targets)).T.reshape(-1)
        labels = torch.arange(classes).repeat_interleave(rows)
        keep = weights > 0  # each row once per class, weighted by its probability of that class
        _fit_logistic(gate.net, standardized.repeat(classes, 1)[keep], labels[keep], weights[keep],
                      candidate.params["C"], seed)
    elif candidate.kind == "domain":
        assert names is not None and domains is not None
        index = torch.tensor([names.index(d) for d in domains])
        with torch.no_grad():
            gate.domain_targets.copy_(torch.stack([targets[index == i].mean(0) for i in range(len(names))]))
        if len(names) > 1:  # one domain: every query is of it, the gate its mean target
            _fit_logistic(gate.net, standardized, index, torch.ones(len(index)), candidate.params["C"], seed)
    else:
        _fit_mlp(gate, features, targets, epochs=epochs, lr=lr, seed=seed, minibatch=minibatch)
    return gate.eval()


def _fit_logistic(layer: nn.Linear, x: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, strength: float,
                  seed: int) -> None:
    """scikit-learn's L2 logistic regression of `labels` (class indices) on `x`, copied into `layer` (one row per
    class)."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=strength, max_iter=5000, random_state=seed)
    model.fit(x.numpy(), labels.numpy(), sample_weight=weights.numpy())
    classes = layer.out_features
    weight = torch.zeros(classes, x.shape[1])
    bias = torch.full((classes,), -30.0)  # a class no row has: never predicted
    coef = torch.tensor(model.coef_, dtype=torch.float32)
    intercept = torch.tensor(model.intercept_, dtype=torch.float32)
    present = torch.tensor(model.classes_)
    if len(present) == 2:  # scikit-learn keeps one row for two classes: logit(second) - logit(first)
        coef, intercept = torch.cat([torch.zeros_like(coef), coef]), torch.cat([torch.zeros(1), intercept])
    weight[present], bias[present] = coef, intercept
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)


def _fit_mlp(gate: Gate, features: torch.Tensor, targets: torch.Tensor, *, epochs: int, lr: float, seed: int,
             minibatch: int) -> None:
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(targets))
    optimizer = torch.optim.AdamW(gate.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    gate.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(targets), generator=generator).split(minibatch):
            optimizer.zero_grad()
            loss_fn(gate(features[batch]), targets[batch]).backward()
            optimizer.step()


def _splits(labels: torch.Tensor, k: int, seed: int, repeats: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.model_selection import RepeatedStratifiedKFold

    splitter = RepeatedStratifiedKFold(n_splits=k, n_repeats=repeats, random_state=seed)
    return [(torch.tensor(train), torch.tensor(test))
            for train, test in splitter.split(labels.numpy().reshape(-1, 1), labels.numpy())]


def folds_for(labels: torch.Tensor, wanted: int) -> int:
    """k for a stratified k-fold: `wanted`, at most the rarest class's count (0: fewer than 2 of a class)."""
    rarest = int(torch.bincount(labels).min()) if len(labels.unique()) > 1 else 0
    return min(wanted, rarest) if rarest >= 2 else 0


def _brier(probabilities: torch.Tensor, targets: torch.Tensor) -> float:
    """The Brier score against (soft) targets: a proper score that stays finite for a neighbour vote of 0 or 1."""
    return float(((probabilities - targets) ** 2).sum(1).mean())


def _cross_validate(candidate: Candidate, features: torch.Tensor, targets_for: Targets, config: GateConfig,
                    splits: list[tuple[torch.Tensor, torch.Tensor]], repeats: int, *, epochs: int, lr: float, seed: int,
                    domains: Domains) -> tuple[float, torch.Tensor]:
    """`candidate` fitted without each split's test rows: its mean Brier score on them, and each row's P(adapter)
    averaged over the `repeats` the splits hold."""
    losses, probability = [], torch.zeros(len(features))
    for train, test in splits:
        gate = fit(candidate, features[train], targets_for(train), config, epochs=epochs, lr=lr, seed=seed,
                   domains=_rows_of(domains, train))
        losses.append(_brier(gate.class_probabilities(features[test]), targets_for(test)))
        probability[test] += gate.persona_probability(features[test]) / repeats
    return sum(losses) / len(losses), probability


def select(features: torch.Tensor, labels: torch.Tensor, targets_for: Targets, config: GateConfig,
           candidates: tuple[Candidate, ...], *, epochs: int, lr: float, seed: int, domains: Domains = None,
           folds: int = INNER_FOLDS, repeats: int = 1) -> tuple[Candidate, dict[str, float], torch.Tensor | None]:
    """The candidate with the lowest out-of-fold Brier score on these rows (stratified k-fold on `labels`,
    repeated), each candidate's score, and the chosen one's out-of-fold P(adapter) per row. One candidate, or too
    few rows to fold: the first, unscored (None)."""
    k = folds_for(labels, folds)
    if len(candidates) == 1 or k < 2:
        return candidates[0], {}, None
    splits = _splits(labels, k, seed, repeats)
    scored = {c.name: _cross_validate(c, features, targets_for, config, splits, repeats, epochs=epochs, lr=lr,
                                      seed=seed, domains=domains) for c in candidates}
    best = min(candidates, key=lambda c: scored[c.name][0])
    return best, {name: brier for name, (brier, _) in scored.items()}, scored[best.name][1]


def out_of_fold(candidate: Candidate, features: torch.Tensor, labels: torch.Tensor, targets_for: Targets,
                config: GateConfig, *, folds: int, epochs: int, lr: float, seed: int, domains: Domains = None
                ) -> torch.Tensor | None:
    """Each row's P(adapter) from `candidate` fitted without it (stratified k-fold on `labels`, repeated
    OUTER_REPEATS times, averaged): what a threshold for the gate of that kind is chosen on. None: too few rows."""
    k = folds_for(labels, folds)
    if k < 2:
        return None
    return _cross_validate(candidate, features, targets_for, config, _splits(labels, k, seed, OUTER_REPEATS),
                           OUTER_REPEATS, epochs=epochs, lr=lr, seed=seed, domains=domains)[1]


def choose(features: torch.Tensor, labels: torch.Tensor, targets_for: Targets, config: GateConfig,
           candidates: tuple[Candidate, ...], *, folds: int, epochs: int, lr: float, seed: int,
           domains: Domains = None) -> tuple[Candidate, dict[str, float], torch.Tensor | None]:
    """The gate that ships: the candidate a repeated stratified k-fold over every row picks, each candidate's
    score, and the chosen one's own out-of-fold P(adapter) (from the same folds that scored it), which its
    threshold is chosen on (None: too few rows)."""
    training = {"epochs": epochs, "lr": lr, "seed": seed, "domains": domains}
    candidate, scores, oof = select(features, labels, targets_for, config, candidates, folds=folds,
                                    repeats=OUTER_REPEATS, **training)
    if oof is None:  # a family of one is not scored to be chosen, only for its threshold
        oof = out_of_fold(candidate, features, labels, targets_for, config, folds=folds, **training)
    return candidate, scores, oof


def threshold_for_gain(probabilities: torch.Tensor, gains: torch.Tensor) -> dict[str, Any]:
    """The threshold on P(adapter) that maximises the summed gain of the rows it routes to the adapter (ties: the
    higher threshold, so base when unsure); midway between two rows' probabilities. Routing nothing gains 0."""
    order = torch.argsort(probabilities, descending=True)
    ranked, cumulative = probabilities[order], gains[order].cumsum(0)
    best_gain, best_count = 0.0, 0
    for count in range(1, len(ranked) + 1):
        if count < len(ranked) and ranked[count] == ranked[count - 1]:
            continue  # a threshold cannot split equal probabilities
        if float(cumulative[count - 1]) > best_gain + 1e-9:
            best_gain, best_count = float(cumulative[count - 1]), count
    if best_count == 0:
        threshold = 1.0
    elif best_count == len(ranked):
        threshold = float(ranked[-1]) / 2
    else:
        threshold = float(ranked[best_count - 1] + ranked[best_count]) / 2
    n = len(gains)
    return {"threshold": threshold, "oof_gain_per_query": best_gain / n, "oof_routed_share": best_count / n,
            "oof_gain_all_adapter": float(gains.sum()) / n, "oof_gain_all_base": 0.0}


def _interval(values: list[float]) -> list[float]:
    ordered = sorted(values)
    low = ordered[int(0.025 * (len(ordered) - 1))]
    high = ordered[round(0.975 * (len(ordered) - 1))]
    return [low, high]


def nested_cv(features: torch.Tensor, labels: torch.Tensor, targets_for: Targets, config: GateConfig,
              candidates: tuple[Candidate, ...], *, folds: int, epochs: int, lr: float, seed: int,
              domains: Domains = None) -> dict[str, Any]:
    """Held-out scores of the selection itself (outer repeated stratified k-fold, the choice made inside each
    training part)."""
    from sklearn.metrics import roc_auc_score

    k = folds_for(labels, folds)
    if k < 2:
        return {"heldout_accuracy": None, "heldout_method": "none (fewer than 2 examples of a class)"}
    names = config.classes or ["base", "persona"]
    accuracy, balanced, auroc, chosen = [], [], [], []
    hits, seen = torch.zeros(config.num_classes), torch.zeros(config.num_classes)
    for train, test in _splits(labels, k, seed, OUTER_REPEATS):
        training = _rows_of(domains, train)
        candidate, _, _ = select(features[train], labels[train], lambda rows, t=train: targets_for(t[rows]), config,
                                 candidates, epochs=epochs, lr=lr, seed=seed, domains=training)
        chosen.append(candidate.name)
        gate = fit(candidate, features[train], targets_for(train), config, epochs=epochs, lr=lr, seed=seed,
                   domains=training)
        probability, predicted = gate.decide_tensors(features[test])
        truth = labels[test]
        accuracy.append(float((predicted == truth).float().mean()))
        recalls = [float((predicted[truth == c] == c).float().mean()) for c in range(config.num_classes)
                   if (truth == c).any()]
        balanced.append(sum(recalls) / len(recalls))
        if len((truth > 0).unique()) == 2:
            auroc.append(float(roc_auc_score((truth > 0).numpy(), probability.numpy())))
        hits += torch.bincount(truth[predicted == truth], minlength=config.num_classes)
        seen += torch.bincount(truth, minlength=config.num_classes)

    def summary(values: list[float]) -> dict[str, Any]:
        return {"mean": sum(values) / len(values), "interval": _interval(values)} if values else {}

    return {"heldout_accuracy": summary(accuracy)["mean"],
            "heldout_balanced_accuracy": summary(balanced)["mean"],
            "heldout_auroc": summary(auroc).get("mean"),
            "heldout_intervals": {"accuracy": summary(accuracy)["interval"],
                                  "balanced_accuracy": summary(balanced)["interval"],
                                  "auroc": summary(auroc).get("interval")},
            "heldout_recall": {name: float(h / n) for name, h, n in zip(names, hits, seen) if n},
            "heldout_method": (f"nested cross-validation: classifier chosen by an inner stratified "
                               f"{INNER_FOLDS}-fold, scored by an outer stratified {k}-fold repeated {OUTER_REPEATS}x; "
                               "accuracies at threshold 0.5; intervals: 2.5-97.5% of the outer folds' scores"),
            "outer_choices": {name: chosen.count(name) for name in dict.fromkeys(chosen)}}
