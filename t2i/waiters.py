"""Long-poll plumbing: requests wait on a key (a job id), changes wake them.

The worker's job store and the scheduler's mirror both answer
``GET /status/{id}?wait=S&since=V`` this way (tornado ``demos/chat`` style:
a future per waiting request, resolved on change, dropped on timeout or when
the client goes away).
"""

from __future__ import annotations

import asyncio
from typing import Hashable, Iterator


class Waiters:
    """Futures grouped by key."""

    def __init__(self) -> None:
        self._futures: dict[Hashable, set[asyncio.Future]] = {}

    def __len__(self) -> int:
        """How many keys have someone waiting."""
        return len(self._futures)

    def __iter__(self) -> Iterator[Hashable]:
        """The keys someone waits on (a copy: waking while iterating is fine)."""
        return iter(list(self._futures))

    async def wait(self, key: Hashable, timeout: float, abandon: asyncio.Future | None = None) -> None:
        """Return on :meth:`wake` of ``key``, after ``timeout``, or once ``abandon`` is done."""
        future = asyncio.get_running_loop().create_future()
        self._futures.setdefault(key, set()).add(future)
        try:
            waits = {future} if abandon is None else {future, abandon}
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            futures = self._futures.get(key)
            if futures is not None:
                futures.discard(future)
                if not futures:
                    del self._futures[key]

    def wake(self, key: Hashable) -> None:
        for future in self._futures.pop(key, ()):
            if not future.done():
                future.set_result(None)
