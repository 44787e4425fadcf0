"""The gate: a small classifier on the base model's hidden state after decoder block `layer` (pooled over the
prompt, no persona) that says per query whether the adapter should answer (binary), or which of base and k persona
adapters should (k-way, `classes`): an adapter answers when P(not base) reaches the threshold, and then the most
probable adapter. Its kind is one of a small family (L2 logistic regression, an MLP, k nearest neighbours on the
standardized feature, a domain gate), chosen by cross-validation when it is trained. The domain gate says how
likely the query is to come from each of the run's domains (a linear probe) and weighs each domain's mean target
by it: where a persona helps or hurts a whole intent, that is learnt from every query of the domain, not from one
query's noisy label. Its module, config and saved form
(safetensors + config.json) live here, between the stage that trains it (prism.stages.gate) and the inference that
applies it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from prism.config import GATE_CLASSIFIERS
from prism.errors import PrismError
from prism.runs import write_json_atomic

GATE_WEIGHTS, GATE_CONFIG = "gate.safetensors", "config.json"  # a saved gate's files
KINDS = GATE_CLASSIFIERS[1:]  # "auto" is a choice among them


def feature_description(layer: int, pool: str) -> str:
    where = ("the last token" if pool == "last" else
             "the mean over the tokens from the user turn on (the template's fixed prefix left out)")
    return (f"hidden state after decoder block {layer} (hidden_states[{layer + 1}]) at {where} of the base chat "
            f"prompt, embeddings and blocks 0..{layer} computed in float32")


FEATURE = feature_description(0, "last")


@dataclass
class GateConfig:
    input_dim: int
    hidden: int = 256
    dropout: float = 0.1
    threshold: float = 0.5
    constant_route: int | None = None  # set when the data held one class only: no MLP, a fixed class
    feature: str = FEATURE
    classes: list[str] | None = None  # k-way: "base", then each adapter's persona; None = binary (base, adapter)
    layer: int = 0  # the feature: decoder block `layer`'s output ...
    pool: str = "last"  # ... at the prompt's last token, or its mean from the user turn on ("mean")
    kind: str = "mlp"  # one of KINDS
    neighbors: int = 0  # knn: how many stored rows vote
    memory: int = 0  # knn: how many training rows are stored
    domains: list[str] | None = None  # domain: the domains its probe tells apart, in its rows' order

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PrismError(f"unknown gate kind {self.kind!r}: use one of {', '.join(KINDS)}")
        if self.kind == "domain" and not self.domains:
            raise PrismError("a domain gate names the domains it tells apart: its config has no domains")

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else 2


class Gate(nn.Module):
    def __init__(self, config: GateConfig):
        super().__init__()
        self.config = config
        # Early blocks' states have a few huge dimensions; standardizing keeps them from swamping the classifier.
        self.register_buffer("mean", torch.zeros(config.input_dim))
        self.register_buffer("std", torch.ones(config.input_dim))
        if config.kind == "knn":  # the standardized training rows and their class probabilities
            self.register_buffer("points", torch.zeros(config.memory, config.input_dim))
            self.register_buffer("targets", torch.zeros(config.memory, config.num_classes))
        elif config.kind == "logistic":
            self.net = nn.Linear(config.input_dim, config.num_classes)
        elif config.kind == "domain":  # a probe of the domain, and each domain's mean class probabilities
            domains = len(config.domains or [])  # never empty: the config refuses a domain gate without them
            self.net = nn.Linear(config.input_dim, domains)
            self.register_buffer("domain_targets", torch.zeros(domains, config.num_classes))
        else:
            self.net = nn.Sequential(
                nn.Linear(config.input_dim, config.hidden),
                nn.GELU(),
                nn.Dropout(config.dropout),
                nn.Linear(config.hidden, config.num_classes),
            )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits: softmax gives each class's probability."""
        standardized = (features - self.mean) / self.std
        if self.config.kind == "domain":
            domain = torch.softmax(self.net(standardized), dim=-1)
            return torch.log((domain @ self.domain_targets).clamp(min=1e-6))
        if self.config.kind != "knn":
            return self.net(standardized)
        k = min(self.config.neighbors, len(self.points))
        nearest = torch.cdist(standardized, self.points).topk(k, dim=1, largest=False).indices
        return torch.log(self.targets[nearest].mean(1).clamp(min=1e-6))

    @torch.no_grad()
    def class_probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """(n, classes): the gate's probability of each class, base first."""
        if self.config.constant_route is not None:
            constant = torch.zeros(features.shape[0], self.config.num_classes)
            constant[:, self.config.constant_route] = 1.0
            return constant
        self.eval()
        return torch.softmax(self(features.float()), dim=-1)

    def persona_probability(self, features: torch.Tensor) -> torch.Tensor:
        """P(an adapter should answer): P(persona) of a binary gate, 1 - P(base) of a k-way one."""
        return self._adapter_probability(self.class_probabilities(features))

    def route(self, features: torch.Tensor) -> torch.Tensor:
        """Each row's class: 0 = base, else the adapter (binary: 1; k-way: the most probable adapter's index)."""
        return self._route(self.class_probabilities(features))[1]

    def decide(self, features: torch.Tensor) -> list[tuple[float, int]]:
        """Per row: P(an adapter should answer) and the class routed to (0 = base; binary: 1 = the adapter;
        k-way: the most probable adapter, when P(an adapter) reaches the threshold)."""
        probability, routed = self.decide_tensors(features)
        return list(zip(probability.tolist(), routed.tolist()))

    def decide_tensors(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`decide` as tensors: P(an adapter should answer) and the class routed to, per row."""
        return self._route(self.class_probabilities(features))

    def persona_of(self, route_class: int) -> str | None:
        """The k-way persona of a class (None for base, and for the adapter of a binary gate)."""
        return self.config.classes[route_class] if self.config.classes and route_class > 0 else None

    def best_adapter(self, features: torch.Tensor) -> torch.Tensor:
        """Each row's most probable adapter class whatever the threshold (k-way: 1..k; 0 when the gate has no
        adapter class; binary: 1): the adapter a row gets when it is routed to one."""
        probabilities = self.class_probabilities(features)
        if self.config.classes is None:
            return torch.ones(len(probabilities), dtype=torch.long)
        return self._best(probabilities)

    @staticmethod
    def _best(probabilities: torch.Tensor) -> torch.Tensor:
        if probabilities.shape[1] < 2:
            return torch.zeros(len(probabilities), dtype=torch.long)
        return probabilities[:, 1:].argmax(dim=-1) + 1

    def _adapter_probability(self, probabilities: torch.Tensor) -> torch.Tensor:
        return probabilities[:, 1] if self.config.classes is None else 1.0 - probabilities[:, 0]

    def _route(self, probabilities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        adapter = self._adapter_probability(probabilities)
        routed = (adapter >= self.config.threshold).long()
        if self.config.classes is not None:  # the most probable adapter (none: base only)
            routed = routed * self._best(probabilities)
        return adapter, routed

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / GATE_WEIGHTS))
        (directory / GATE_CONFIG).write_text(json.dumps(asdict(self.config), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> Gate:
        directory = Path(directory)
        try:
            config = GateConfig(**json.loads((directory / GATE_CONFIG).read_text()))
            gate = cls(config)
            gate.load_state_dict(load_file(str(directory / GATE_WEIGHTS)))
        except (OSError, ValueError, TypeError, RuntimeError) as exc:
            raise PrismError(f"cannot load the gate from {directory}: {exc}") from None
        return gate.eval()


def check_threshold(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise PrismError(f"the gate threshold is a probability: pass a value in [0, 1], got {value}")
    return value


def save_threshold(directory: str | Path, threshold: float) -> None:
    """Set the saved gate's routing threshold (P(persona) >= threshold goes to the adapter)."""
    check_threshold(threshold)
    path = Path(directory) / GATE_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PrismError(f"cannot read the gate config {path}: {exc}") from None
    config["threshold"] = threshold
    write_json_atomic(path, config)

