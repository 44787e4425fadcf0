"""Fixtures over tests/helpers.py: the tiny model, its loaded form, a config factory and a finished run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import build_tiny_kway_run, build_tiny_model, build_tiny_run
from prism.config import resolve_config
from prism.lm.models import LoadedModel, load_model


def pytest_configure(config: pytest.Config) -> None:
    """One PyTorch thread in the suite and in the prism commands it starts. CI's 2 cores are shared with other work:
    torch's OpenMP team of 2 spins at every barrier while another process holds a core, so a loaded machine ran the
    suite several times slower, where one thread costs the tiny models nothing and the real 135M one little."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


LONGEST_FIRST = ("test_e2e_embedded.py", "test_discover.py")  # 6-7 minutes and 70 s of the real model


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest test files first: under pytest-xdist (`make test` runs two workers, a file per worker at a time) the
    e2e test then runs beside the others instead of after them (12:43 with it last: the run's critical path)."""
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def tiny_lm(tiny_model_dir: Path) -> LoadedModel:
    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture()
def tiny_config(tiny_model_dir: Path):
    """A config factory for fast pipeline runs on the tiny model (whose gate learns the teacher's verdicts, which the
    tests plant: the adapter's own outcomes have their tests)."""

    def make(**overrides):
        values = dict(model=str(tiny_model_dir), domains=["writing", "safety", "factual recall"], preset="tiny",
                      queries_per_persona=4, persona_max_tokens=24, query_max_tokens=16, answer_max_tokens=12,
                      batch_size=8, distill_epochs=3, distill_batch_size=2, distill_micro_batch_size=2,
                      gate_epochs=10, device="cpu", seed=0,
                      gate_labels="persona")  # the adapter's own outcomes: tests/stages/test_adapter_outcomes.py
        values.update(overrides)
        return resolve_config(**values)

    return make


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return build_tiny_run(tmp_path_factory.mktemp("tiny-run"), tiny_model_dir)



@pytest.fixture(scope="session")
def tiny_kway_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return build_tiny_kway_run(tmp_path_factory.mktemp("tiny-kway-run"), tiny_model_dir)
