"""Stage 5: a small MLP on the base model's hidden state after block 0 (last prompt token, no persona)
that decides per query: base model (0) or adapter (1)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from prism.engine import block0_features
from prism.errors import PrismError
from prism.models import chat_prompt, gate_feature_model
from prism.runs import StageContext, write_json_atomic

log = logging.getLogger("prism")
FEATURE = ("hidden state after decoder block 0 (hidden_states[1]) at the last token of the base chat prompt, "
           "embeddings and block 0 computed in float32")
SINGLE_SPLIT_MIN = 200  # below this many examples, held-out accuracy comes from k-fold


@dataclass
class GateConfig:
    input_dim: int
    hidden: int = 256
    dropout: float = 0.1
    threshold: float = 0.5
    constant_route: int | None = None  # set when the data held one class only: no MLP, a fixed route
    feature: str = FEATURE


class Gate(nn.Module):
    def __init__(self, config: GateConfig):
        super().__init__()
        self.config = config
        # Block-0 states have a few huge dimensions; standardizing keeps them from swamping the MLP.
        self.register_buffer("mean", torch.zeros(config.input_dim))
        self.register_buffer("std", torch.ones(config.input_dim))
        self.net = nn.Sequential(
            nn.Linear(config.input_dim, config.hidden),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, 2),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.std)

    @torch.no_grad()
    def persona_probability(self, features: torch.Tensor) -> torch.Tensor:
        if self.config.constant_route is not None:
            return torch.full((features.shape[0],), float(self.config.constant_route))
        self.eval()
        return torch.softmax(self(features.float()), dim=-1)[:, 1]

    def route(self, features: torch.Tensor) -> torch.Tensor:
        return (self.persona_probability(features) >= self.config.threshold).long()

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / "gate.safetensors"))
        (directory / "config.json").write_text(json.dumps(asdict(self.config), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> Gate:
        directory = Path(directory)
        try:
            config = GateConfig(**json.loads((directory / "config.json").read_text()))
            gate = cls(config)
            gate.load_state_dict(load_file(str(directory / "gate.safetensors")))
        except (OSError, ValueError, TypeError, RuntimeError) as exc:
            raise PrismError(f"cannot load the gate from {directory}: {exc}") from None
        return gate.eval()


def save_threshold(directory: str | Path, threshold: float) -> None:
    """Set the saved gate's routing threshold (P(persona) >= threshold goes to the adapter)."""
    if not 0.0 <= threshold <= 1.0:
        raise PrismError(f"the gate threshold is a probability: pass a value in [0, 1], got {threshold}")
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PrismError(f"cannot read the gate config {path}: {exc}") from None
    config["threshold"] = threshold
    write_json_atomic(path, config)


def class_weights(labels: torch.Tensor) -> torch.Tensor:
    """w_c = N / (2 N_c), so both routes count equally however rare the persona wins are."""
    counts = torch.bincount(labels, minlength=2).float()
    return len(labels) / (2 * counts.clamp(min=1))


def train_gate(features: torch.Tensor, labels: torch.Tensor, config: GateConfig, *, epochs: int, lr: float,
               seed: int, batch_size: int = 32) -> Gate:
    torch.manual_seed(seed)
    gate = Gate(config)
    gate.mean.copy_(features.mean(0))
    gate.std.copy_(features.std(0).clamp(min=1e-4) if len(features) > 1 else torch.ones(features.shape[1]))
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(labels))
    optimizer = torch.optim.AdamW(gate.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    gate.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=generator).split(batch_size):
            optimizer.zero_grad()
            loss_fn(gate(features[batch]), labels[batch]).backward()
            optimizer.step()
    return gate.eval()


def stratified_folds(labels: torch.Tensor, k: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    for cls in (0, 1):
        members = (labels == cls).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        for i, index in enumerate(members.tolist()):
            folds[i % k].append(index)
    return [torch.tensor(sorted(f)) for f in folds]


def heldout_accuracy(features: torch.Tensor, labels: torch.Tensor, config: GateConfig, *, epochs: int, lr: float,
                     folds: int, seed: int) -> dict:
    """Accuracy on examples the gate did not train on: one stratified 80/20 split on large data,
    k-fold cross-validation on small data."""
    minority = int(torch.bincount(labels, minlength=2).min())
    if minority < 2:
        return {"heldout_accuracy": None, "heldout_method": "none (fewer than 2 examples of a class)"}
    k = 5 if len(labels) >= SINGLE_SPLIT_MIN else min(folds, minority)
    splits = stratified_folds(labels, k, seed)
    evaluate = splits[:1] if len(labels) >= SINGLE_SPLIT_MIN else splits
    correct = total = 0
    balanced = []
    for test in evaluate:
        train = torch.tensor(sorted(set(range(len(labels))) - set(test.tolist())))
        gate = train_gate(features[train], labels[train], config, epochs=epochs, lr=lr, seed=seed)
        predicted = gate.route(features[test])
        correct += int((predicted == labels[test]).sum())
        total += len(test)
        recalls = [float((predicted[labels[test] == c] == c).float().mean()) for c in (0, 1)
                   if (labels[test] == c).any()]
        balanced.append(sum(recalls) / len(recalls))
    method = "stratified 80/20 split" if len(evaluate) == 1 else f"stratified {k}-fold cross-validation"
    return {"heldout_accuracy": correct / total, "heldout_balanced_accuracy": sum(balanced) / len(balanced),
            "heldout_method": method}


def run(ctx: StageContext) -> dict:
    cfg, run_dir = ctx.config, ctx.run
    records = run_dir.read("labels")
    if not records:
        raise PrismError("the gate has no labelled queries to learn from: the verify stage produced none")
    labels = torch.tensor([r["label"] for r in records])
    config = GateConfig(input_dim=ctx.model.model.config.hidden_size, hidden=cfg.gate_hidden, dropout=cfg.gate_dropout)
    counts = torch.bincount(labels, minlength=2).tolist()
    majority = max(counts) / len(labels)
    if min(counts) == 0:
        config.constant_route = int(labels[0])
        route = "the adapter" if config.constant_route else "the base model"
        log.warning("every query has label %d: the gate routes everything to %s", config.constant_route, route)
        Gate(config).save(run_dir.path / "gate")
        return {"kind": "constant", "constant_route": config.constant_route, "examples": len(labels),
                "train_accuracy": 1.0, "heldout_accuracy": None, "majority_baseline": majority}
    prompts = [chat_prompt(ctx.model.tokenizer, r["query"]) for r in records]
    feature_model = gate_feature_model(ctx.model, cfg.model, cfg.trust_remote_code)
    features = block0_features(feature_model, prompts, cfg.batch_size)
    metrics = heldout_accuracy(features, labels, config, epochs=cfg.gate_epochs, lr=cfg.gate_lr,
                               folds=cfg.gate_folds, seed=cfg.seed)
    gate = train_gate(features, labels, config, epochs=cfg.gate_epochs, lr=cfg.gate_lr, seed=cfg.seed)
    gate.save(run_dir.path / "gate")
    train_accuracy = float((gate.route(features) == labels).float().mean())
    return {"kind": "mlp", "examples": len(labels), "positives": counts[1], "train_accuracy": train_accuracy,
            "majority_baseline": majority, **metrics}
