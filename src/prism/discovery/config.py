"""`prism discover`'s options (`DiscoverConfig`): the CLI generates its flags from these fields."""

from __future__ import annotations

from dataclasses import dataclass

from prism.config import DEFAULT_DEVICE, DEFAULT_SEED, LOCAL_ENGINE, option
from prism.errors import PrismError
from prism.lm.batching import FEATURE_BATCH
from prism.lm.models import EMBEDDED


def parse_clusters(text: str | int) -> int | str:
    if text == "auto" or isinstance(text, int):
        return text
    try:
        return int(text)
    except ValueError:
        raise PrismError(f"--clusters must be 'auto' or a number, got {text!r}") from None


@dataclass
class DiscoverConfig:
    out: str = option("the folder the domains, queries, config and report go to", default="discovered")
    model: str = option("the base model whose hidden states embed the prompts and who names the clusters (a Hugging "
                        "Face id or path; 'embedded': the packaged SmolLM2-135M-Instruct)", default=EMBEDDED)
    clusters: int | str = option("'auto' (the number of clusters with the best silhouette, 2 to 20) or a number",
                                 parse=parse_clusters, default="auto")
    min_cluster_size: int = option("clusters with fewer prompts are merged into 'other'", default=5)
    max_prompts: int | None = option("at most this many prompts (a uniform sample of a longer log)", default=None)
    layer: int | None = option("the decoder block whose mean-pooled output embeds a prompt (default: the middle one)",
                               default=None)
    holdout: float = option("share of the prompts kept out of queries.jsonl, in holdout.jsonl, to compare the runs "
                            "before and after on (`prism compare`)", default=0.2)
    examples: int = option("central prompts shown per cluster (and used to name it)", default=5)
    no_scrub: bool = option("keep emails, phone numbers and long digit runs (masked by default)", default=False)
    batch_size: int = option("prompts embedded together", default=FEATURE_BATCH)
    engine: str = option("what names the clusters: transformers (the model itself), llamacpp (its GGUF) or openai",
                         choices=("transformers", "llamacpp", "openai"), default=LOCAL_ENGINE)
    gguf: str | None = option("the llamacpp engine's GGUF of --model", default=None)
    base_url: str | None = option("the openai engine's server", default=None)
    engine_model: str | None = option("the model name the openai engine's server knows", default=None)
    device: str = option("'auto', 'cpu', 'cuda', ...", default=DEFAULT_DEVICE)
    seed: int = option("seed of the sampling of a long log and of KMeans", default=DEFAULT_SEED)

    def __post_init__(self) -> None:
        self.clusters = parse_clusters(self.clusters)
        if not 0 <= self.holdout < 1:
            raise PrismError(f"--holdout must be at least 0 and below 1, got {self.holdout}")
        for name in ("min_cluster_size", "examples", "batch_size", "max_prompts"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise PrismError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
