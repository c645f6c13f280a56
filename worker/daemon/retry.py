"""Backoff: a pure function of (attempt, base, cap, random)."""

from __future__ import annotations

import random as _random


def backoff(attempt: int, *, base: float, cap: float, rng: _random.Random | None = None) -> float:
    """Seconds before attempt `attempt + 1`: exponential, capped, with full jitter.

    Full jitter (a uniform draw in [delay/2, delay]) keeps several daemons that hit the same
    rate limit at the same moment from retrying in lock step.
    """
    delay = min(cap, base * 2 ** max(0, attempt - 1))
    return (rng or _random).uniform(delay / 2, delay)
