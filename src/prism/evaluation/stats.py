"""Confidence intervals and paired tests for the evaluation tables."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

Z95 = 1.959963984540054


def wilson_interval(successes: int, total: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound at 0 and 1, unlike the normal approximation)."""
    if total == 0:
        return (float("nan"), float("nan"))
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_mean_interval(values: Sequence[float], rounds: int = 2000, resample_seed: int = 0
                            ) -> tuple[float, float]:
    """95% percentile-bootstrap interval of a mean."""
    if not values:
        return (float("nan"), float("nan"))
    rng = random.Random(resample_seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(rounds))
    return (means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1])


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs (a right where b is wrong, and back)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_accuracy_test(system: Sequence[bool], base: Sequence[bool]) -> dict[str, float]:
    """Accuracy difference against base on the same items, with McNemar's exact test."""
    if len(system) != len(base):
        raise ValueError("paired comparison needs the same items for both systems")
    only_system = sum(1 for s, b in zip(system, base) if s and not b)
    only_base = sum(1 for s, b in zip(system, base) if b and not s)
    n = len(system)
    differences = [int(s) - int(b) for s, b in zip(system, base)]
    return {"delta": (only_system - only_base) / n if n else float("nan"),
            "delta_ci": list(bootstrap_mean_interval(differences)), "items": n,
            "only_system": only_system, "only_base": only_base, "p_value": mcnemar_exact(only_system, only_base)}
