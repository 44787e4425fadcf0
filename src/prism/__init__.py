"""PRISM: persona routing via intent-based self-modeling (arXiv 2603.18507)."""

from prism.config import DEFAULT_DOMAINS, PRESETS, BootstrapConfig, load_config_file, resolve_config
from prism.decoding import SamplingParams
from prism.errors import PrismError
from prism.models import load_model
from prism.pipeline import bootstrap, distill_run, inspect_run
from prism.routing import Completion, GenerationRequest, PrismModel, RouteDecision, Router

__all__ = [
    "DEFAULT_DOMAINS",
    "PRESETS",
    "BootstrapConfig",
    "Completion",
    "GenerationRequest",
    "PrismError",
    "PrismModel",
    "RouteDecision",
    "Router",
    "SamplingParams",
    "bootstrap",
    "distill_run",
    "inspect_run",
    "load_config_file",
    "load_model",
    "resolve_config",
]
