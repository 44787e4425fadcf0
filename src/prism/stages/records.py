"""The records the verify stage writes and the later stages (and `prism ab`, `prism inspect`) read: a judgment
(`judgments.jsonl`) and the label it gives each query (`labels.jsonl`), each a dataclass with one reader.

A judgment's fields beside `id`, `query_id` and `kind` depend on its judge: pairwise the `order` and the A/B/TIE
`probs`; pointwise the `variant` (the answer judged), its `rating_probs` and expected rating `score`; verifier the
`variant`, the `verifier` and its `score`. A label has the query, both answers, the judge's `outcome` for the
persona (win, loss or tie), the 0/1 `label`, and the judge's evidence (`verdicts` for pairwise, else `scores`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from prism.runs import RunDir


def _known(cls: type, record: dict[str, Any]) -> dict[str, Any]:
    """The record's fields `cls` has (a record from a newer PRISM may carry more)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in record.items() if k in names}


@dataclass
class Judgment:
    id: str
    query_id: str
    kind: str = "pairwise"  # records made before other judges existed are pairwise
    order: str | None = None  # pairwise: persona_first (persona in slot A) or persona_second
    variant: str | None = None  # pointwise, verifier: the answer judged, persona or plain
    probs: dict[str, float] | None = None  # pairwise: A, B and TIE renormalized over the three
    option_mass: float | None = None  # pairwise: the probability the options held among all tokens
    verdict_source: str | None = None  # logits, logprobs or text
    raw_verdict: str | None = None  # pairwise: the argmax, before any position calibration
    rating_probs: dict[str, float] | None = None  # pointwise: the distribution over ratings 1-10
    rating_mass: float | None = None  # pointwise: the probability the rating tokens held
    score: float | None = None  # pointwise: the expected rating; verifier: the verifier's score
    verifier: str | None = None  # verifier: its spec
    sample: int | None = None  # with label_samples K > 1: which of the K answer pairs (None: the first)

    @property
    def pair(self) -> tuple[str, int]:
        """The answer pair the judgment is of: (query id, sample)."""
        return self.query_id, self.sample or 0

    @property
    def slot(self) -> str:
        """The order (pairwise) or the answer (the others) the judgment is of."""
        slot = self.order if self.kind == "pairwise" else self.variant
        assert slot is not None, f"judgment {self.id} names no order or answer"
        return slot

    def to_record(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Label:
    query_id: str
    persona_id: str
    domain: str
    query: str
    persona: str
    persona_answer: str
    plain_answer: str
    label: int  # 1: the persona won, its answer is distilled; 0: retained
    split: str  # distill or retain
    judge: str = "pairwise"
    outcome: str | None = None  # win, loss or tie for the persona (None in labels written before outcomes were)
    verdicts: dict[str, dict[str, Any]] | None = None  # pairwise: per order, the judgment and its calibrated verdict
    position_prior: dict[str, float] | None = None  # pairwise: the run's average slot preference, when calibrated
    scores: dict[str, float] | None = None  # pointwise, verifier: the persona's and the plain answer's score
    margin: float | None = None  # pointwise: what the persona's score had to beat the plain one's by
    verifier: str | None = None
    # With label_samples K: the outcome of each of the K answer pairs, the persona win rate over them (ties count
    # half) and its 95% Wilson interval. The answers and evidence above are of the first pair the persona won (else
    # the first pair). Labels written before K existed have none of these: their win rate follows from `outcome`.
    sample_outcomes: list[str] | None = None
    win_rate: float | None = None
    win_rate_interval: list[float] | None = None
    sample: int | None = None

    def to_record(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k == "position_prior"}

    @property
    def persona_win_rate(self) -> float:
        """The persona's win rate over the query's answer pairs, ties counting half."""
        if self.win_rate is not None:
            return self.win_rate
        if self.outcome is None:
            return float(self.label)
        return OUTCOME_SCORE[self.outcome]

    @property
    def samples(self) -> int:
        return len(self.sample_outcomes) if self.sample_outcomes else 1


OUTCOME_SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def win_rate(outcomes: list[str]) -> float:
    """The persona's win rate over answer pairs: a win counts 1, a tie half, a loss 0."""
    return sum(OUTCOME_SCORE[o] for o in outcomes) / len(outcomes)


def wilson_interval(rate: float, n: int, z: float = 1.96) -> list[float]:
    """The 95% Wilson score interval of a rate measured over n trials."""
    center = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return [max(0.0, center - half), min(1.0, center + half)]


def read_judgments(run: RunDir, name: str = "judgments") -> list[Judgment]:
    """The verify stage's judgments (or, `name` "adapter_judgments", the adapter_outcomes stage's)."""
    return [Judgment(**_known(Judgment, r)) for r in run.read(name)]


def read_labels(run: RunDir, name: str = "labels") -> list[Label]:
    """The verify stage's labels (or, `name` "adapter_labels", the adapter_outcomes stage's)."""
    return [Label(**_known(Label, r)) for r in run.read(name)]


def write_labels(run: RunDir, labels: list[Label], name: str = "labels") -> None:
    run.rewrite(name, [label.to_record() for label in labels])
