"""A PRISM run as a model of EleutherAI's lm-evaluation-harness, registered under the name `prism`.

Each request is presented to the run as `prism serve` presents a chat request: the harness's context is the
user turn, rendered with the run's chat template (the persona in the system prompt for system=persona), and
a continuation is scored as the start of the assistant's reply. The route is decided per request as in
serving: `prism` asks the gate (its layer's states over the rendered user turn), `base` and `lora` force the base
model or the adapter, `persona` is the base model with the persona of the request's domain, chosen as `prism eval`
chooses it. `loglikelihood_rolling` scores a document's own text (no template), in windows of the context.
Requests are scored in batches that mix routes, through `GatedModel.score_tokens` and `generate_batch`.

    lm_eval.simple_evaluate(model=PrismLM(run="runs/demo", system="prism"), tasks=[...])
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from prism.config import LOCAL_ENGINE
from prism.errors import PrismError
from prism.evaluation.config import HARNESS_BATCH, HARNESS_SYSTEMS, MMLU_PERSONA_DOMAINS
from prism.evaluation.context import messages_for, run_personas
from prism.evaluation.data import SUBJECT_DOMAIN
from prism.inference.base import GatedModel, GenerationRequest, RouteDecision
from prism.lm.decoding import SamplingParams
from prism.lm.models import encode
from prism.runs import RunDir

FORCED_ROUTE = {"base": "base", "persona": "base", "lora": "persona"}
ARC_DOMAIN = "STEM"  # prism eval's domain of every ARC item


@register_model("prism")
class PrismLM(LM):
    """`model_args`: run=RUN (or model=a loaded GatedModel, in Python), system=base|persona|lora|prism,
    engine=auto|transformers|llamacpp, persona_domain=DOMAIN (system=persona, for tasks whose documents name
    no MMLU subject), batch_size (requests per scoring batch)."""

    def __init__(self, run: str | None = None, system: str = "prism", model: GatedModel | None = None,
                 engine: str = LOCAL_ENGINE, persona_domain: str | None = None, batch_size: int | str | None = None,
                 **_harness_options: Any):  # device, max_batch_size: the run's loading config decides them
        super().__init__()
        if system not in HARNESS_SYSTEMS:
            raise PrismError(f"system must be one of {', '.join(HARNESS_SYSTEMS)}, got {system!r}")
        if model is None:
            if run is None:
                raise PrismError("the prism model needs run=RUN (a finished `prism bootstrap` run)")
            from prism.inference.loading import load_gated_model

            model = load_gated_model(run, engine=engine)
        if system == "lora" and not model.has_adapter:
            raise PrismError("system=lora needs the run's adapter, and this run has none (distill was skipped)")
        self.model, self.system, self.persona_domain = model, system, persona_domain
        self.batch_size = int(batch_size) if str(batch_size).isdigit() and int(batch_size) > 0 else HARNESS_BATCH
        self.personas = run_personas(RunDir(model.run_path)) if system == "persona" and model.run_path else {}
        self.decisions: dict[str, list[RouteDecision]] = defaultdict(list)  # per task, one per distinct context
        self._decided: dict[tuple[str | None, str], RouteDecision] = {}

    # -- what the harness asks ---------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool]] = []
        for batch in _batches(requests, self.batch_size, disable_tqdm, "loglikelihood"):
            messages = [self._messages(r) for r in batch]
            decisions = self._decide(batch, messages)
            sequences, counts = [], []
            for request, conversation in zip(batch, messages):
                prompt = self.model.prompt(conversation)
                continuation = request.args[1]
                prompt_ids = encode(self.model.tokenizer, prompt)
                ids = encode(self.model.tokenizer, prompt + continuation)
                counts.append(max(1, len(ids) - len(prompt_ids)))
                sequences.append(ids)
            for scores, count in zip(self.model.score_tokens(sequences, decisions), counts):
                results.append((sum(scores.logprobs[-count:]), all(scores.greedy[-count:])))
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        tokenizer = self.model.tokenizer
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        results = []
        for request in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm, leave=False):
            text = request.args[0]
            decision = self._decide([request], [[{"role": "user", "content": text}]])[0]
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                encode(tokenizer, text), prefix, self.model.max_model_len, 1)]
            total = 0.0
            for start in range(0, len(windows), self.batch_size):
                chunk = windows[start:start + self.batch_size]
                scored = self.model.score_tokens([list(c) + list(p) for c, p in chunk], [decision] * len(chunk))
                total += sum(sum(s.logprobs[-len(p):]) for s, (_c, p) in zip(scored, chunk))
            results.append(total)
        return results

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        texts = []
        for batch in _batches(requests, self.batch_size, disable_tqdm, "generate_until"):
            messages = [self._messages(r) for r in batch]
            decisions = self._decide(batch, messages)
            jobs = []
            for request, conversation, decision in zip(batch, messages, decisions):
                options = dict(request.args[1])
                until = options.get("until") or []
                params = SamplingParams(max_tokens=int(options.get("max_gen_toks", 256)),
                                        temperature=float(options.get("temperature", 0.0))
                                        if options.get("do_sample", False) else 0.0,
                                        stop=[until] if isinstance(until, str) else list(until))
                jobs.append(GenerationRequest(conversation, decision.route, params, persona=decision.persona))
            texts += [c.text for c in self.model.generate_batch(jobs)]
        return texts

    # -- routing -----------------------------------------------------------------------------------------
    def routing_shares(self) -> dict[str, float]:
        """Per task, the share of its distinct contexts the gate sent to an adapter (system=prism)."""
        return {task: sum(d.route != "base" for d in decided) / len(decided)
                for task, decided in self.decisions.items() if decided}

    def _decide(self, requests: Sequence[Any], messages: list[list[dict[str, str]]]) -> list[RouteDecision]:
        """The route of each request: the gate's on its user turn (each distinct context decided once, as a
        choice of a multiple-choice question shares its context with the others), or the system's own."""
        keys = [(r.task_name, r.args[0]) for r in requests]
        if self.system != "prism":
            decision = RouteDecision(FORCED_ROUTE[self.system], None, forced=True)
            new = [k for k in dict.fromkeys(keys) if k not in self._decided]
            for key in new:
                self._decided[key] = decision
                self.decisions[str(key[0])].append(decision)
            return [decision] * len(requests)
        new = {k: m for k, m in zip(keys, messages) if k not in self._decided}
        if new:
            for key, decision in zip(new, self.model.decide(list(new.values()))):
                self._decided[key] = decision
                self.decisions[str(key[0])].append(decision)
        return [self._decided[k] for k in keys]

    def _messages(self, request: Any) -> list[dict[str, str]]:
        persona = self._persona(request) if self.system == "persona" else None
        return messages_for(self.system, request.args[0], persona)

    def _persona(self, request: Any) -> str:
        subject = request.doc.get("subject") if isinstance(request.doc, dict) else None
        if self.persona_domain:
            domain = self.persona_domain
        elif subject in SUBJECT_DOMAIN:
            domain = MMLU_PERSONA_DOMAINS[SUBJECT_DOMAIN[subject]]
        elif "arc" in str(request.task_name).lower():
            domain = MMLU_PERSONA_DOMAINS[ARC_DOMAIN]
        else:
            raise PrismError("system=persona needs the domain of this task's documents: pass persona_domain=DOMAIN "
                             f"(one of the run's: {', '.join(sorted(self.personas)) or 'none'})")
        persona = self.personas.get(domain.lower())
        if persona is None:
            raise PrismError(f"the run has no persona for the domain {domain!r}: run `prism eval RUN --bench mmlu "
                             "--systems persona` once (it writes the benchmark domains' personas into RUN/eval), or "
                             f"pass persona_domain= one of {', '.join(sorted(self.personas)) or 'none'}")
        return persona


def _batches(requests: list[Any], size: int, disable: bool, desc: str) -> Iterator[list[Any]]:
    with tqdm(total=len(requests), desc=desc, disable=disable, leave=False) as bar:
        for start in range(0, len(requests), size):
            batch = requests[start:start + size]
            yield batch
            bar.update(len(batch))

