"""Generation engines for the bootstrap stages, and batched local inference with transformers (sampling,
next-token probabilities, block-0 features).

A stage hands an engine chat prompts (`Prompt`) and gets text back, or the probabilities of a few
one-word options (the judge's verdicts). `LocalEngine` runs them on the loaded model with transformers;
`prism.remote.OpenAIEngine` sends them to any OpenAI-compatible server.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from prism.decoding import SamplingParams, sample_token
from prism.errors import PrismError
from prism.models import LoadedModel, chat_prompt, decoder_layers, encode, first_token_ids, stop_token_ids


def derive_seed(seed: int, *tags: object) -> int:
    """A stable seed from the run seed and a record's identity (stage, record id): each record is sampled
    from its own random stream, so what it gets does not depend on which batch it landed in, and a run
    killed anywhere and resumed writes the records an uninterrupted run writes."""
    text = ":".join(str(t) for t in (seed, *tags))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, so padding wastes little compute."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class FirstLineDone(StoppingCriteria):
    """Stops a row once it has written a complete line of content (not a lead-in ending in ':'):
    callers that keep only the first line need not wait for the rest."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_width: int):
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: object, **kwargs: object) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width :], skip_special_tokens=True)
        done = [has_complete_line(text) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def has_complete_line(text: str) -> bool:
    return any(line.strip() and not line.strip().endswith(":") for line in text.split("\n")[:-1])


@dataclass
class Generation:
    text: str
    new_tokens: int
    finished: bool  # False when max_new_tokens cut it short


@dataclass(frozen=True)
class Prompt:
    """One chat request of a stage: a user message, an optional system message, and the text the reply
    must start with (the engine returns only what follows it)."""
    user: str
    system: str | None = None
    assistant_prefix: str = ""

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return [*head, {"role": "user", "content": self.user}]


@dataclass
class OptionProbs:
    """A judge's choice among a few one-word options."""
    probs: dict[str, float]  # renormalized over the options
    mass: float | None  # how much probability the options had among all tokens (None: not known)
    source: str  # "logits", "logprobs" or "text" (a parsed reply: probability 1 on the option it names)


class Engine(Protocol):
    """What the generating stages need from a model."""

    def describe(self) -> dict[str, Any]: ...

    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int, temperature: float, seeds: Sequence[int],
                 batch_size: int, desc: str = "generate", first_line_only: bool = False
                 ) -> Iterator[tuple[list[int], list[Generation]]]:
        """Yields (prompt indices, generations) as they finish, so the caller can save them at once.
        `seeds`: one per prompt, the seed of that prompt's own sampling."""
        ...

    def option_probs(self, prompts: Sequence[Prompt], options: Sequence[str], *, batch_size: int,
                     desc: str = "score") -> list[OptionProbs]: ...


class LocalEngine:
    """The loaded model, in this process, with transformers."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm

    def describe(self) -> dict[str, Any]:
        return {"kind": "transformers", "model": self.lm.identity.get("name"), "device": str(self.lm.device)}

    def render(self, prompt: Prompt) -> str:
        return chat_prompt(self.lm.tokenizer, prompt.user, system=prompt.system,
                           assistant_prefix=prompt.assistant_prefix)

    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int, temperature: float, seeds: Sequence[int],
                 batch_size: int, desc: str = "generate", first_line_only: bool = False
                 ) -> Iterator[tuple[list[int], list[Generation]]]:
        return generate_batches(self.lm, [self.render(p) for p in prompts], max_new_tokens=max_new_tokens,
                                temperature=temperature, seeds=seeds, batch_size=batch_size, desc=desc,
                                first_line_only=first_line_only)

    def option_probs(self, prompts: Sequence[Prompt], options: Sequence[str], *, batch_size: int,
                     desc: str = "score") -> list[OptionProbs]:
        option_ids = option_token_ids(self.lm.tokenizer, options)
        logits = last_token_logits(self.lm, [self.render(p) for p in prompts], batch_size, desc=desc)
        return [options_from_logits(row, option_ids) for row in logits]


def option_token_ids(tokenizer: PreTrainedTokenizerBase, options: Sequence[str]) -> dict[str, list[int]]:
    """Each option's possible first tokens; the options must not share one."""
    option_ids = {option: first_token_ids(tokenizer, option) for option in options}
    taken = [t for ids in option_ids.values() for t in ids]
    if len(taken) != len(set(taken)):
        raise PrismError(f"this tokenizer cannot tell the options {', '.join(options)} apart by their first "
                         f"token: {option_ids}")
    return option_ids


def options_from_logits(logits: torch.Tensor, option_ids: dict[str, list[int]]) -> OptionProbs:
    """Each option's probability is that of its first token(s), renormalized over the options."""
    probs = torch.softmax(logits.float(), dim=-1)
    mass = {option: float(probs[ids].sum()) for option, ids in option_ids.items()}
    total = sum(mass.values())
    return OptionProbs({option: m / total for option, m in mass.items()}, total, "logits")


def pad_batch(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    return ids, mask


class RowSampler(LogitsProcessor):
    """Samples every row of a batch from its own seeded generator and leaves only that token possible, so
    greedy decoding then takes it: a row's sample depends on its seed and its own logits, not on the
    other rows of its batch (transformers' own sampling draws the whole batch from one random stream)."""

    def __init__(self, seeds: Sequence[int], temperature: float):
        self.params = SamplingParams(temperature=temperature)
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        chosen = [sample_token(row, self.params, generator) for row, generator in zip(scores, self.generators)]
        only = torch.full_like(scores, float("-inf"))
        only[torch.arange(len(chosen)), chosen] = 0.0
        return only


@torch.no_grad()
def generate_batches(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float,
    seeds: Sequence[int],
    batch_size: int,
    desc: str = "generate",
    first_line_only: bool = False,
) -> Iterator[tuple[list[int], list[Generation]]]:
    """Yield (prompt indices, generations) batch by batch so the caller can save each batch at once.
    Prompt i samples from its own stream seeded with seeds[i]."""
    if len(seeds) != len(prompts):
        raise PrismError(f"generate_batches needs one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
    tokenizer = lm.tokenizer
    encoded = [encode(tokenizer, p) for p in prompts]
    eos_ids = stop_token_ids(lm)
    batches = length_sorted_batches([len(e) for e in encoded], batch_size)
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False)
    for batch in batches:
        ids, mask = pad_batch([encoded[i] for i in batch], tokenizer.pad_token_id, side="left")
        processors = LogitsProcessorList([RowSampler([seeds[i] for i in batch], temperature)] if temperature > 0
                                         else [])
        stopping = StoppingCriteriaList([FirstLineDone(tokenizer, ids.shape[1])] if first_line_only else [])
        out = lm.model.generate(
            input_ids=ids.to(lm.device),
            attention_mask=mask.to(lm.device),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=sorted(eos_ids),
            do_sample=False,  # greedy over RowSampler's one-hot scores when sampling
            logits_processor=processors,
            stopping_criteria=stopping,
        )
        results = []
        for row in out[:, ids.shape[1] :].tolist():
            stop = next((j for j, t in enumerate(row) if t in eos_ids), None)
            kept = row if stop is None else row[:stop]
            results.append(Generation(tokenizer.decode(kept, skip_special_tokens=True), len(kept), stop is not None))
        bar.update(len(batch))
        yield batch, results
    bar.close()


@torch.no_grad()
def last_token_logits(lm: LoadedModel, prompts: Sequence[str], batch_size: int, desc: str = "score") -> torch.Tensor:
    """Next-token logits after each prompt, shape (n, vocab), float32 on the CPU."""
    encoded = [encode(lm.tokenizer, p) for p in prompts]
    out = torch.empty((len(prompts), lm.model.config.vocab_size), dtype=torch.float32)
    for batch in tqdm(length_sorted_batches([len(e) for e in encoded], batch_size), desc=desc, leave=False):
        # Left padding puts every row's last token at the end, so only one position needs the LM head
        # (a full (batch, length, vocab) logits tensor would dominate time and memory).
        ids, mask = pad_batch([encoded[i] for i in batch], lm.tokenizer.pad_token_id, side="left")
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                          position_ids=positions.to(lm.device), logits_to_keep=1, use_cache=False).logits
        out[batch] = logits[:, -1].float().cpu()
    return out


class _StopAfterBlock0(Exception):
    pass


@torch.no_grad()
def block0_features(lm: LoadedModel, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Hidden state after decoder block 0 (hidden_states[1]) at each prompt's last token.

    Only the embeddings and block 0 run: a hook stops the forward pass right after block 0.
    """
    encoded = [encode(lm.tokenizer, p) for p in prompts]
    hidden = lm.model.config.hidden_size
    out = torch.empty((len(prompts), hidden), dtype=torch.float32)
    captured: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, _inputs: object, output: object) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopAfterBlock0

    handle = decoder_layers(lm.model)[0].register_forward_hook(hook)
    try:
        for batch in length_sorted_batches([len(e) for e in encoded], batch_size):
            ids, mask = pad_batch([encoded[i] for i in batch], lm.tokenizer.pad_token_id, side="right")
            captured.clear()
            with contextlib.suppress(_StopAfterBlock0):
                lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
            last = (mask.sum(1) - 1).to(lm.device)
            out[batch] = captured[0][torch.arange(len(batch)), last].float().cpu()
    finally:
        handle.remove()
    return out
