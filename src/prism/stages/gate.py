"""Stage 5: a small MLP on the base model's hidden state after block 0 (last prompt token, no persona)
that decides per query: base model (0) or adapter (1). A k-way run also trains one over base and each kept
persona's adapter (RUN/kway/gate), on the same features."""

from __future__ import annotations

import logging

import torch
from torch import nn

from prism.errors import PrismError
from prism.lm.batching import block0_features
from prism.lm.gate import GATE_CONFIG, Gate, GateConfig
from prism.lm.models import chat_prompt, gate_feature_model
from prism.runs import GATE_DIR, KWAY_GATE
from prism.stages.context import StageContext
from prism.stages.records import read_labels
from prism.stages.verify import kway_classes, kway_label

log = logging.getLogger("prism")
SINGLE_SPLIT_MIN = 200  # below this many examples, held-out accuracy comes from k-fold


def class_weights(labels: torch.Tensor, num_classes: int = 2) -> torch.Tensor:
    """w_c = N / (C N_c), so every route counts equally however rare the persona wins are."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    return len(labels) / (num_classes * counts.clamp(min=1))


def train_gate(features: torch.Tensor, labels: torch.Tensor, config: GateConfig, *, epochs: int, lr: float,
               seed: int, minibatch: int = 32) -> Gate:
    torch.manual_seed(seed)
    gate = Gate(config)
    gate.mean.copy_(features.mean(0))
    gate.std.copy_(features.std(0).clamp(min=1e-4) if len(features) > 1 else torch.ones(features.shape[1]))
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(labels, config.num_classes))
    optimizer = torch.optim.AdamW(gate.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    gate.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=generator).split(minibatch):
            optimizer.zero_grad()
            loss_fn(gate(features[batch]), labels[batch]).backward()
            optimizer.step()
    return gate.eval()


def stratified_folds(labels: torch.Tensor, k: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    for cls in labels.unique().tolist():
        members = (labels == cls).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        for i, index in enumerate(members.tolist()):
            folds[i % k].append(index)
    return [torch.tensor(sorted(f)) for f in folds]


def heldout_accuracy(features: torch.Tensor, labels: torch.Tensor, config: GateConfig, *, epochs: int, lr: float,
                     folds: int, seed: int) -> dict:
    """Accuracy on examples the gate did not train on: one stratified 80/20 split on large data,
    k-fold cross-validation on small data; with the balanced accuracy and each class's recall."""
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
        gate = train_gate(features[train], labels[train], config, epochs=epochs, lr=lr, seed=seed)
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


def fit_gate(ctx: StageContext, features: torch.Tensor | None, labels: torch.Tensor, config: GateConfig,
             directory: str) -> dict:
    """Train the gate on `labels` (held-out metrics first), save it under RUN/`directory`, return its metrics.
    Data of one class gives a constant gate (no features needed)."""
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
                               folds=cfg.gate_folds, seed=cfg.seed)
    gate = train_gate(features, labels, config, epochs=cfg.gate_epochs, lr=cfg.gate_lr, seed=cfg.seed)
    gate.save(ctx.run.path / directory)
    train_accuracy = float((gate.route(features) == labels).float().mean())
    return {"kind": "mlp", "examples": len(labels), "positives": len(labels) - counts[0],
            "train_accuracy": train_accuracy, "majority_baseline": majority, **metrics}


def run(ctx: StageContext) -> dict:
    cfg, run_dir = ctx.config, ctx.run
    records = read_labels(run_dir)
    if not records:
        raise PrismError("the gate has no labelled queries to learn from: the verify stage produced none")
    labels = torch.tensor([r.label for r in records])
    kway = kway_classes(records, cfg.kway_min_wins) if cfg.routing == "kway" else None
    kway_labels = torch.tensor([kway_label(r, kway[0]) for r in records]) if kway else None
    features = None
    if len(labels.unique()) > 1 or (kway_labels is not None and len(kway_labels.unique()) > 1):
        prompts = [chat_prompt(ctx.model.tokenizer, r.query) for r in records]
        feature_model = gate_feature_model(ctx.model, cfg.model, cfg.trust_remote_code)
        features = block0_features(feature_model, prompts, cfg.batch_size)
    hidden = ctx.model.model.config.hidden_size
    # a binary run turned k-way keeps its binary gate (and a threshold calibrated for it)
    kept = run_dir.manifest()["stages"].get("gate", {}).get("binary_gate")
    if kept and (run_dir.path / GATE_DIR / GATE_CONFIG).is_file():
        info = kept
    else:
        info = fit_gate(ctx, features, labels, GateConfig(input_dim=hidden, hidden=cfg.gate_hidden,
                                                          dropout=cfg.gate_dropout), GATE_DIR)
    if kway is not None and kway_labels is not None:
        classes, merged = kway
        config = GateConfig(input_dim=hidden, hidden=cfg.gate_hidden, dropout=cfg.gate_dropout, classes=classes)
        info["kway"] = {"classes": classes, "merged_into_base": merged, "min_wins": cfg.kway_min_wins,
                        "class_counts": torch.bincount(kway_labels, minlength=len(classes)).tolist(),
                        **fit_gate(ctx, features, kway_labels, config, KWAY_GATE)}
    return info
