"""The bootstrap engine on the loaded model with transformers: batched sampling where each prompt draws
from its own seeded stream, and next-token logits for the judge's verdicts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from prism.engines.base import Generation, OptionProbs, Prompt, has_complete_line, option_token_ids, options_from_logits
from prism.errors import PrismError
from prism.lm.batching import length_sorted_batches, pad_batch
from prism.lm.decoding import SamplingParams, sample_token
from prism.lm.models import LoadedModel, chat_prompt, encode, stop_token_ids


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

