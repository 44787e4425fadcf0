"""The llama.cpp engine: generation in llama.cpp (llama-cpp-python) on GGUF weights, routing still PRISM's.

The gate reads block 0 computed in PyTorch (`Router`: tokenizer, embeddings and block 0 only). The reply
then comes from one of two llama.cpp contexts over the run's GGUF: the base context, or the persona context,
which holds the merged persona GGUF when `prism export gguf --merged` wrote one (no LoRA cost per token),
else the base GGUF with the exported LoRA. Two contexts keep each route's prompt cache warm and never
switch adapters mid-stream; benchmarks/engines.py compares them with switching the adapter per request
on one context. Prompts are rendered and tokenized by the run's own tokenizer, so both engines see the
same token ids. Requests run one at a time: batches of many requests are the transformers engine's job.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from prism.engines.base import Generation, OptionProbs, Prompt, has_complete_line, option_token_ids, options_from_logits
from prism.errors import ContextLengthError
from prism.lm.decoding import SamplingParams, sample_token
from prism.lm.llama import LlamaContext, base_gguf_for, check_vocabulary, open_llama
from prism.lm.models import chat_prompt, encode


class LlamaCppEngine:
    """The bootstrap's generating stages (and the judge) on llama.cpp, one prompt at a time."""

    def __init__(self, context: LlamaContext, tokenizer: Any, source: Path):
        self.context, self.tokenizer, self.source = context, tokenizer, source
        self.eos_ids = context.stop_ids(tokenizer)

    @classmethod
    def open(cls, model: str, tokenizer: Any, gguf: str | None = None, n_ctx: int = 4096,
             n_threads: int | None = None) -> LlamaCppEngine:
        path = base_gguf_for({"model": model}, gguf)
        context = LlamaContext(open_llama(path, n_ctx=n_ctx, n_threads=n_threads))
        check_vocabulary(context, tokenizer, path)
        return cls(context, tokenizer, path)

    def describe(self) -> dict[str, Any]:
        return {"kind": "llamacpp", "model": str(self.source), "threads": self.context.llm.n_threads}

    def _ids(self, prompt: Prompt) -> list[int]:
        text = chat_prompt(self.tokenizer, prompt.user, system=prompt.system, assistant_prefix=prompt.assistant_prefix)
        ids = encode(self.tokenizer, text)
        if len(ids) >= self.context.n_ctx:
            raise ContextLengthError(f"a prompt of {len(ids)} tokens does not fit llama.cpp's context of "
                                     f"{self.context.n_ctx} tokens")
        return ids

    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int, temperature: float, seeds: Sequence[int],
                 batch_size: int, desc: str = "generate", first_line_only: bool = False
                 ) -> Iterator[tuple[list[int], list[Generation]]]:
        for index, prompt in enumerate(tqdm(prompts, desc=desc, unit="prompt", leave=False)):
            ids = self._ids(prompt)
            params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=seeds[index])
            generator = params.generator()
            budget = min(max_new_tokens, self.context.n_ctx - len(ids))
            logits, tokens, finished = self.context.prefill(ids), [], False
            while len(tokens) < budget:
                token = sample_token(logits, params, generator)
                if token in self.eos_ids:
                    finished = True
                    break
                tokens.append(token)
                if first_line_only and has_complete_line(self.tokenizer.decode(tokens, skip_special_tokens=True)):
                    break
                logits = self.context.step(token)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            yield [index], [Generation(text, len(tokens), finished)]

    def option_probs(self, prompts: Sequence[Prompt], options: Sequence[str], *, batch_size: int,
                     desc: str = "score") -> list[OptionProbs]:
        """The judge's verdicts from llama.cpp's next-token distribution after each prompt."""
        option_ids = option_token_ids(self.tokenizer, options)
        return [options_from_logits(self.context.prefill(self._ids(p)), option_ids)
                for p in tqdm(prompts, desc=desc, leave=False)]

