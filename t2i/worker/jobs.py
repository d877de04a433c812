"""The worker's memory of its jobs, with a change feed and long-poll waits.

Every change to a job takes the next store-wide sequence number; a job's
``version`` is the number of its last change, so it grows with every change
and the change feed (``GET /jobs?since=SEQ``) is "every job whose version is
above SEQ". Removals leave a tombstone so followers of the feed hear of them.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from typing import Any, Callable, Iterable, Iterator

from t2i.waiters import Waiters

FEED = object()  # the key feed followers wait on

from t2i.jobstate import CANCELLED, COMPLETED, FAILED, FINISHED, PENDING, RUNNING, UNFINISHED  # noqa: F401


class Job:
    """One job's state. Flat slots: a worker holds many thousands of these."""

    __slots__ = ("prompt_id", "status", "version", "progress_value", "progress_max", "queue_position",
                 "images", "preview_version", "error", "created_at", "started_at", "finished_at",
                 "image_expired", "seed", "workflow", "client_id")

    def __init__(self, prompt_id: str, created_at: float, workflow: str | None = None,
                 seed: int | None = None, client_id: str | None = None):
        self.prompt_id = prompt_id
        self.status = PENDING
        self.version = 0
        self.progress_value: int | None = None
        self.progress_max: int | None = None
        self.queue_position: int | None = None
        self.images: tuple[str, ...] = ()
        self.preview_version = 0
        self.error: str | None = None
        self.created_at = created_at
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.image_expired = False
        self.seed = seed
        self.workflow = workflow
        self.client_id = client_id

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def to_json(self, public_url: str) -> dict[str, Any]:
        """The job as ``GET /status`` shows it."""
        image_urls = [f"{public_url}/images/{name}" for name in self.images] if not self.image_expired else []
        progress = None
        if self.progress_max:
            progress = {"value": self.progress_value or 0, "max": self.progress_max}
        preview_url = None
        if self.status == RUNNING and self.preview_version:
            preview_url = f"{public_url}/previews/{self.prompt_id}?v={self.preview_version}"
        state = {
            "prompt_id": self.prompt_id,
            "status": self.status,
            "version": self.version,
            "progress": progress,
            "queue_position": self.queue_position if self.status == PENDING else None,
            "image_url": image_urls[0] if image_urls and self.status == COMPLETED else None,
            "image_urls": image_urls if self.status == COMPLETED else [],
            "preview_url": preview_url,
            "error": self.error,
            "workflow": self.workflow,
            "seed": self.seed,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "completed_at": self.finished_at,
        }
        if self.image_expired:
            state["image_expired"] = True
        return state


class JobStore:
    """All jobs of one worker process, in memory."""

    def __init__(self, clock: Callable[[], float] = time.time, tombstone_limit: int = 20000):
        self.clock = clock
        # A worker restart starts the sequence again; followers see a new epoch and re-list.
        self.epoch = uuid.uuid4().hex[:12]
        self.seq = 0
        self._jobs: dict[str, Job] = {}
        # prompt_id -> version, oldest change first: the feed walks it from the end.
        self._changes: OrderedDict[str, int] = OrderedDict()
        # Finished jobs by finish order, for pruning without a scan.
        self._finished: OrderedDict[str, float] = OrderedDict()
        # prompt_id -> seq of its removal; ``_forgotten_before`` is the oldest seq still fully known.
        self._tombstones: OrderedDict[str, int] = OrderedDict()
        self._tombstone_limit = tombstone_limit
        self._forgotten_before = 0
        self._waiters = Waiters()  # keyed by prompt_id; the feed waits on FEED

    # --- reading ------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, prompt_id: str) -> bool:
        return prompt_id in self._jobs

    def get(self, prompt_id: str) -> Job | None:
        return self._jobs.get(prompt_id)

    def was_removed(self, prompt_id: str) -> bool:
        return prompt_id in self._tombstones

    def unfinished(self) -> list[Job]:
        return [job for job in self._jobs.values() if job.status in UNFINISHED]

    def counts(self) -> dict[str, int]:
        counts = {PENDING: 0, RUNNING: 0}
        for job in self._jobs.values():
            if job.status in counts:
                counts[job.status] += 1
        return {"held": len(self._jobs), "pending": counts[PENDING], "running": counts[RUNNING]}

    def finished_before(self, cutoff: float) -> Iterator[str]:
        """Ids of jobs that finished before ``cutoff``, oldest first."""
        for prompt_id, finished_at in self._finished.items():
            if finished_at >= cutoff:
                return
            yield prompt_id

    def changes_since(self, since: int) -> tuple[bool, list[Job], list[str]]:
        """(full, jobs, removed ids) for the feed.

        A full list is given when ``since`` is 0, ahead of us (we restarted),
        or older than the tombstones we still hold.
        """
        if since <= 0 or since > self.seq or since < self._forgotten_before:
            return True, list(self._jobs.values()), []
        changed = []
        for prompt_id in reversed(self._changes):
            if self._changes[prompt_id] <= since:
                break
            changed.append(self._jobs[prompt_id])
        removed = []
        for prompt_id in reversed(self._tombstones):
            if self._tombstones[prompt_id] <= since:
                break
            removed.append(prompt_id)
        changed.reverse()
        removed.reverse()
        return False, changed, removed

    # --- changing -----------------------------------------------------------

    def add(self, job: Job) -> Job:
        if job.prompt_id in self._jobs:
            raise KeyError(f"job {job.prompt_id} exists")
        self._jobs[job.prompt_id] = job
        self._tombstones.pop(job.prompt_id, None)
        self._touch(job)
        return job

    def update(self, job: Job, **changes: Any) -> bool:
        """Apply changes; returns False (and bumps nothing) when nothing changed."""
        if job.prompt_id not in self._jobs:
            return False
        changed = False
        for name, value in changes.items():
            if getattr(job, name) != value:
                setattr(job, name, value)
                changed = True
        if not changed:
            return False
        if job.status in FINISHED and job.finished_at is None:
            job.finished_at = self.clock()
        if job.status in FINISHED and job.prompt_id not in self._finished:
            self._finished[job.prompt_id] = job.finished_at
        self._touch(job)
        return True

    def remove(self, prompt_ids: Iterable[str]) -> int:
        removed = 0
        for prompt_id in prompt_ids:
            job = self._jobs.pop(prompt_id, None)
            if job is None:
                continue
            removed += 1
            self._changes.pop(prompt_id, None)
            self._finished.pop(prompt_id, None)
            self.seq += 1
            self._tombstones[prompt_id] = self.seq
            self._tombstones.move_to_end(prompt_id)
            self._waiters.wake(prompt_id)
        while len(self._tombstones) > self._tombstone_limit:
            _, seq = self._tombstones.popitem(last=False)
            self._forgotten_before = seq + 1
        if removed:
            self._waiters.wake(FEED)
        return removed

    def _touch(self, job: Job) -> None:
        self.seq += 1
        job.version = self.seq
        self._changes[job.prompt_id] = self.seq
        self._changes.move_to_end(job.prompt_id)
        self._waiters.wake(job.prompt_id)
        self._waiters.wake(FEED)

    # --- waiting ------------------------------------------------------------

    async def wait_job(self, prompt_id: str, since_version: int, timeout: float) -> None:
        """Return when the job's version passes ``since_version``, it is removed, or after ``timeout``."""
        job = self._jobs.get(prompt_id)
        if job is None or job.version > since_version or timeout <= 0:
            return
        await self._waiters.wait(prompt_id, timeout)

    async def wait_feed(self, since: int, timeout: float) -> None:
        """Return when the store's seq passes ``since``, or after ``timeout``."""
        if self.seq != since or timeout <= 0:
            return
        await self._waiters.wait(FEED, timeout)
