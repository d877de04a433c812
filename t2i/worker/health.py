"""Is this worker's ComfyUI there, and how busy: the probe behind the worker's ``/health``."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from t2i.comfyui import ComfyUIClient, ComfyUIError


class ComfyUIProbe:
    """``/system_stats`` + ``/queue`` with a short timeout, the answer reused for ``ttl`` seconds
    (balancers and schedulers poll /health; ComfyUI should not feel it).

    ``ok`` needs the websocket too: without it the worker cannot follow a job, and a
    ``/generate`` would wait for it and fail. The timeout stays under the scheduler's
    3 s for a whole health check.
    """

    def __init__(self, comfy: ComfyUIClient, timeout: float = 2.0, ttl: float = 1.0,
                 websocket_grace: float = 1.0):
        self.comfy = comfy
        self.timeout = timeout
        self.ttl = ttl
        self.websocket_grace = websocket_grace
        self._state: dict[str, Any] | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def state(self) -> dict[str, Any]:
        async with self._lock:
            if self._state is not None and time.monotonic() - self._at < self.ttl:
                return self._state
            state: dict[str, Any] = {"ok": False, "reachable": False, "url": self.comfy.url, "error": None,
                                     "queue_running": None, "queue_pending": None,
                                     "websocket_connected": self.comfy.connected}
            try:
                _, queue = await self.comfy.probe(timeout=self.timeout)
            except ComfyUIError as exc:
                state["error"] = str(exc)
            else:
                state.update(reachable=True, queue_running=len(queue.running), queue_pending=len(queue.pending))
                # Just started, or ComfyUI just came back: the websocket follows within moments.
                connected = await self.comfy.wait_connected(self.websocket_grace)
                state.update(ok=connected, websocket_connected=connected)
                if not connected:
                    state["error"] = self.comfy.last_error or "the websocket to ComfyUI is not connected"
            self._state, self._at = state, time.monotonic()
            return state
