"""PRISM: persona routing via intent-based self-modeling (arXiv 2603.18507)."""

from prism.config import DEFAULT_DOMAINS, PRESETS, BootstrapConfig, load_config_file, resolve_config
from prism.decoding import SamplingParams
from prism.errors import PrismError
from prism.gguf_export import export_gguf
from prism.models import load_model
from prism.pipeline import bootstrap, distill_run, inspect_run
from prism.routing import Completion, GatedModel, GenerationRequest, PrismModel, RouteDecision, Router, load_gated_model

__all__ = [
    "DEFAULT_DOMAINS",
    "PRESETS",
    "BootstrapConfig",
    "Completion",
    "GatedModel",
    "GenerationRequest",
    "PrismError",
    "PrismModel",
    "RouteDecision",
    "Router",
    "SamplingParams",
    "bootstrap",
    "distill_run",
    "export_gguf",
    "inspect_run",
    "load_config_file",
    "load_gated_model",
    "load_model",
    "resolve_config",
]
