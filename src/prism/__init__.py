"""PRISM: persona routing via intent-based self-modeling (arXiv 2603.18507)."""

from prism.config import DEFAULT_DOMAINS, PRESETS, BootstrapConfig, load_config_file, resolve_config
from prism.errors import PrismError
from prism.evaluation.harness import lm_eval
from prism.inference.base import Completion, GatedModel, GenerationRequest, RouteDecision
from prism.inference.gguf_export import export_gguf
from prism.inference.loading import load_gated_model
from prism.inference.router import Router
from prism.inference.transformers import PrismModel
from prism.lm.decoding import SamplingParams
from prism.lm.models import load_model
from prism.stages.inspect import inspect_run
from prism.stages.pipeline import bootstrap, distill_run

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
    "lm_eval",
    "load_model",
    "resolve_config",
]
