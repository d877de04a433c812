"""The one backoff rule of t2i: capped exponential delays with jitter.

Every retry loop (ComfyUI's websocket, webhook deliveries, …) takes its delays from a
:class:`Backoff`, so a fleet of workers never retries in lockstep and no loop hammers
a peer that is down.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    first: float = 0.5      # the delay after the first failure
    maximum: float = 10.0   # no delay is longer than this (before jitter)
    factor: float = 2.0     # each failure multiplies the delay by this
    jitter: float = 0.2     # +-20 %: spreads retries of many clients

    def delay(self, failures: int, rand: random.Random | None = None) -> float:
        """Seconds to wait after the ``failures``-th failure in a row (1 = the first)."""
        base = min(self.first * self.factor ** max(failures - 1, 0), self.maximum)
        spread = (rand or random).uniform(1 - self.jitter, 1 + self.jitter)
        return base * spread
