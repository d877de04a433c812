"""A pass of work that runs one at a time: asked for while running, it runs once more after.

Reconciling jobs with ComfyUI and checking workflows against it both work this way: a
burst of reasons to look (reconnects, timers, status messages) costs one pass at a time
and never loses the last request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

log = logging.getLogger(__name__)


class SerialPass:
    def __init__(self, run: Callable[[], Awaitable[Any]], what: str,
                 after: Callable[[Any], None] | None = None):
        self.run = run            # one pass; its result goes to ``after``
        self.what = what          # for the log line when a pass fails
        self.after = after
        self.task: asyncio.Task | None = None
        self._again = False

    def request(self) -> None:
        if self.task is not None and not self.task.done():
            self._again = True
            return
        self.task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        while True:
            self._again = False
            try:
                result = await self.run()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s failed", self.what)
                result = None
            if self.after is not None:
                self.after(result)
            if not self._again:
                return

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
