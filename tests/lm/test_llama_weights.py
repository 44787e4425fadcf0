"""Re-encoding a GGUF's weights for llama.cpp's batched kernels (prism.lm.llama_weights): when it happens, that
it keeps the model, that it is made once, and that a failure says what to do."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from gguf_helpers import write_tiny_gguf
from prism.errors import PrismError
from prism.lm import llama_weights
from prism.lm.llama_weights import chosen_type, decode_weights, file_types, reencoded

pytest.importorskip("llama_cpp")


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PRISM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


@pytest.fixture(scope="module")
def q4_1(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny-q4_1.gguf", quantized=True)


@pytest.fixture(scope="module")
def f32(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf")


def test_auto_re_encodes_only_a_type_without_batched_kernels_and_only_for_several_sequences(q4_1, f32):
    assert file_types(q4_1) == {"Q4_1"} and file_types(f32) == {"F32"}
    assert chosen_type(q4_1, "auto", sequences=8) == "q8_0"
    assert chosen_type(q4_1, "auto", sequences=1) is None  # one stream: the smaller file decodes faster
    assert chosen_type(f32, "auto", sequences=8) is None
    assert chosen_type(q4_1, "as-is", sequences=8) is None
    assert chosen_type(f32, "f16", sequences=1) == "f16"
    with pytest.raises(PrismError, match="--gguf-weights must be one of"):
        chosen_type(q4_1, "q4_0", sequences=8)


def logits(path: Path) -> torch.Tensor:
    from prism.lm.llama_batch import BatchedLlama, RouteSpec

    llama = BatchedLlama({"base": RouteSpec(path)}, slots=1, slot_tokens=256, threads=2, kv_type="f32")
    try:
        return torch.cat([llama.logits("base", list(range(5 + k, 60 + 3 * k)), logits_from=0) for k in range(4)])
    finally:
        llama.close()


def test_the_q8_0_re_encoding_keeps_the_model_and_is_made_once(q4_1, cache, monkeypatch):
    path, made = decode_weights(q4_1, "auto", sequences=8)
    assert made == "q8_0" and path.parent == cache and file_types(path) == {"Q8_0"}
    source, again = logits(q4_1), logits(path)
    # measured on the tiny random model: 0.04 of the logit range at most, 91% the same greedy token; Q4_0 (the
    # negative control, a 4-bit type again) was 0.33 and 47%
    assert float((again - source).abs().max() / (source.max() - source.min())) < 0.1
    assert float((again.argmax(-1) == source.argmax(-1)).float().mean()) > 0.8

    def no_quantizer(*args, **kwargs):
        raise AssertionError("the cached file should have been used")

    monkeypatch.setattr(subprocess, "run", no_quantizer)
    assert reencoded(q4_1, "q8_0") == path


def test_a_changed_source_is_re_encoded_and_its_old_encoding_removed(q4_1, cache, tmp_path):
    source = tmp_path / "model.gguf"
    source.write_bytes(q4_1.read_bytes())
    first = reencoded(source, "q8_0")
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a re-export rewrites it in place
    second = reencoded(source, "q8_0")
    assert second != first and second.is_file() and not first.exists()
    assert sorted(p.name for p in cache.iterdir()) == [second.name]


def test_a_file_the_quantizer_cannot_read_is_an_error_that_says_how_to_go_on(cache, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(PrismError, match="--gguf-weights as-is"):
        reencoded(broken, "q8_0")
    assert not cache.exists() or not any(cache.iterdir())  # no partial file left behind
    with pytest.raises(PrismError, match="not a readable GGUF"):
        chosen_type(broken, "auto", sequences=8)


def test_only_q8_0_weights_prefill_prompts_together(q4_1, f32, cache):
    assert llama_weights.prefills_together(reencoded(q4_1, "q8_0"))
    assert not llama_weights.prefills_together(q4_1)
    assert not llama_weights.prefills_together(f32)
