"""A worker as a real process (``python -m t2i.worker``), for tests where a kill or restart is the point."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from support.cluster import call
from support.timing import until

ROOT = Path(__file__).resolve().parents[2]


class WorkerProcess:
    """``python -m t2i.worker --config <config>``: ``await start()``, ``kill()``, ``await terminate()``.

    Its log goes to ``<config dir>/worker-<n>.log`` (one file per start), so a failing
    test can show what the process said.
    """

    def __init__(self, config: Path, url: str, preexec_fn=None):
        self.config = config
        self.url = url
        self.preexec_fn = preexec_fn  # run in the child before exec (resource limits, say)
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.log_path: Path | None = None

    async def start(self, wait: bool = True) -> "WorkerProcess":
        self.starts += 1
        self.log_path = self.config.parent / f"worker-{self.starts}.log"
        with open(self.log_path, "wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "t2i.worker", "--config", str(self.config), "--log-level", "debug",
                cwd=ROOT, stdout=log, stderr=asyncio.subprocess.STDOUT, preexec_fn=self.preexec_fn)
        if wait:
            # A loaded 2-core box starts Python slowly; the deadline only bounds a failing start.
            await until(self._answers, timeout=30, interval=0.05, what=f"the worker at {self.url}")
        return self

    async def _answers(self) -> bool:
        if self.proc is not None and self.proc.returncode is not None:
            raise AssertionError(f"the worker exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return (await call("GET", f"{self.url}/openapi.json", timeout=2)).code == 200
        except ConnectionError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    async def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as a crash or the OOM killer would do it."""
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()

    async def terminate(self, timeout: float = 15) -> int:
        """SIGTERM, as systemd stops it; the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
