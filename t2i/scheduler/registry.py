"""The scheduler's worker pool: workers.yaml with live reload, and health checks.

Plain classes, testable without HTTP servers of our own: :class:`Registry`
owns one :class:`WorkerState` per worker (listed in workers.yaml, or removed
from it but still draining its jobs) and checks them. It is given the job
mirror and tells it directly which workers to follow, drop, retry or suspect.
Where a job goes is :mod:`t2i.scheduler.placement`'s business.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from t2i.config import ConfigError, WorkerEntry, load_workers_file
from t2i.httpclient import UpstreamUnavailable, fetch_json
from t2i.metrics import CONFIG_RELOADS

log = logging.getLogger(__name__)

HEALTH_CONNECT_TIMEOUT = 2.0
HEALTH_REQUEST_TIMEOUT = 3.0
HEALTH_CONCURRENCY = 16
HEALTH_TICK = 0.05      # how often check_due() looks for workers due a check (small bursts)
FOLLOW_STAGGER = 0.001  # seconds between the starts of two feed followers at start-up
CATALOGUE_MAX_AGE = 6   # GET /workflows at least every this many health intervals (and on changes)


class WorkerState:
    """What the scheduler knows about one worker."""

    def __init__(self, entry: WorkerEntry):
        self.entry = entry
        self.listed = True              # False once removed from workers.yaml (draining)
        self.removed_at: float | None = None
        self.idle_since: float | None = None   # draining and nothing left to wait for, since
        self.reachable: bool | None = None     # None: never checked yet
        self.comfyui_reachable: bool | None = None
        self.refused: str | None = None        # why the last POST /generate was refused; cleared by health
        self.last_error: str | None = None
        self.last_checked: float | None = None
        self.health: dict[str, Any] = {}
        self.catalogue: dict[str, Any] | None = None
        self.catalogue_at: float | None = None   # monotonic time of the last GET /workflows
        self.health_status: int | None = None    # status of the last GET /health
        self.in_flight = 0                     # POST /generate calls on their way to it
        self.in_flight_steps = 0               # ... and their sampler steps (placement weighs them)
        self.next_check = 0.0                  # monotonic time its next health check is due
        self.checking = False
        # Placement's bookkeeping for this worker (t2i.scheduler.placement), per workflow name:
        self.unready: dict[str, tuple[str, float]] = {}   # refused a template: (why, until)
        self.breakers: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def url(self) -> str:
        return self.entry.url

    @property
    def routable(self) -> bool:
        return (self.listed and self.entry.enabled and bool(self.reachable)
                and self.comfyui_reachable is not False and self.refused is None)

    def mark_down(self, error: str, *, unreachable: bool = False) -> None:
        """A refusal seen by a caller; the next good health check brings the worker back."""
        self.refused = error
        self.last_error = error
        if unreachable:
            self.reachable = False

    def health_jobs(self) -> tuple[int, int]:
        jobs = self.health.get("jobs") if isinstance(self.health, dict) else None
        if not isinstance(jobs, dict):
            return 0, 0
        return int(jobs.get("pending") or 0), int(jobs.get("running") or 0)


@dataclass
class ConfigStatus:
    file: str
    loaded_at: float | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "loaded_at": self.loaded_at, "error": self.error}


class Registry:
    """The worker pool, as last loaded from workers.yaml, with health and load."""

    #: how long a worker removed from workers.yaml stays followed once it has no unfinished job
    drain_linger = 30.0

    def __init__(self, workers_file: Path, mirror: Any, *, client=None, auth_token: str | None = None,
                 health_interval: float = 5.0, clock: Callable[[], float] = time.time):
        self.workers_file = Path(workers_file)
        self.health_interval = health_interval
        self.mirror = mirror  # t2i.scheduler.mirror.Mirror: follows the feeds of the workers listed here
        self.client = client
        self.auth_token = auth_token
        self.clock = clock
        self.workers: dict[str, WorkerState] = {}
        self.config = ConfigStatus(str(self.workers_file))
        self.generation = 0   # grows whenever the pool or a worker's catalogue changes
        self._signature: tuple[int, int] | None = None
        self._digest: str | None = None
        self._semaphore = asyncio.Semaphore(HEALTH_CONCURRENCY)
        self._started = False
        self._tasks: set[asyncio.Task] = set()

    # --- following the pool -------------------------------------------------

    def start(self) -> asyncio.Task:
        """Follow every worker's feed and check them all once (the task returned); from now on,
        added workers are followed and checked at once, and :meth:`check_due` checks each again
        every ``health_interval``."""
        self._started = True
        for i, state in enumerate(self.workers.values()):
            self._follow(state, delay=i * FOLLOW_STAGGER)  # a thousand listings over a second, not at once
        return self._spawn(self.check_all())

    def stop(self) -> None:
        self._started = False
        for task in list(self._tasks):
            task.cancel()

    def _follow(self, state: WorkerState, delay: float = 0) -> None:
        self.mirror.follow(state.name, lambda: state.url, delay)

    def _added(self, state: WorkerState) -> None:
        if not self._started:
            return
        self._follow(state)
        self._spawn(self.check(state))

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- workers.yaml -------------------------------------------------------

    def load_initial(self) -> None:
        """Read workers.yaml at start-up; a ConfigError propagates (the caller exits 2)."""
        entries = load_workers_file(self.workers_file)
        text = self.workers_file.read_bytes()
        st = os.stat(self.workers_file)
        self._signature = (st.st_mtime_ns, st.st_size)
        self._digest = hashlib.sha256(text).hexdigest()
        self._apply(entries)

    def reload_if_changed(self, force: bool = False) -> bool | None:
        """Check mtime, size and content; apply an edit. True: applied, False: refused, None: unchanged.

        ``force`` (SIGHUP) reads the content even when mtime and size look the same: an edit
        within the file system's timestamp granularity that kept the size would be missed.
        """
        try:
            st = os.stat(self.workers_file)
        except OSError:
            return self._refuse(ConfigError(self.workers_file, "file not found"), digest="missing")
        signature = (st.st_mtime_ns, st.st_size)
        if signature == self._signature and not force:
            return None
        try:
            data = self.workers_file.read_bytes()
        except OSError as exc:
            return self._refuse(ConfigError(self.workers_file, f"cannot read: {exc}"), digest="unreadable")
        self._signature = signature
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._digest:
            return None
        try:
            entries = load_workers_file(self.workers_file)
        except ConfigError as exc:
            return self._refuse(exc, digest=digest)
        self._digest = digest
        self._apply(entries)
        self.config.error = None
        CONFIG_RELOADS.labels(result="ok").inc()
        log.info("%s reloaded: %d workers (%s)", self.workers_file, len(entries),
                 ", ".join(e.name for e in entries) or "none")
        return True

    def _refuse(self, exc: ConfigError, digest: str) -> bool | None:
        if digest == self._digest:
            return None  # this same broken content was reported already
        self._digest = digest
        if digest in ("missing", "unreadable"):
            self._signature = None
        self.config.error = str(exc)
        CONFIG_RELOADS.labels(result="failed").inc()
        log.error("workers file not reloaded, keeping the last good list: %s", exc)
        return False

    def _apply(self, entries: list[WorkerEntry]) -> None:
        now = self.clock()
        self.config.loaded_at = now
        new = {entry.name: entry for entry in entries}
        for name, state in list(self.workers.items()):
            if name not in new and state.listed:
                state.listed = False
                state.removed_at = now
                state.idle_since = None
                log.info("worker %s removed from the pool; following it until its jobs end", name)
        for entry in entries:
            state = self.workers.get(entry.name)
            if state is not None and state.url != entry.url:
                # Another machine under the same name: forget the old one's jobs.
                self._drop(state)
                state = None
            if state is None:
                state = WorkerState(entry)
                self.workers[entry.name] = state
                log.info("worker %s added: %s", entry.name, entry.url)
                self._added(state)
            else:
                if not state.listed:
                    log.info("worker %s is back in the pool", entry.name)
                state.entry = entry
                state.listed = True
                state.removed_at = state.idle_since = None
        # Keep workers.yaml order (round-robin and listings follow it).
        order = [e.name for e in entries] + [n for n in self.workers if n not in new]
        self.workers = {name: self.workers[name] for name in order}
        self.generation += 1

    def drop_drained(self) -> None:
        """Stop following removed workers that have nothing left in flight (after a linger)."""
        now = self.clock()
        for state in [s for s in self.workers.values() if not s.listed]:
            if self.mirror.unfinished(state.name) and state.reachable is not False:
                state.idle_since = None
                continue
            if state.idle_since is None:
                state.idle_since = now
            elif now - state.idle_since >= self.drain_linger:
                log.info("worker %s drained; no longer followed", state.name)
                self._drop(state)

    def _drop(self, state: WorkerState) -> None:
        self.workers.pop(state.name, None)
        self.generation += 1
        self.mirror.unfollow(state.name)

    # --- health -------------------------------------------------------------

    async def check_all(self) -> None:
        """Ask every worker's /health and /workflows, concurrently, bounded."""
        await asyncio.gather(*(self.check(state) for state in list(self.workers.values())))

    def check_due(self) -> None:
        """Check the workers whose turn it is (every HEALTH_TICK). Each worker is checked every
        ``health_interval`` (jittered) from its own last check, so with a thousand workers the
        checks are spread over the interval instead of coming all at once."""
        now = time.monotonic()
        for state in self.workers.values():
            if state.next_check <= now and not state.checking:
                self._spawn(self.check(state))

    async def check(self, state: WorkerState) -> None:
        if state.checking:
            return
        state.checking = True
        first = state.last_checked is None
        try:
            await self._check(state)
        finally:
            state.checking = False
            # After the first check each worker gets a phase of its own (spread over the interval),
            # then keeps it, give or take the jitter.
            spread = random.uniform(0.1, 1.0) if first else random.uniform(0.9, 1.1)
            state.next_check = time.monotonic() + self.health_interval * spread

    async def _check(self, state: WorkerState) -> None:
        async with self._semaphore:
            try:
                health = await self._get(state, "/health")
                body = health.body if isinstance(health.body, dict) else None
                if health.status not in (200, 503) or body is None or "ok" not in body:
                    self._record(state, reachable=False,
                                 error=f"GET /health answered {health.status} without a health object")
                    return
                comfy = body.get("comfyui") if isinstance(body.get("comfyui"), dict) else {}
                comfy_ok = bool(comfy.get("reachable", health.status == 200))
                if self._catalogue_due(state, health.status, comfy_ok):
                    self._take_catalogue(state, await self._get(state, "/workflows"))
            except UpstreamUnavailable as exc:
                self._record(state, reachable=False, error=f"unreachable: {exc}")
                return
            except Exception as exc:  # never let one worker break the tick
                log.exception("health check of %s failed", state.name)
                self._record(state, reachable=False, error=f"health check failed: {exc}")
                return
        if body != state.health:
            state.health = body  # unchanged: the old copy stays (no churn of long-lived objects)
        error = None if comfy_ok and health.status == 200 else "its ComfyUI is unreachable"
        self._record(state, reachable=True, comfyui=comfy_ok, error=error)

    def _catalogue_due(self, state: WorkerState, status: int, comfy_ok: bool) -> bool:
        """Whether to fetch /workflows with this check: it changes rarely (the worker re-checks its
        workflows at start, after a ComfyUI reconnect and every few minutes), so only when the worker's
        health changed, or the copy is CATALOGUE_MAX_AGE intervals old."""
        changed = (state.reachable is not True or state.comfyui_reachable is not comfy_ok
                   or state.health_status != status)
        state.health_status = status
        return (changed or state.catalogue is None or state.catalogue_at is None
                or time.monotonic() - state.catalogue_at >= CATALOGUE_MAX_AGE * self.health_interval)

    def _take_catalogue(self, state: WorkerState, workflows) -> None:
        if workflows.status == 200 and isinstance(workflows.body, dict) \
                and isinstance(workflows.body.get("workflows"), dict):
            state.catalogue_at = time.monotonic()
            if workflows.body != state.catalogue:
                state.catalogue = workflows.body
                self.generation += 1

    async def _get(self, state: WorkerState, path: str):
        return await fetch_json(state.url + path, token=self.auth_token, client=self.client,
                                connect_timeout=HEALTH_CONNECT_TIMEOUT,
                                request_timeout=HEALTH_REQUEST_TIMEOUT)

    def _record(self, state: WorkerState, *, reachable: bool, comfyui: bool | None = None,
                error: str | None = None) -> None:
        was = state.reachable
        state.last_checked = self.clock()
        state.reachable = reachable
        state.comfyui_reachable = comfyui if reachable else None
        state.last_error = error
        if reachable:
            state.refused = None
        if was is not reachable:
            if reachable:
                log.info("worker %s is reachable%s", state.name, f" ({error})" if error else "")
            else:
                log.warning("worker %s is down: %s", state.name, error)
        if reachable:
            self.mirror.poke(state.name)  # retry its feed now if that is down
        else:
            self.mirror.suspect(state.name, error or "unreachable")
