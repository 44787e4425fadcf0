"""The bootstrap engine on the loaded model with transformers: batched sampling where each prompt draws
from its own seeded stream (a prompt asked K times in a batch is prefilled once), and next-token logits for the
judge's verdicts (the prefix every judge prompt shares runs once)."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import (
    Cache,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from prism.engines.base import Generation, OptionProbs, Prompt, has_complete_line, option_token_ids, options_from_logits
from prism.errors import PrismError
from prism.lm.batching import length_sorted_batches, pad_batch
from prism.lm.decoding import NO_NUCLEUS, SamplingParams, sample_token
from prism.lm.models import LoadedModel, cache_argument, chat_prompt, encode, output_cache, stop_token_ids


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
                 batch_size: int, desc: str = "generate", first_line_only: bool = False, top_p: float = NO_NUCLEUS
                 ) -> Iterator[tuple[list[int], list[Generation]]]:
        return generate_batches(self.lm, [self.render(p) for p in prompts], max_new_tokens=max_new_tokens,
                                temperature=temperature, seeds=seeds, batch_size=batch_size, desc=desc,
                                first_line_only=first_line_only, top_p=top_p)

    def option_probs(self, prompts: Sequence[Prompt], options: Sequence[str], *, batch_size: int,
                     desc: str = "score") -> list[OptionProbs]:
        option_ids = option_token_ids(self.lm.tokenizer, options)
        logits = last_token_logits(self.lm, [self.render(p) for p in prompts], batch_size, desc=desc)
        return [options_from_logits(row, option_ids) for row in logits]


class RowSampler(LogitsProcessor):
    """Samples every row of a batch from its own seeded generator and leaves only that token possible, so
    greedy decoding then takes it: a row's sample depends on its seed and its own logits, not on the
    other rows of its batch (transformers' own sampling draws the whole batch from one random stream)."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float = NO_NUCLEUS):
        self.params = SamplingParams(temperature=temperature, top_p=top_p)
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
    share_prompts: bool = True,
    top_p: float = NO_NUCLEUS,
) -> Iterator[tuple[list[int], list[Generation]]]:
    """Yield (prompt indices, generations) batch by batch so the caller can save each batch at once.
    Prompt i samples from its own stream seeded with seeds[i]. With `share_prompts`, rows of a batch that carry
    the same prompt (the K samples of a label) share one prefill of it."""
    if len(seeds) != len(prompts):
        raise PrismError(f"generate_batches needs one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
    tokenizer = lm.tokenizer
    encoded = [encode(tokenizer, p) for p in prompts]
    eos_ids = stop_token_ids(lm)
    batches = length_sorted_batches([len(e) for e in encoded], batch_size)
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False)
    for batch in batches:
        ids, mask = pad_batch([encoded[i] for i in batch], tokenizer.pad_token_id, side="left")
        processors = LogitsProcessorList([RowSampler([seeds[i] for i in batch], temperature, top_p)] if temperature > 0
                                         else [])
        stopping = StoppingCriteriaList([FirstLineDone(tokenizer, ids.shape[1])] if first_line_only else [])
        cache = shared_prompt_cache(lm, ids, mask) if share_prompts else None
        out = lm.model.generate(
            input_ids=ids.to(lm.device),
            attention_mask=mask.to(lm.device),
            **({cache_argument(lm.model): cache} if cache is not None else {}),
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
def shared_prompt_cache(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> Cache | None:
    """The KV cache of a left-padded batch's prompts up to their last token, each distinct row computed once and
    copied to the rows that repeat it (the library's beam reordering); None when no row repeats another. generate()
    then runs only the last prompt token of every row before sampling."""
    rows, inverse = torch.unique(torch.cat([ids, mask], dim=1), dim=0, return_inverse=True)
    if len(rows) == len(ids):
        return None
    distinct_ids, distinct_mask = rows[:, : ids.shape[1] - 1], rows[:, ids.shape[1] : -1]
    positions = (distinct_mask.cumsum(1) - 1).clamp(min=0)
    cache = output_cache(lm.model(input_ids=distinct_ids.to(lm.device), attention_mask=distinct_mask.to(lm.device),
                                  position_ids=positions.to(lm.device), use_cache=True, logits_to_keep=1))
    cache.reorder_cache(inverse)
    return cache


MIN_SHARED_PREFIX = 16  # tokens every prompt starts with (a judge's instructions) worth one pass of their own


def shared_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all rows share, leaving every row at least its last token of its own."""
    shortest = min(len(r) for r in rows) - 1
    length = 0
    while length < shortest and all(r[length] == rows[0][length] for r in rows):
        length += 1
    return length


@torch.no_grad()
def last_token_logits(lm: LoadedModel, prompts: Sequence[str], batch_size: int, desc: str = "score",
                      share_prefix: bool = True) -> torch.Tensor:
    """Next-token logits after each prompt, shape (n, vocab), float32 on the CPU. With `share_prefix`, the tokens
    every prompt starts with (the judge's system prompt and instructions) are run once and their KV cache reused by
    every batch."""
    encoded = [encode(lm.tokenizer, p) for p in prompts]
    out = torch.empty((len(prompts), lm.model.config.vocab_size), dtype=torch.float32)
    shared = shared_prefix_length(encoded) if share_prefix and len(encoded) > 1 else 0
    prefix_cache = None
    if shared >= MIN_SHARED_PREFIX:
        prefix = torch.tensor([encoded[0][:shared]], device=lm.device)
        prefix_cache = output_cache(lm.model(input_ids=prefix, use_cache=True, logits_to_keep=1))
        encoded = [e[shared:] for e in encoded]
    else:
        shared = 0
    for batch in tqdm(length_sorted_batches([len(e) for e in encoded], batch_size), desc=desc, leave=False):
        # Left padding puts every row's last token at the end, so only one position needs the LM head
        # (a full (batch, length, vocab) logits tensor would dominate time and memory). After a shared prefix the
        # padding sits between it and each row's own tokens: masked, and the positions continue from the prefix.
        ids, mask = pad_batch([encoded[i] for i in batch], lm.tokenizer.pad_token_id, side="left")
        positions = shared + (mask.cumsum(1) - 1).clamp(min=0)
        cached = {}
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.reorder_cache(torch.zeros(len(batch), dtype=torch.long))  # the one prefix row, once per row
            cached = {cache_argument(lm.model): cache}
            mask = torch.cat([torch.ones(len(batch), shared, dtype=mask.dtype), mask], dim=1)
        logits = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                          position_ids=positions.to(lm.device), logits_to_keep=1, use_cache=bool(cached),
                          **cached).logits
        out[batch] = logits[:, -1].float().cpu()
    return out
