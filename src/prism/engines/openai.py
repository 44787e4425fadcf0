"""A generation engine backed by any OpenAI-compatible server (vLLM, llama.cpp server, Ollama, `prism serve`).

Requests go out concurrently from a bounded thread pool; the openai client retries 408/409/429/5xx
answers, timeouts and dropped connections with exponential backoff. Each finished request is handed back
at once (the stages save it at once), so a server that goes away costs only the requests in flight: the
stage stops with a message, and re-running the same command sends only what is missing.

Reply prefixes ("Verdict:", "You are") are sent as a final assistant message with vLLM's
`continue_final_message` (which `prism serve` understands too); the judge's verdict is read from the
top log-probabilities of the first reply token when the server returns them, else parsed from the text.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from tqdm.auto import tqdm

from prism.engines.base import Generation, OptionProbs, Prompt
from prism.errors import PrismError
from prism.lm.decoding import NO_NUCLEUS

log = logging.getLogger("prism")
TOP_LOGPROBS = 20  # OpenAI's maximum; enough for three one-word options


class OpenAIEngine:
    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, concurrency: int = 8,
                 timeout_s: float = 120.0, max_retries: int = 8):
        import openai

        if not base_url or not model:
            raise PrismError("the openai engine needs --base-url (e.g. http://localhost:8000/v1) and --engine-model "
                             "(the model name that server knows)")
        if concurrency < 1:
            raise PrismError(f"engine concurrency must be at least 1, got {concurrency}")
        self.base_url, self.model, self.concurrency = base_url, model, concurrency
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout_s,
                                    max_retries=max_retries)
        self.logprobs_supported: bool | None = None  # learned from the first judged reply

    def describe(self) -> dict[str, Any]:
        return {"kind": "openai", "base_url": self.base_url, "model": self.model, "concurrency": self.concurrency}

    def _request(self, prompt: Prompt, **params: Any) -> Any:
        import openai

        messages: list[dict[str, str]] = prompt.messages()
        extra: dict[str, Any] = {}
        if prompt.assistant_prefix:
            messages.append({"role": "assistant", "content": prompt.assistant_prefix})
            extra = {"continue_final_message": True, "add_generation_prompt": False}
        try:
            return self.client.chat.completions.create(model=self.model, messages=messages,
                                                       extra_body=extra or None, **params)
        except openai.APIStatusError as exc:
            raise PrismError(f"the engine at {self.base_url} answered {exc.status_code}: {_error_message(exc)}"
                             ) from None
        except openai.APIError as exc:  # connection refused or timed out after every retry
            raise PrismError(f"the engine at {self.base_url} is unreachable ({type(exc).__name__}: {exc})"
                             ) from None

    def _pool(self, prompts: Sequence[Prompt], call: Any, desc: str) -> Iterator[tuple[int, Any]]:
        """(index, result) per prompt as each finishes. On a failure nothing new is sent, the requests in
        flight are still collected (so their results are saved), then the error is raised."""
        bar = tqdm(total=len(prompts), desc=desc, unit="request", leave=False)
        pending: dict[Future, int] = {}
        upcoming = iter(range(len(prompts)))
        error: PrismError | None = None
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="prism-engine") as pool:
            def fill() -> None:
                while error is None and len(pending) < self.concurrency:
                    index = next(upcoming, None)
                    if index is None:
                        return
                    pending[pool.submit(call, index, prompts[index])] = index

            fill()
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    index = pending.pop(future)
                    try:
                        result = future.result()
                    except PrismError as exc:
                        error = error or exc
                        continue
                    bar.update(1)
                    yield index, result
                fill()
        bar.close()
        if error is not None:
            raise PrismError(f"{error}. What finished is saved: re-run the same command to resume") from None

    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int | None, temperature: float,
                 seeds: Sequence[int], batch_size: int, desc: str = "generate", first_line_only: bool = False,
                 top_p: float = NO_NUCLEUS) -> Iterator[tuple[list[int], list[Generation]]]:
        # batch_size and first_line_only are local batching details: the server batches on its own, and
        # the stages keep the first line themselves. max_new_tokens None: the server's own limit.
        cap = {} if max_new_tokens is None else {"max_tokens": max_new_tokens}
        nucleus = {} if top_p >= NO_NUCLEUS else {"top_p": top_p}  # a server's own default stays where none is asked

        def call(index: int, prompt: Prompt) -> Generation:
            response = self._request(prompt, temperature=temperature, seed=seeds[index], **cap, **nucleus)
            choice = response.choices[0]
            tokens = response.usage.completion_tokens if response.usage else 0
            return Generation(choice.message.content or "", tokens, choice.finish_reason != "length")

        for index, generation in self._pool(prompts, call, desc):
            yield [index], [generation]

    def option_probs(self, prompts: Sequence[Prompt], options: Sequence[str], *, batch_size: int,
                     desc: str = "score") -> list[OptionProbs]:
        def call(index: int, prompt: Prompt) -> OptionProbs:
            response = self._request(prompt, max_tokens=3, temperature=0.0, logprobs=True,
                                     top_logprobs=TOP_LOGPROBS)
            choice = response.choices[0]
            content = getattr(choice.logprobs, "content", None) if choice.logprobs else None
            if content:
                probs = options_from_top_logprobs(content[0].top_logprobs, options)
                if probs is not None:
                    return probs
            return options_from_text(choice.message.content or "", options)

        results: list[OptionProbs | None] = [None] * len(prompts)
        for index, result in self._pool(prompts, call, desc):
            results[index] = result
        parsed = any(r is not None and r.source.startswith("text") for r in results)
        if parsed and self.logprobs_supported is None:
            self.logprobs_supported = False
            log.warning("%s returned no usable log-probabilities: verdicts are parsed from the reply text "
                        "(no probabilities, so position calibration has less to work with)", self.base_url)
        return results  # type: ignore[return-value]


def options_from_top_logprobs(top: Sequence[Any], options: Sequence[str]) -> OptionProbs | None:
    """The options' probabilities from the first reply token's top log-probabilities: a token counts for
    the option it spells out, else for the one option it begins ("T" and "TIE" both count for TIE; "1" counts
    for "1", not "10"). None when no top token names an option."""
    mass = dict.fromkeys(options, 0.0)
    for entry in top:
        token = entry.token.strip()
        owner = [token] if token in mass else [o for o in options if token and o.startswith(token)]
        if len(owner) == 1:
            mass[owner[0]] += math.exp(entry.logprob)
    total = sum(mass.values())
    if total <= 0:
        return None
    return OptionProbs({o: m / total for o, m in mass.items()}, total, "logprobs")


def options_from_text(text: str, options: Sequence[str]) -> OptionProbs:
    """The option a reply names first ("B", "[[B]]", "Verdict: TIE."). A reply that names none counts as
    the last option (TIE for the judge): it is no evidence for either answer."""
    cleaned = re.sub(r"^\W*(verdict\s*:)?\W*", "", text.strip(), flags=re.I)
    for option in sorted(options, key=len, reverse=True):
        if re.match(rf"{re.escape(option)}\b", cleaned):
            return OptionProbs({o: float(o == option) for o in options}, None, "text")
    return OptionProbs({o: float(o == options[-1]) for o in options}, None, "text-unparsed")


def _error_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    return str(exc)
