"""Per-request sampling and incremental detokenization for the serving loop.

transformers' `generate` takes one sampling config per batch and streams only batch size 1; a server
that batches requests with their own temperature, top_p, seed, stop strings and max_tokens needs both
per row, so the decode loops of prism.inference sample and detokenizes row by row with these helpers.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from prism.errors import PrismError


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # keep going past end-of-text (benchmarks that need equal lengths)
    logprobs: int | None = None  # None: off; k: each token's log-probability and the k most likely ones

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise PrismError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise PrismError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise PrismError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise PrismError(f"top logprobs must be between 0 and 20, got {self.logprobs}")
        if any(not s for s in self.stop):
            raise PrismError("stop strings must not be empty")

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed if self.seed is not None else secrets.randbits(63))


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from a row's next-token logits (1-D) under that row's temperature and nucleus."""
    if params.temperature == 0.0:
        if logits.device.type == "cpu":
            # numpy's argmax: torch's took 65 us over a 49,152-token vocabulary on the 2-core development machine,
            # numpy's 2.5, for every token of every greedy stream (both take the first of equal maxima)
            return int(logits.detach().float().numpy().argmax())
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        outside = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return draw(probs, generator)


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One index of a 1-D probability vector (any positive scale), by the inverse of its cumulative sum at one
    uniform number: torch.multinomial draws an exponential per entry instead, 0.9 ms for a 49,152-token
    vocabulary on the 2-core development machine against 0.05 here, and a serving loop draws once per token."""
    cumulative = probs.double().cumsum(0)
    target = torch.rand((), generator=generator, dtype=torch.float64) * cumulative[-1]
    index = int(torch.searchsorted(cumulative, target, right=True))  # the first entry whose cumsum passes it
    if index >= len(probs):  # the uniform rounded the target up to the total: the last entry with mass
        index = int(probs.nonzero()[-1])
    return index


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
