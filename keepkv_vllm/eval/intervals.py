"""95 % intervals beside every keepkv-eval score, so a ranking is read with its uncertainty.

Scores (needle, RULER): Wilson's interval for a proportion over the items (exact coverage
reasoning for 0/1 scores such as the needle; for fractional scores, vartrack and cwe, it
treats the summed score as the count of successes, an approximation). Perplexity: the
per-token NLL of each scored passage cut into chunks of ``PPL_CHUNK`` tokens, the chunks'
mean NLL with its standard error, exponentiated (tokens inside a chunk are correlated; chunks
much less so).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z_95 = 1.959964
PPL_CHUNK = 16


def wilson(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion, as fractions in [0, 1]."""
    if n <= 0:
        raise ValueError("an interval needs at least one item")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def perplexity_interval(
    logprobs: Sequence[Sequence[float]], chunk: int = PPL_CHUNK, z: float = Z_95
) -> tuple[float, float] | None:
    """Interval of exp(mean NLL per token) over chunks of ``chunk`` tokens of every passage;
    None under two chunks (no spread to estimate)."""
    means = []
    for passage in logprobs:
        for start in range(0, len(passage), chunk):
            part = passage[start : start + chunk]
            means.append(-sum(part) / len(part))
    if len(means) < 2:
        return None
    mean = sum(means) / len(means)
    se = math.sqrt(sum((m - mean) ** 2 for m in means) / (len(means) - 1) / len(means))
    return math.exp(mean - z * se), math.exp(mean + z * se)
