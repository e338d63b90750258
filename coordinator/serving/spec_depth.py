"""How many proposals a round should carry: expected tokens against what a check costs.

A round with k proposals brings 1 + (the proposals confirmed before the first miss) tokens: with
each proposal confirmed with odds p, (1 - p^(k+1)) / (1 - p) on average. What it costs depends
on the cluster: on the CPU every checked position adds to every matrix product, while on CUDA a
few more positions add little (worker/cuda_rows.py; docs/speculation.md). `RoundCosts` learns
that cost from the steps the serve runs (a line through the seconds of rounds of each size,
with a step without proposals as the least a round can cost), and `best` picks the k with the
most tokens a second. Until rounds of two sizes are timed it has no answer, and the request
falls back to growing k after a full round and shrinking it after a miss.
"""

from __future__ import annotations

import statistics
from collections import deque

ROUNDS = 3  # rounds of a size before its time counts
RECENT = 9  # a size's time: the median of its last this many rounds


class RoundCosts:
    """A round's seconds by its number of proposals, for one serve (what a check costs is the
    cluster's, whichever request it checks): the median of each size's latest rounds, so that
    a round that paid a one-time cost (the first check of a size building its kernels on a
    GPU, a pause) moves it little, where a running mean would carry it for many rounds."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}
        self.rounds: dict[int, int] = {}
        self._recent: dict[int, deque[float]] = {}

    def add(self, k: int, seconds: float) -> None:
        self.rounds[k] = self.rounds.get(k, 0) + 1
        recent = self._recent.setdefault(k, deque(maxlen=RECENT))
        recent.append(seconds)
        self.seconds[k] = statistics.median(recent)

    def estimate(self, most: int) -> dict[int, float] | None:
        """Seconds of a round of 1 to `most` proposals, on the least-squares line through the
        sizes timed at least ROUNDS times, never falling with k (a longer check never costs
        less) and never under a step without proposals (k = 0, where timed; else the cheapest
        size timed: an outlier can tilt the line); None until two sizes are."""
        timed = {k: s for k, s in self.seconds.items() if self.rounds[k] >= ROUNDS}
        points = [(k, s) for k, s in timed.items() if k > 0]
        if len(points) < 2:
            return None
        mean_k = sum(k for k, _ in points) / len(points)
        mean_s = sum(s for _, s in points) / len(points)
        spread = sum((k - mean_k) ** 2 for k, _ in points)
        slope = max(0.0, sum((k - mean_k) * (s - mean_s) for k, s in points) / spread)
        floor = timed.get(0, min(s for _, s in points))
        return {k: max(floor, mean_s + slope * (k - mean_k)) for k in range(1, most + 1)}


def expected_tokens(p: float, k: int) -> float:
    """Tokens a round of k proposals brings when each is confirmed with odds p."""
    return k + 1.0 if p >= 1 else (1 - p ** (k + 1)) / (1 - p)


def best(p: float, costs: RoundCosts, most: int) -> int | None:
    """The number of proposals, 1 to `most`, with the most tokens a second; None while the
    costs are not known."""
    seconds = costs.estimate(most)
    if seconds is None:
        return None
    rates = {k: expected_tokens(p, k) / s for k, s in seconds.items() if s > 0}
    if not rates:
        return None
    return max(rates, key=lambda k: (rates[k], -k))  # a tie goes to fewer
