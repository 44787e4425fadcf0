"""The bootstrap engine on llama.cpp: the generating stages and the judge, one prompt at a time over one
`LlamaContext` (the run's tokenizer renders and tokenizes)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from prism.engines.base import Generation, OptionProbs, Prompt, has_complete_line, option_token_ids, options_from_logits
from prism.errors import ContextLengthError
from prism.lm.decoding import SamplingParams
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
            budget = min(max_new_tokens, self.context.n_ctx - len(ids))
            tokens, finished = [], False
            for token, _logits in islice(self.context.sample(ids, params), budget):
                if token in self.eos_ids:
                    finished = True
                    break
                tokens.append(token)
                if first_line_only and has_complete_line(self.tokenizer.decode(tokens, skip_special_tokens=True)):
                    break
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            yield [index], [Generation(text, len(tokens), finished)]

    def option_probs(self, prompts: Sequence[Prompt], options: Sequence[str], *, batch_size: int,
                     desc: str = "score") -> list[OptionProbs]:
        """The judge's verdicts from llama.cpp's next-token distribution after each prompt."""
        option_ids = option_token_ids(self.tokenizer, options)
        return [options_from_logits(self.context.prefill(self._ids(p)), option_ids)
                for p in tqdm(prompts, desc=desc, leave=False)]

