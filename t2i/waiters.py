"""Long-poll plumbing: requests wait on a key (a job id), changes wake them.

The worker's job store and the scheduler's mirror both answer
``GET /status/{id}?wait=S&since=V`` this way (tornado ``demos/chat`` style:
a future per waiting request, resolved on change, dropped on timeout or when
the client goes away). The scheduler's parked ``/status`` long-polls wait with a
callback instead (no coroutine, no task: see t2i.scheduler.fastpath).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Hashable, Iterator

log = logging.getLogger(__name__)


class Waiters:
    """Futures (awaiting requests) and callbacks (parked requests without a coroutine) grouped by key."""

    def __init__(self) -> None:
        self._futures: dict[Hashable, set[asyncio.Future | Callable[[], None]]] = {}

    def __len__(self) -> int:
        """How many keys have someone waiting."""
        return len(self._futures)

    def __iter__(self) -> Iterator[Hashable]:
        """The keys someone waits on (a copy: waking while iterating is fine)."""
        return iter(list(self._futures))

    async def wait(self, key: Hashable, timeout: float, abandon: asyncio.Future | None = None) -> None:
        """Return on :meth:`wake` of ``key``, after ``timeout``, or once ``abandon`` is done."""
        future = asyncio.get_running_loop().create_future()
        self.add(key, future)
        try:
            waits = {future} if abandon is None else {future, abandon}
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.discard(key, future)

    def add(self, key: Hashable, waiter: asyncio.Future | Callable[[], None]) -> None:
        """``waiter`` (a future to resolve, or a function to call) is woken once by :meth:`wake` of ``key``."""
        self._futures.setdefault(key, set()).add(waiter)

    def discard(self, key: Hashable, waiter: asyncio.Future | Callable[[], None]) -> None:
        """``waiter`` no longer waits (its request ended or went away)."""
        waiters = self._futures.get(key)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._futures[key]

    def wake(self, key: Hashable) -> None:
        for waiter in self._futures.pop(key, ()):
            if isinstance(waiter, asyncio.Future):
                if not waiter.done():
                    waiter.set_result(None)
            else:
                try:
                    waiter()
                except Exception:  # one broken waiter must not keep the others asleep
                    log.exception("waking a waiter of %r failed", key)


async def done_within(awaitable: Awaitable[Any], timeout: float) -> asyncio.Future:
    """Await ``awaitable`` for at most ``timeout`` seconds; its future: done, or not done after the
    timeout (then being cancelled, as when the caller is cancelled). Unlike ``asyncio.wait_for`` on
    Python 3.11, a cancel of the caller is never swallowed: ``wait_for`` returns the result when the
    cancel comes just as the awaited thing finishes, and a follower told to stop (``Mirror.stop``)
    would then run on."""
    future = asyncio.ensure_future(awaitable)
    try:
        await asyncio.wait({future}, timeout=timeout)
    finally:
        if not future.done():
            future.cancel()
    return future
