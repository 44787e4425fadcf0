"""A short domain name for each cluster, written by the model from the cluster's most central prompts."""

from __future__ import annotations

import re
from collections.abc import Sequence

from prism.engines.base import Engine, Prompt

# no example names in the request: the embedded 135M model copied them as the name of most clusters
NAME_REQUEST = ("Here are requests that users sent to an assistant:\n{examples}\n\nWhat topic do these requests "
                "share? Answer with a short topic name of two to four words.")
NAME_PREFIX = "Topic:"
NAME_MAX_TOKENS = 12
NAME_MAX_CHARS = 40


def clean_name(raw: str) -> str:
    """The first line's first five words, lower case, punctuation gone; '' when no letter or digit is left."""
    words = re.sub(r"[^\w\s&/-]", " ", raw.strip().splitlines()[0] if raw.strip() else "").split()
    name = " ".join(words[:5]).lower()[:NAME_MAX_CHARS].strip(" -/&")
    return name if any(c.isalnum() for c in name) else ""


def name_clusters(engine: Engine, examples: Sequence[Sequence[str]], *, batch_size: int, seed: int) -> list[str]:
    """One distinct name per cluster (greedy decoding); a cluster the model leaves unnamed is 'topic N'."""
    prompts = [Prompt(NAME_REQUEST.format(examples="\n".join(f"- {e[:200]}" for e in group)),
                      assistant_prefix=NAME_PREFIX) for group in examples]
    names = [""] * len(prompts)
    for indices, outputs in engine.generate(prompts, max_new_tokens=NAME_MAX_TOKENS, temperature=0.0,
                                            seeds=[seed] * len(prompts), batch_size=batch_size,
                                            desc="naming clusters", first_line_only=True):
        for i, out in zip(indices, outputs):
            names[i] = clean_name(out.text)
    taken: set[str] = {"other"}
    for i, name in enumerate(names):
        name = name or f"topic {i + 1}"
        unique, n = name, 2
        while unique in taken:
            unique, n = f"{name} {n}", n + 1
        names[i] = unique
        taken.add(unique)
    return names
