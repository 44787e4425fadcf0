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

import atexit
import logging
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from prism.decoding import SamplingParams, TextStream, sample_token
from prism.engine import (
    Generation,
    OptionProbs,
    Prompt,
    has_complete_line,
    option_token_ids,
    options_from_logits,
)
from prism.errors import PrismError
from prism.gguf_export import (
    ADAPTER_FILE,
    EXPORT_DIR,
    MERGED_FILE,
    base_gguf_for,
    export_gguf,
    export_is_current,
    recorded_base_gguf,
)
from prism.llamacpp_probe import REBUILD_HINT, probe_failure
from prism.models import EMBEDDED, chat_prompt, embedded_gguf_path, encode
from prism.routing import (
    ContextLengthError,
    GatedModel,
    GenerationRequest,
    RouteDecision,
    Router,
    StreamEvent,
    decode_step,
    open_finished_run,
)

log = logging.getLogger("prism")
ENGINES = ("auto", "llamacpp", "transformers")
INSTALL_HINT = "pip install llama-cpp-python (it compiles llama.cpp: about 10 minutes on 2 cores)"
_warned: set[str] = set()


def llama_cpp_missing() -> str | None:
    """Why llama-cpp-python cannot be used here, or None when it can."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as exc:  # ImportError, or OSError when its shared library failed to build or load
        return f"{type(exc).__name__}: {exc}"
    return None


def resolve_engine(requested: str, model: str, gguf: str | None) -> str:
    """'llamacpp' or 'transformers' for a run's model. 'auto' takes llama.cpp when the model is GGUF (the
    embedded default, or --gguf given) and the llama.cpp build loads and passes its start-up probe; otherwise
    transformers, with one warning saying why. A missing llama-cpp-python falls back whichever was asked for;
    an installed build that fails its probe is an error when llama.cpp was asked for by name."""
    if requested not in ENGINES:
        raise PrismError(f"unknown engine {requested!r}: choose one of {', '.join(ENGINES)}")
    if requested == "transformers":
        return "transformers"
    is_gguf = model == EMBEDDED or gguf is not None
    if not is_gguf:
        if requested == "llamacpp":
            raise PrismError(f"--engine llamacpp needs a GGUF of the model {model!r}: convert it with llama.cpp's "
                             "convert_hf_to_gguf.py and pass it with --gguf")
        return "transformers"
    missing = llama_cpp_missing()
    if missing:
        _warn_once(f"llama-cpp-python is unavailable ({missing}): using transformers, several times slower on a "
                   f"CPU. To get the fast engine: {INSTALL_HINT}")
        return "transformers"
    broken = build_failure(Path(gguf) if gguf is not None else embedded_gguf_path())
    if broken:
        if requested == "llamacpp":
            raise PrismError(broken + "; or pass --engine transformers")
        _warn_once(f"{broken}. Using transformers meanwhile, several times slower on a CPU.")
        return "transformers"
    return "llamacpp"


def build_failure(gguf: Path) -> str | None:
    """Why this llama.cpp build cannot run `gguf` here (its start-up probe failed), with how to rebuild it."""
    failure = probe_failure(gguf)
    if failure is None:
        return None
    return f"this llama.cpp build cannot run {gguf.name} on this machine ({failure}): {REBUILD_HINT}"


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_open_models: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_models() -> None:
    # llama-cpp-python frees its models in __del__, which at interpreter exit runs after its own module
    # globals are gone and prints a traceback; closing them first keeps the exit quiet.
    for llm in list(_open_models):
        llm.close()


def open_llama(path: Path, *, lora: Path | None = None, n_ctx: int, n_threads: int | None = None) -> Any:
    import llama_cpp
    from llama_cpp import Llama

    broken = build_failure(path)  # a build that dies on this model must not take this process down
    if broken:
        raise PrismError(broken)
    threads = n_threads or default_threads()
    try:
        # An F32 KV cache (llama.cpp defaults to F16) keeps the engine closer to PyTorch: on the embedded
        # model teacher-forced greedy agreement went from 96-97% to 97.5-98% (16 queries x 32 positions).
        llm = Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=n_ctx, n_batch=512,
                    n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False,
                    type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    except (ValueError, RuntimeError) as exc:
        what = f"{path} with the LoRA {lora}" if lora else str(path)
        raise PrismError(f"llama.cpp cannot load {what}: {exc}") from None
    _open_models.add(llm)
    return llm


class LlamaContext:
    """One llama.cpp context fed token ids: a prompt reuses whatever prefix the previous one left in the
    KV cache, then each step evaluates one token and returns the next-token logits."""

    def __init__(self, llm: Any):
        import llama_cpp

        self.llm = llm
        self._get_logits = llama_cpp.llama_get_logits_ith
        self.n_vocab = llm.n_vocab()

    @property
    def n_ctx(self) -> int:
        return self.llm.n_ctx()

    def logits(self) -> torch.Tensor:
        pointer = self._get_logits(self.llm.ctx, -1)
        return torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy())

    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        cached = self.llm.input_ids[: self.llm.n_tokens]
        reuse = 0
        limit = min(len(cached), len(ids) - 1)  # at least one token is evaluated, for fresh logits
        while reuse < limit and cached[reuse] == ids[reuse]:
            reuse += 1
        self.llm.n_tokens = reuse  # eval() drops the cache from here on
        self.llm.eval(list(ids[reuse:]))
        return self.logits()

    def step(self, token: int) -> torch.Tensor:
        self.llm.eval([token])
        return self.logits()

    def stop_ids(self, tokenizer: Any) -> set[int]:
        """The tokens that end a reply: the run's tokenizer's EOS and the GGUF's own."""
        return {tokenizer.eos_token_id, self.llm.token_eos()} - {None, -1}

    def forget(self) -> None:
        self.llm.n_tokens = 0

    def teacher_forced_logits(self, prompt: Sequence[int], continuation: Sequence[int]) -> torch.Tensor:
        """Next-token logits after the prompt and after each continuation token but the last: (len, vocab)."""
        rows = [self.prefill(prompt)]
        rows += [self.step(token) for token in continuation[:-1]]
        return torch.stack(rows)


def check_vocabulary(context: LlamaContext, tokenizer: Any, source: Path) -> None:
    """The GGUF must tokenize like the run's tokenizer: PRISM hands llama.cpp token ids, not text."""
    probe = "PRISM probe: Hello, world! 123 <|im_start|>"
    ours = encode(tokenizer, probe)
    theirs = context.llm.tokenize(probe.encode(), add_bos=False, special=True)
    if ours != theirs or context.n_vocab < len(tokenizer):
        raise PrismError(f"{source} does not share the run's tokenizer (token ids differ): it is a GGUF of another "
                         "model; pass the GGUF of the run's base model with --gguf")


class LlamaCppModel(GatedModel):
    """A bootstrapped run on llama.cpp: the same `generate`/`stream`/`decide` as PrismModel."""

    engine = "llamacpp"

    def __init__(self, router: Router, base: LlamaContext, persona: LlamaContext | None, *,
                 run_path: Path | None = None, persona_source: str = "none", max_model_len: int | None = None):
        self.router = router
        self.gate = router.gate
        self.tokenizer = router.lm.tokenizer
        self.run_path = run_path
        self.contexts = {"base": base, "persona": persona}
        self.persona_source = persona_source  # "merged", "lora" or "none"
        self.max_model_len = min(max_model_len or base.n_ctx, base.n_ctx)
        self.eos_ids = base.stop_ids(self.tokenizer)
        self._lock = threading.Lock()

    @classmethod
    def from_run(cls, run_dir: str | Path, *, gguf: str | Path | None = None, threshold: float | None = None,
                 max_model_len: int | None = None, n_threads: int | None = None, persona: str = "auto",
                 trust_remote_code: bool = False) -> LlamaCppModel:
        """Load a finished run on llama.cpp. The adapter is exported to RUN/gguf/adapter.gguf first when that
        file is missing or older than the run's adapter. `persona`: 'auto' (the merged GGUF when exported,
        else the LoRA), 'merged' or 'lora'."""
        if persona not in ("auto", "merged", "lora"):
            raise PrismError(f"persona must be 'auto', 'merged' or 'lora', got {persona!r}")
        run, _manifest, config = open_finished_run(run_dir, trust_remote_code)
        base_path = base_gguf_for(config, gguf or recorded_base_gguf(run.path))
        router = Router.from_run(run.path, device="cpu", threshold=threshold, trust_remote_code=trust_remote_code)
        context_size = max_model_len or getattr(router.lm.model.config, "max_position_embeddings", None) or 4096
        base = LlamaContext(open_llama(base_path, n_ctx=context_size, n_threads=n_threads))
        check_vocabulary(base, router.lm.tokenizer, base_path)
        persona_context, source = None, "none"
        if router.has_adapter:
            out = run.path / EXPORT_DIR
            if not export_is_current(run.path, base_path):
                log.info("exporting the run's adapter to %s for llama.cpp", out / ADAPTER_FILE)
                export_gguf(run.path, base_gguf=base_path)
            merged = out / MERGED_FILE
            if persona == "merged" and not merged.is_file():
                raise PrismError(f"{merged} does not exist: run `prism export gguf {run.path} --merged` first")
            if persona in ("auto", "merged") and merged.is_file():
                persona_context, source = LlamaContext(open_llama(merged, n_ctx=context_size, n_threads=n_threads)), \
                    "merged"
            else:
                persona_context, source = LlamaContext(open_llama(base_path, lora=out / ADAPTER_FILE,
                                                                  n_ctx=context_size, n_threads=n_threads)), "lora"
        return cls(router, base, persona_context, run_path=run.path, persona_source=source,
                   max_model_len=max_model_len)

    @property
    def has_adapter(self) -> bool:
        return self.contexts["persona"] is not None

    def decide(self, conversations: Sequence[list[dict[str, str]]]) -> list[RouteDecision]:
        return self.router.decide(conversations)

    def context(self, route: str) -> LlamaContext:
        context = self.contexts[route]
        if context is None:
            raise PrismError("this run has no adapter (its distill stage was skipped): the persona route is "
                             "unavailable")
        return context

    def stream(self, requests: Sequence[GenerationRequest]) -> Iterator[StreamEvent]:
        """Each request's route first (all of them), then each request's text and completion in turn."""
        if not requests:
            return
        with self._lock:
            encoded = [encode(self.tokenizer, self.prompt(r.messages, r.assistant_prefix)) for r in requests]
            for ids, request in zip(encoded, requests):
                self.check_length(len(ids), request.params.max_tokens)
            decisions = self._decisions(list(requests))
            for i, decision in enumerate(decisions):
                self.context(decision.route)
                yield StreamEvent(i, decision=decision)
            for i, (request, ids) in enumerate(zip(requests, encoded)):
                yield from self._reply(i, request, decisions[i], ids)

    def _decisions(self, requests: list[GenerationRequest]) -> list[RouteDecision]:
        decisions: list[RouteDecision | None] = [
            RouteDecision(r.route, None, forced=True) if r.route != "auto" else None for r in requests]
        gated = [i for i, d in enumerate(decisions) if d is None]
        if gated:
            for i, decision in zip(gated, self.router.decide([requests[i].messages for i in gated])):
                decisions[i] = decision
        return decisions  # type: ignore[return-value]

    def _reply(self, index: int, request: GenerationRequest, decision: RouteDecision, ids: list[int]
               ) -> Iterator[StreamEvent]:
        context = self.context(decision.route)
        text = TextStream(self.tokenizer, request.params.stop)
        logprobs: list[dict[str, Any]] | None = [] if request.params.logprobs is not None else None
        generator = request.params.generator()
        logits = context.prefill(ids)
        while True:
            token = sample_token(logits, request.params, generator)
            events = decode_step(index, request, decision, text, logprobs, token, logits, self.eos_ids, len(ids))
            yield from events
            if events and events[-1].completion is not None:
                return
            logits = context.step(token)


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
