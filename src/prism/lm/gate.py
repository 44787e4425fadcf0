"""The gate: a small MLP on the base model's hidden state after block 0 (last prompt token, no persona)
that says per query whether the adapter should answer. Its module, config and saved form live here,
between the stage that trains it (prism.stages.gate) and the inference that applies it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from prism.errors import PrismError
from prism.runs import write_json_atomic

FEATURE = ("hidden state after decoder block 0 (hidden_states[1]) at the last token of the base chat prompt, "
           "embeddings and block 0 computed in float32")


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


def check_threshold(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise PrismError(f"the gate threshold is a probability: pass a value in [0, 1], got {value}")
    return value


def save_threshold(directory: str | Path, threshold: float) -> None:
    """Set the saved gate's routing threshold (P(persona) >= threshold goes to the adapter)."""
    check_threshold(threshold)
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PrismError(f"cannot read the gate config {path}: {exc}") from None
    config["threshold"] = threshold
    write_json_atomic(path, config)

