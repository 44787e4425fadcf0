"""The bootstrap engine on llama.cpp: the generating stages and the judge on a `BatchedLlama` over the model's
GGUF, `batch_size` prompts decoded together (the judge's prompts prefilled together too, no decoding). Each
prompt samples from its own seeded generator, so its text does not depend on what was decoded beside it (a
resumed bootstrap gets what an uninterrupted one got); the run's tokenizer renders and tokenizes."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from prism.config import DEFAULT_GGUF_WEIGHTS
from prism.engines.base import Generation, OptionProbs, Prompt, has_complete_line, option_token_ids, options_from_logits
from prism.errors import ContextLengthError
from prism.lm.decoding import NO_NUCLEUS, SamplingParams, sample_token
from prism.lm.llama import base_gguf_for, check_vocabulary, default_threads
from prism.lm.llama_batch import BatchedLlama, RouteSpec
from prism.lm.llama_batch import Sequence as LlamaSequence
from prism.lm.llama_weights import decode_weights
from prism.lm.models import chat_prompt, encode

FIRST_SLOT_TOKENS = 512  # a slot's size until a stage's prompts need more (each stage grows the slots to fit)
# An F32 KV cache, so attention without flash attention (see lm/llama_batch.KV_TYPES): the judge's verdicts stay
# within 1e-3 of the transformers engine (F16 under flash attention: 1.8e-3 off on the tiny test model), and its
# long verdict prompts prefill faster that way (548 against 488 tok/s for 479 tokens on the embedded model), while the
# answers decode slower (319 against 418 tok/s at 32 streams); slots sized to each stage's prompts keep it small
# (32 x 1024 tokens: 1.5 GB on the embedded model)
KV_TYPE = "f32"


class LlamaCppEngine:
    """The bootstrap's generating stages (and the judge) on llama.cpp, `slots` prompts at a time."""

    def __init__(self, llama: BatchedLlama, tokenizer: Any, source: Path, weights_type: str = "as-is"):
        self.llama, self.tokenizer, self.source, self.weights_type = llama, tokenizer, source, weights_type
        self.eos_ids = {tokenizer.eos_token_id, llama.weights.token_eos()} - {None, -1}
        self.max_tokens = llama.weights.n_ctx_train()  # what the model was trained on: slots grow up to it

    @classmethod
    def open(cls, model: str, tokenizer: Any, gguf: str | None = None, n_threads: int | None = None,
             slots: int = 32, gguf_weights: str = DEFAULT_GGUF_WEIGHTS) -> LlamaCppEngine:
        path = base_gguf_for({"model": model}, gguf)
        weights, weights_type = decode_weights(path, gguf_weights, slots)
        llama = BatchedLlama({"base": RouteSpec(weights)}, slots=slots, slot_tokens=FIRST_SLOT_TOKENS,
                             threads=n_threads or default_threads(), kv_type=KV_TYPE)
        try:
            check_vocabulary(llama.weights, tokenizer, path)
        except BaseException:
            llama.close()
            raise
        return cls(llama, tokenizer, path, weights_type)

    def describe(self) -> dict[str, Any]:
        return {"kind": "llamacpp", "model": str(self.source), "weights": self.weights_type,
                "threads": self.llama.threads, "sequences": self.llama.slots}

    def _ids(self, prompt: Prompt) -> list[int]:
        text = chat_prompt(self.tokenizer, prompt.user, system=prompt.system, assistant_prefix=prompt.assistant_prefix)
        ids = encode(self.tokenizer, text)
        if len(ids) >= self.max_tokens:
            raise ContextLengthError(f"a prompt of {len(ids)} tokens does not fit the model's context of "
                                     f"{self.max_tokens} tokens")
        return ids

    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int, temperature: float, seeds: Sequence[int],
                 batch_size: int, desc: str = "generate", first_line_only: bool = False, top_p: float = NO_NUCLEUS
                 ) -> Iterator[tuple[list[int], list[Generation]]]:
        """Yields each prompt's generation as it finishes (in any order)."""
        encoded = [self._ids(p) for p in prompts]
        if not encoded:
            return
        self.llama.grow(min(self.max_tokens, max(len(ids) for ids in encoded) + max_new_tokens))
        finished: queue.Queue[tuple[int, Generation] | BaseException] = queue.Queue()
        sequences = [self._generation(i, ids, SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                                             top_p=top_p, seed=seeds[i]), first_line_only, finished.put)
                     for i, ids in enumerate(encoded)]
        yield from self._collect(sequences, finished, desc, "prompt")

    def _generation(self, index: int, ids: list[int], params: SamplingParams, first_line_only: bool,
                    put: Callable[[tuple[int, Generation] | BaseException], None]) -> LlamaSequence:
        budget = min(params.max_tokens, self.llama.slot_tokens - len(ids))  # as much as the context leaves
        generator, tokens = params.generator(), []

        def on_logits(logits: torch.Tensor) -> int | None:
            token = sample_token(logits[-1], params, generator)
            ended = token in self.eos_ids
            if not ended:
                tokens.append(token)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if ended or len(tokens) >= budget or (first_line_only and has_complete_line(text)):
                put((index, Generation(text, len(tokens), ended)))
                return None
            return token

        return LlamaSequence(ids, on_logits, max_new_tokens=budget, on_end=_errors_to(put))

    def option_probs(self, prompts: Sequence[Prompt], options: Sequence[str], *, batch_size: int,
                     desc: str = "score") -> list[OptionProbs]:
        """The judge's verdicts from llama.cpp's next-token distribution after each prompt (prefill only)."""
        option_ids = option_token_ids(self.tokenizer, options)
        encoded = [self._ids(p) for p in prompts]
        if not encoded:
            return []
        self.llama.grow(max(len(ids) for ids in encoded) + 1)
        scored: queue.Queue[tuple[int, OptionProbs] | BaseException] = queue.Queue()

        def verdict(index: int) -> Callable[[torch.Tensor], None]:
            def on_logits(logits: torch.Tensor) -> None:
                scored.put((index, options_from_logits(logits[-1], option_ids)))
            return on_logits

        sequences = [LlamaSequence(ids, verdict(i), on_end=_errors_to(scored.put)) for i, ids in enumerate(encoded)]
        verdicts: list[OptionProbs | None] = [None] * len(sequences)
        for indices, results in self._collect(sequences, scored, desc, "prompt"):
            verdicts[indices[0]] = results[0]
        return verdicts  # type: ignore[return-value]

    def _collect(self, sequences: list[LlamaSequence], results: queue.Queue, desc: str, unit: str) -> Iterator[Any]:
        """Submit every sequence and yield ([index], [result]) as each is put, with a progress bar; an error
        (or the caller stopping) cancels the rest."""
        try:
            for sequence in sequences:
                self.llama.submit("base", sequence)
            with tqdm(total=len(sequences), desc=desc, unit=unit, leave=False) as bar:
                for _ in sequences:
                    item = results.get()
                    if isinstance(item, BaseException):
                        raise item
                    bar.update()
                    yield [item[0]], [item[1]]
        finally:
            for sequence in sequences:
                sequence.cancel()

    def close(self) -> None:
        self.llama.close()


def _errors_to(put: Callable[[Any], None]) -> Callable[[BaseException | None], None]:
    def on_end(error: BaseException | None) -> None:
        if error is not None:
            put(error)
    return on_end
