"""Batching helpers over a loaded model: length-sorted batches, padding, and the hidden state after
decoder block 0 (the gate's feature), computed without running the rest of the model."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from prism.lm.models import LoadedModel, decoder_layers, encode

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


@torch.no_grad()
def block0_features(lm: LoadedModel, prompts: Sequence[str], batch_size: int = FEATURE_BATCH) -> torch.Tensor:
    """Hidden state after decoder block 0 (hidden_states[1]) at each prompt's last token.

    Only the embeddings and block 0 run: a hook stops the forward pass right after block 0.
    """
    def last_token(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return states[torch.arange(len(states)), (mask.sum(1) - 1).to(states.device)]

    return _layer_states(lm, prompts, 0, batch_size, last_token)


@torch.no_grad()
def mean_pooled_features(lm: LoadedModel, prompts: Sequence[str], layer: int,
                         batch_size: int = FEATURE_BATCH) -> torch.Tensor:
    """Hidden state after decoder block `layer`, averaged over each prompt's tokens; blocks after it never run."""
    def mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.to(states.device, states.dtype)[:, :, None]
        return (states * weights).sum(1) / weights.sum(1)

    return _layer_states(lm, prompts, layer, batch_size, mean)


def _layer_states(lm: LoadedModel, prompts: Sequence[str], layer: int, batch_size: int,
                  pool: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`pool`(block `layer`'s output, attention mask) per batch of right-padded prompts, stopping the forward
    pass there."""
    encoded = [encode(lm.tokenizer, p) for p in prompts]
    out = torch.empty((len(prompts), lm.model.config.hidden_size), dtype=torch.float32)
    captured: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, _inputs: object, output: object) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopAfterLayer

    handle = decoder_layers(lm.model)[layer].register_forward_hook(hook)
    try:
        for batch in length_sorted_batches([len(e) for e in encoded], batch_size):
            ids, mask = pad_batch([encoded[i] for i in batch], lm.tokenizer.pad_token_id, side="right")
            captured.clear()
            with contextlib.suppress(_StopAfterLayer):
                lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
            out[batch] = pool(captured[0], mask).float().cpu()
    finally:
        handle.remove()
    return out

