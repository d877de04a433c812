"""Time in tests: one fake clock to move by hand, one ``until`` to wait for an event."""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, Callable

T0 = float(int(time.time()))


class FakeClock:
    """A clock the test moves by hand (no sleeping). ``clock()`` is wall time; ``clock.mono()``
    monotonic time; both move together with :meth:`advance`."""

    def __init__(self, now: float = T0, mono: float = 1000.0):
        self.now = now
        self.mono_now = mono

    def __call__(self) -> float:
        return self.now

    def mono(self) -> float:
        return self.mono_now

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono_now += seconds


async def until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01,
                what: str = "condition") -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy; that value.

    For state the test cannot subscribe to (another process, a test double's counters);
    the deadline only bounds a failing test, it never decides a passing one.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
