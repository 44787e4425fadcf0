"""Per-request sampling and incremental detokenization for the serving loop.

transformers' `generate` takes one sampling config per batch and streams only batch size 1; a server
that batches requests with their own temperature, top_p, seed, stop strings and max_tokens needs both
per row, so the decode loops of prism.inference sample and detokenizes row by row with these helpers.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from prism.errors import RequestError

NO_NUCLEUS = 1.0  # top_p that keeps every token: nucleus sampling off


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = NO_NUCLEUS
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # keep going past end-of-text (benchmarks that need equal lengths)
    logprobs: int | None = None  # None: off; k: each token's log-probability and the k most likely ones

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise RequestError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise RequestError(f"top logprobs must be between 0 and 20, got {self.logprobs}")
        if any(not s for s in self.stop):
            raise RequestError("stop strings must not be empty")

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed if self.seed is not None else secrets.randbits(63))


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from a row's next-token logits (1-D) under that row's temperature and nucleus, computed in
    numpy on the CPU: torch's softmax spreads a 49,152-token row over its intra-op threads, and in `prism serve`
    on llama.cpp, between two decodes, a token's sampling took 325-585 us that way against 90 alone (the 2-core
    development machine). A greedy row on a GPU keeps its argmax there."""
    if params.temperature == 0.0 and logits.device.type != "cpu":
        return int(logits.argmax())
    row = logits.detach().float().cpu().numpy()
    if params.temperature == 0.0:  # the first of equal maxima, as torch's argmax
        return int(row.argmax())
    weights = row / np.float32(params.temperature)
    weights -= weights.max()
    np.exp(weights, out=weights)  # the softmax unnormalized: draw takes any positive scale
    return draw(_nucleus(weights, params.top_p), generator)


def _nucleus(weights: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of most likely entries whose mass reaches top_p (the first always stays). The set
    is searched among the most likely 256 entries, then 1,024, ...: torch sorted all 49,152 in 3.1 ms a token."""
    if top_p >= NO_NUCLEUS:
        return weights
    bound = top_p * weights.sum(dtype=np.float64)
    count = 256
    while True:
        if count >= len(weights):
            order = np.argsort(-weights)
        else:
            order = np.argpartition(-weights, count)[:count]
            order = order[np.argsort(-weights[order])]
        ranked = weights[order]
        above = np.cumsum(ranked, dtype=np.float64) - ranked  # the mass ranked above each entry
        if count >= len(weights) or above[-1] + ranked[-1] >= bound:  # the set ends among these
            break
        count *= 4
    inside = above < bound
    kept = np.zeros_like(weights)
    kept[order[inside]] = ranked[inside]
    return kept


DRAW_BLOCK = 256  # entries per block of the two-level search in draw


def draw(probs: np.ndarray | torch.Tensor, generator: torch.Generator) -> int:
    """One index of a 1-D vector of probabilities (any positive scale), by the inverse of its cumulative sum at
    one uniform number, searched in two levels: the cumulative sum of blocks of DRAW_BLOCK entries, then within
    the block the uniform falls in. torch.multinomial draws an exponential per entry instead (0.9 ms for a
    49,152-token vocabulary on the 2-core development machine), a whole cumulative sum in float64 took 124 us,
    this 33."""
    probs = np.asarray(probs)
    starts = np.arange(0, len(probs), DRAW_BLOCK)
    blocks = np.cumsum(np.add.reduceat(probs, starts, dtype=np.float64))
    target = float(torch.rand((), generator=generator, dtype=torch.float64)) * blocks[-1]
    block = int(np.searchsorted(blocks, target, side="right"))  # the first block whose cumulative sum passes it
    if block < len(blocks):
        low = int(starts[block])
        within = np.cumsum(probs[low:low + DRAW_BLOCK], dtype=np.float64) + (blocks[block - 1] if block else 0.0)
        index = low + int(np.searchsorted(within, target, side="right"))
        if index < low + len(within):  # a cumulative sum passes the target only at an entry with mass
            return index
        last = np.flatnonzero(probs[low:low + DRAW_BLOCK])  # rounding passed the block's end: its last entry with mass
        if len(last):
            return low + int(last[-1])
    return int(np.flatnonzero(probs)[-1])  # the uniform rounded the target up to the total: the last entry with mass


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
                  ) -> list[int]:
    """One token per row of a batch's next-token logits (rows, vocab), each under its own settings, with at
    most two device-to-host transfers per step whatever the batch size: the greedy rows' argmax over the
    batch on the device, then one copy of the sampled rows' logits (each drawn from its own generator)."""
    tokens = [0] * len(params)
    greedy = [i for i, p in enumerate(params) if p.temperature == 0.0]
    sampled = [i for i, p in enumerate(params) if p.temperature != 0.0]
    if greedy:
        chosen = (logits if len(greedy) == len(params) else logits[greedy]).argmax(-1).tolist()
        for i, token in zip(greedy, chosen):
            tokens[i] = token
    if sampled:
        rows = logits[sampled].float().cpu()
        for row, i in zip(rows, sampled):
            tokens[i] = sample_token(row, params[i], generators[i])
    return tokens


def token_logprobs(logits: torch.Tensor, token: int, top: int, tokenizer: PreTrainedTokenizerBase
                   ) -> dict[str, object]:
    """One generated token's entry in OpenAI's logprobs format: its log-probability under the model's
    own distribution (before temperature and top_p, as vLLM reports by default) and the `top` most likely."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)

    def entry(token_id: int) -> dict[str, object]:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": float(logprobs[token_id]), "bytes": list(text.encode("utf-8"))}

    ids = logprobs.topk(top).indices.tolist() if top else []
    return entry(token) | {"top_logprobs": [entry(i) for i in ids]}


class TextStream:
    """Turns a row's growing token list into text deltas: holds back an incomplete UTF-8 character and
    any tail that could still become a stop string, and cuts the text at the first stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.tokens: list[int] = []
        self.emitted = 0
        self.stopped = False
        self.text = ""

    def add(self, token: int) -> str:
        """Append a token; return the new text that is safe to show."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        hits = [text.find(s) for s in self.stop if s in text]
        if hits:
            self.text, self.stopped = text[: min(hits)], True
            return self.flush()
        self.text = text
        safe = len(text) - self.holdback
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens
            safe = min(safe, len(text) - 1)
        if safe <= self.emitted:
            return ""
        delta, self.emitted = text[self.emitted : safe], safe
        return delta

    def flush(self) -> str:
        """Everything not yet shown (called when the row finishes)."""
        delta, self.emitted = self.text[self.emitted :], len(self.text)
        return delta
