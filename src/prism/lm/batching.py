"""Batching helpers over a loaded model: length-sorted batches, padding, and the gate's feature (a decoder
block's hidden states pooled over the prompt), computed without running the blocks above it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from prism.config import GATE_POOLS
from prism.errors import PrismError
from prism.lm.models import LoadedModel, chat_prompt, decoder_layers, encode

FEATURE_BATCH = 32  # prompts per embeddings + block 0 pass, when the caller names no batch size


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, so padding wastes little compute."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad_batch(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    return ids, mask


class _StopAfterLayer(Exception):
    pass


_SENTINEL = "\x00PRISM-USER-TURN\x00"


def template_prefix_ids(tokenizer: Any) -> list[int]:
    """The tokens the chat template puts before a lone user message's text (its default system prompt and the
    user header): the same in every gate prompt, so a mean over them would only dilute the query's own tokens."""
    cached = getattr(tokenizer, "_prism_template_prefix", None)
    if cached is None:
        cached = encode(tokenizer, chat_prompt(tokenizer, _SENTINEL).split(_SENTINEL)[0])
        tokenizer._prism_template_prefix = cached
    return cached


def user_turn_start(ids: Sequence[int], prefix: Sequence[int]) -> int:
    """Where a gate prompt's own tokens begin: after the longest run of tokens it shares with the template's
    prefix (at most its last token, so a row never pools over nothing)."""
    shared = 0
    for a, b in zip(ids, prefix):
        if a != b:
            break
        shared += 1
    return min(shared, len(ids) - 1)


def pool_mask(encoded: Sequence[Sequence[int]], width: int, side: str, pool: str, prefix: Sequence[int]
              ) -> torch.Tensor:
    """(rows, width) 0/1: the positions the gate's feature pools over in a padded batch of `encoded` prompts:
    the last prompt token ("last"), or every token from the user turn on ("mean")."""
    if pool not in GATE_POOLS:
        raise PrismError(f"unknown gate pooling {pool!r}: use one of {', '.join(GATE_POOLS)}")
    mask = torch.zeros((len(encoded), width))
    for row, ids in enumerate(encoded):
        start = len(ids) - 1 if pool == "last" else user_turn_start(ids, prefix)
        offset = width - len(ids) if side == "left" else 0
        mask[row, offset + start : offset + len(ids)] = 1.0
    return mask


def pool_states(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(rows, hidden) float32: `states` averaged over each row's `pool_mask` positions."""
    weights = mask.to(states.device, torch.float32)[:, :, None]
    return ((states.float() * weights).sum(1) / weights.sum(1)).cpu()


@torch.no_grad()
def gate_features(lm: LoadedModel, prompts: Sequence[str], layer: int = 0, pool: str = "last",
                  batch_size: int = FEATURE_BATCH) -> torch.Tensor:
    """The gate's feature of each prompt: the hidden state after decoder block `layer` (hidden_states[layer + 1])
    at the last token, or averaged from the user turn on (`pool`). The blocks above `layer` never run. Training
    and inference both read it here (inference's prefill hook pools with the same `pool_mask`)."""
    prefix = template_prefix_ids(lm.tokenizer)

    def pooled(states: torch.Tensor, encoded: list[list[int]]) -> torch.Tensor:
        return pool_states(states, pool_mask(encoded, states.shape[1], "right", pool, prefix))

    return _layer_states(lm, prompts, layer, batch_size, pooled)


def block0_features(lm: LoadedModel, prompts: Sequence[str], batch_size: int = FEATURE_BATCH) -> torch.Tensor:
    """Hidden state after decoder block 0 at each prompt's last token: the paper's gate feature, and the one of
    runs made before gate layers and pooling existed."""
    return gate_features(lm, prompts, 0, "last", batch_size)


@torch.no_grad()
def mean_pooled_features(lm: LoadedModel, prompts: Sequence[str], layer: int,
                         batch_size: int = FEATURE_BATCH) -> torch.Tensor:
    """Hidden state after decoder block `layer`, averaged over each prompt's tokens; blocks after it never run."""
    def mean(states: torch.Tensor, encoded: list[list[int]]) -> torch.Tensor:
        return pool_states(states, pool_mask(encoded, states.shape[1], "right", "mean", prefix=()))  # every token

    return _layer_states(lm, prompts, layer, batch_size, mean)


def _layer_states(lm: LoadedModel, prompts: Sequence[str], layer: int, batch_size: int,
                  pool: Callable[[torch.Tensor, list[list[int]]], torch.Tensor]) -> torch.Tensor:
    """`pool`(block `layer`'s output, the batch's token ids) per batch of right-padded prompts, stopping the
    forward pass there."""
    layers = decoder_layers(lm.model)
    if not 0 <= layer < len(layers):
        raise PrismError(f"layer {layer} is not a decoder block of this model: pass 0 to {len(layers) - 1}")
    encoded = [encode(lm.tokenizer, p) for p in prompts]
    out = torch.empty((len(prompts), lm.model.config.hidden_size), dtype=torch.float32)
    captured: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, _inputs: object, output: object) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopAfterLayer

    handle = layers[layer].register_forward_hook(hook)
    try:
        for batch in length_sorted_batches([len(e) for e in encoded], batch_size):
            ids, mask = pad_batch([encoded[i] for i in batch], lm.tokenizer.pad_token_id, side="right")
            captured.clear()
            with contextlib.suppress(_StopAfterLayer):
                lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
            out[batch] = pool(captured[0], [encoded[i] for i in batch])
    finally:
        handle.remove()
    return out

