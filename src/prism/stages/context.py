"""What every bootstrap stage receives (`StageContext`), and the seed each record samples with."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prism.engines.local import LocalEngine
from prism.errors import PrismError
from prism.runs import RunDir

if TYPE_CHECKING:
    from prism.config import BootstrapConfig
    from prism.engines.base import Engine
    from prism.lm.models import LoadedModel


def derive_seed(seed: int, *tags: object) -> int:
    """A stable seed from the run seed and a record's identity (stage, record id): each record is sampled
    from its own random stream, so what it gets does not depend on which batch it landed in, and a run
    killed anywhere and resumed writes the records an uninterrupted run writes."""
    text = ":".join(str(t) for t in (seed, *tags))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


@dataclass
class StageContext:
    """What every stage function receives: where to read and write, the config, the local model (the
    gate and distill stages need its hidden states and logits) and the engine that generates and judges
    (by default the local model itself)."""

    run: RunDir
    config: BootstrapConfig
    lm: LoadedModel | None = None
    engine: Engine | None = None

    def __post_init__(self) -> None:
        if self.engine is None and self.lm is not None:
            self.engine = LocalEngine(self.lm)

    @property
    def generator(self) -> Engine:
        if self.engine is None:
            raise PrismError("this stage needs an engine or a loaded model")
        return self.engine

    @property
    def model(self) -> LoadedModel:
        if self.lm is None:
            raise PrismError("this stage needs the model loaded in this process")
        return self.lm

