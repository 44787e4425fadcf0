"""What a bootstrap engine is: the stages hand it chat prompts (`Prompt`) and get text back
(`Generation`), or the probabilities of a few one-word options (`OptionProbs`, the judge's verdicts).
Engines: `local` (transformers in this process), `openai` (any OpenAI-compatible server), `llamacpp`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import PreTrainedTokenizerBase

from prism.errors import PrismError
from prism.lm.decoding import NO_NUCLEUS
from prism.lm.models import first_token_ids


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
                 batch_size: int, desc: str = "generate", first_line_only: bool = False, top_p: float = NO_NUCLEUS
                 ) -> Iterator[tuple[list[int], list[Generation]]]:
        """Yields (prompt indices, generations) as they finish, so the caller can save them at once.
        `seeds`: one per prompt, the seed of that prompt's own sampling; `top_p`: nucleus sampling's mass."""
        ...

    def option_probs(self, prompts: Sequence[Prompt], options: Sequence[str], *, batch_size: int,
                     desc: str = "score") -> list[OptionProbs]: ...


def option_token_ids(tokenizer: PreTrainedTokenizerBase, options: Sequence[str]) -> dict[str, list[int]]:
    """Each option's possible first tokens. A token that begins several options counts for the one it spells
    out exactly: with digits split, "1" begins both "1" and "10", and counts for "1" (the pointwise judge reads
    "10" in a second step); any other overlap cannot be told apart and is an error."""
    option_ids = {option: first_token_ids(tokenizer, option) for option in options}
    owners: dict[int, list[str]] = {}
    for option, ids in option_ids.items():
        for token in ids:
            owners.setdefault(token, []).append(option)
    for token, shared in owners.items():
        if len(shared) == 1:
            continue
        exact = [o for o in shared if tokenizer.decode([token]).strip() == o]
        if len(exact) != 1:
            raise PrismError(f"this tokenizer cannot tell the options {', '.join(options)} apart by their first "
                             f"token: {option_ids}")
        for option in shared:
            if option != exact[0]:
                option_ids[option] = [t for t in option_ids[option] if t != token]
    return option_ids


def options_from_logits(logits: torch.Tensor, option_ids: dict[str, list[int]]) -> OptionProbs:
    """Each option's probability is that of its first token(s), renormalized over the options."""
    probs = torch.softmax(logits.float(), dim=-1)
    mass = {option: float(probs[ids].sum()) for option, ids in option_ids.items()}
    total = sum(mass.values())
    return OptionProbs({option: m / total for option, m in mass.items()}, total, "logits")

