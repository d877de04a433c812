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
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from t2i.jobstate import CANCELLED, COMPLETED, FAILED, FINISHED, PENDING, RUNNING, UNFINISHED  # noqa: F401
from t2i.waiters import Waiters

FEED = object()  # the key feed followers wait on
URGENT = object()  # the key a feed holding back a known job's progress waits on (see JobStore.urgent_seq)
# How long a streamed feed may hold back changes followers can take late: a known, unfinished job's
# queue position, start and progress. A job's several changes then cross as one line (fewer writes on the
# worker, fewer lines to read on the scheduler, fewer long-poll wake-ups behind it). A new job, an ending
# and a removal are sent at once.
FEED_HOLD = 0.1

# A job's phase: where it is in its lifecycle (t2i.worker.lifecycle moves it). Its public
# ``status`` is a function of the phase, so the two can never disagree.
BACKLOG = "backlog"         # accepted, waiting in this worker's own queue for room in ComfyUI's
SUBMITTING = "submitting"   # POST /prompt in flight
QUEUED = "queued"           # in ComfyUI's queue
STARTED = "running"         # ComfyUI runs it
FINISHING = "finishing"     # the run ended; reading its history
COLLECTING = "collecting"   # copying its images into images/
PHASE_STATUS = {BACKLOG: PENDING, SUBMITTING: PENDING, QUEUED: PENDING, STARTED: RUNNING, FINISHING: RUNNING,
                COLLECTING: RUNNING, COMPLETED: COMPLETED, FAILED: FAILED, CANCELLED: CANCELLED}
PHASES = tuple(PHASE_STATUS)


class Job:
    """One job's state: every fact about it lives here, none in side tables.

    Flat slots, copied (never changed in place) by the lifecycle: a worker holds many
    thousands of these and readers may keep a reference across an ``await``.
    """

    __slots__ = (
        # what was asked
        "prompt_id", "created_at", "workflow", "seed", "params", "graph",
        # where it is (lifecycle)
        "phase", "accepted", "attempt", "client_id", "error", "ending", "outputs",
        "queued_at", "running_at", "active_at",  # monotonic seconds: timeouts and the stall watchdog
        # what /status shows
        "version", "progress_value", "progress_max", "queue_position", "images", "preview_version",
        "started_at", "finished_at", "image_expired",
        # kept for the features that build on the journal
        "client", "idempotency_key", "request_hash", "webhook",
    )

    def __init__(self, prompt_id: str, created_at: float, workflow: str | None = None,
                 seed: int | None = None, client_id: str | None = None, *, phase: str = SUBMITTING,
                 graph: dict[str, Any] | None = None, params: dict[str, Any] | None = None, **fields: Any):
        self.prompt_id = prompt_id
        self.created_at = created_at
        self.workflow = workflow
        self.seed = seed
        self.params = params
        self.graph = graph  # the built ComfyUI workflow, kept until the job ends (to resubmit it)
        self.phase = phase
        self.accepted = phase == BACKLOG  # answered 200: from here on it ends with an image or a reason
        self.attempt = 0  # how many times ComfyUI accepted it (a resubmit after a ComfyUI restart adds one)
        self.client_id = client_id  # the websocket clientId it was submitted under
        self.error: str | None = None  # finished: why it failed; unfinished: a problem right now
        self.ending: tuple[str, str] | None = None  # a stop in flight: (final phase, error)
        self.outputs: tuple = ()  # ImageRefs named by `executed` messages
        self.queued_at = self.running_at = self.active_at = 0.0
        self.version = 0
        self.progress_value: int | None = None
        self.progress_max: int | None = None
        self.queue_position: int | None = None
        self.images: tuple[str, ...] = ()
        self.preview_version = 0
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.image_expired = False
        self.client: str | None = None
        self.idempotency_key: str | None = None
        self.request_hash: str | None = None  # fingerprint of the request body, for Idempotency-Key
        self.webhook: Any = None
        for name, value in fields.items():
            setattr(self, name, value)

    @property
    def status(self) -> str:
        return PHASE_STATUS[self.phase]

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED

    def evolve(self, **changes: Any) -> "Job":
        """A copy with ``changes`` applied (the original is left as it was)."""
        job = Job.__new__(Job)
        for name in Job.__slots__:
            setattr(job, name, changes[name] if name in changes else getattr(self, name))
        return job

    def differs(self, changes: dict[str, Any]) -> bool:
        return any(getattr(self, name) != value for name, value in changes.items())

    def __repr__(self) -> str:
        return f"<Job {self.prompt_id} {self.phase} attempt {self.attempt} v{self.version}>"

    def to_json(self, public_url: str) -> dict[str, Any]:
        """The job as ``GET /status`` shows it."""
        status = self.status
        image_urls = [f"{public_url}/images/{name}" for name in self.images] if not self.image_expired else []
        progress = None
        if self.progress_max:
            progress = {"value": self.progress_value or 0, "max": self.progress_max}
        preview_url = None
        if status == RUNNING and self.preview_version:
            preview_url = f"{public_url}/previews/{self.prompt_id}?v={self.preview_version}"
        state = {
            "prompt_id": self.prompt_id,
            "status": status,
            "version": self.version,
            "progress": progress,
            "queue_position": self.queue_position if status == PENDING else None,
            "image_url": image_urls[0] if image_urls and status == COMPLETED else None,
            "image_urls": image_urls if status == COMPLETED else [],
            "preview_url": preview_url,
            "error": self.error,
            "attempt": max(self.attempt, 1),
            "steps": (self.params or {}).get("steps"),  # sampler steps asked for: placement weighs queues by them
            "workflow": self.workflow,
            "seed": self.seed,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "completed_at": self.finished_at,
            "client": self.client,
        }
        if self.image_expired:
            state["image_expired"] = True
        if self.webhook:
            # Its delivery, not its URL (which may carry the client's own token).
            state["webhook"] = {key: self.webhook[key] for key in ("state", "attempts", "last_error")}
        return state

    def shows_the_same(self, changes: dict[str, Any]) -> bool:
        """Would this job with ``changes`` show in ``/status`` (:meth:`to_json`) exactly as it does now, its
        version aside? Then the changes (timers, outputs, a phase within one status, attempt 0 -> 1) can
        be written onto the held record without a new version waking every long-poll and feed follower."""
        for name, value in changes.items():
            if name == "phase":
                if PHASE_STATUS[value] != self.status:
                    return False
            elif name == "attempt":
                if max(value, 1) != max(self.attempt, 1):
                    return False
            elif name in SHOWN_FIELDS and getattr(self, name) != value:
                return False
        return True


# The fields :meth:`Job.to_json` reads, besides its status (the phase) and attempt: what a job's ``/status``
# (and so the feed, and every long-poll) shows. tests/test_worker_versions.py checks every other field.
SHOWN_FIELDS = frozenset(("prompt_id", "progress_value", "progress_max", "queue_position", "images", "preview_version",
                          "error", "params", "workflow", "seed", "created_at", "started_at", "finished_at", "client",
                          "image_expired", "webhook"))


class FeedPage(NamedTuple):
    """One answer of the change feed (``GET /jobs``)."""

    full: bool           # every job held (the follower keeps only these), not the changes since
    jobs: list[Job]
    removed: list[str]   # ids removed since (empty when full)
    more: bool           # cut at the limit: ask again from ``cursor``
    cursor: int | None   # the last job's version when ``more``


class JobStore:
    """All jobs of one worker process, in memory."""

    def __init__(self, clock: Callable[[], float] = time.time, tombstone_limit: int = 20000,
                 on_remove: Callable[[list[str]], None] | None = None):
        self.clock = clock
        # A worker restart starts a new epoch; followers see it and re-list. The sequence starts
        # from the wall clock in milliseconds, so a job's version still grows across a restart
        # (a client long-polling with an old ``since`` is answered, not held).
        self.epoch = uuid.uuid4().hex[:12]
        self.seq = int(clock() * 1000)
        self.on_remove = on_remove  # the journal forgets removed jobs (and keeps their tombstones)
        self._jobs: dict[str, Job] = {}
        # The unfinished ones, in _jobs' order: the runner asks for them several times per job, and a
        # scan of every job held (task_ttl keeps thousands) each time was worker CPU growing with the day.
        self._unfinished: dict[str, Job] = {}
        # prompt_id -> version, oldest change first: the feed walks it from the end.
        self._changes: OrderedDict[str, int] = OrderedDict()
        # Finished jobs by finish order, for pruning without a scan.
        self._finished: OrderedDict[str, float] = OrderedDict()
        # prompt_id -> seq of its removal; ``_forgotten_before`` is the oldest seq still fully known.
        self._tombstones: OrderedDict[str, int] = OrderedDict()
        self._tombstone_limit = tombstone_limit
        self._forgotten_before = 0
        self._waiters = Waiters()  # keyed by prompt_id; the feed waits on FEED (and URGENT)
        self._endings = Waiters()  # keyed by prompt_id: woken only when the job ends or goes (GET /result?wait)
        # The seq of the last change a streamed feed sends at once (a new job, an ending, a removal): a
        # follower past it may hold later changes up to ``feed_hold`` seconds.
        self.urgent_seq = self.seq
        self.feed_hold = FEED_HOLD

    # --- reading ------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, prompt_id: str) -> bool:
        return prompt_id in self._jobs

    def get(self, prompt_id: str) -> Job | None:
        return self._jobs.get(prompt_id)

    def was_removed(self, prompt_id: str) -> bool:
        return prompt_id in self._tombstones

    def all(self) -> list[Job]:
        return list(self._jobs.values())

    def unfinished(self) -> list[Job]:
        return list(self._unfinished.values())

    def removed_seq(self, prompt_id: str) -> int:
        return self._tombstones.get(prompt_id, 0)

    def tombstones(self) -> list[str]:
        return list(self._tombstones)

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

    def page(self, since: int, limit: int | None = None, after: int = 0) -> FeedPage:
        """One answer of the feed: :meth:`changes_since` in version order, at most ``limit`` jobs
        with a version above ``after`` (a follower of 20,000 jobs never makes or waits for one huge
        answer); ``more`` and ``cursor`` (the last job's version) say how to go on. Removals come
        with the page that reaches their seq."""
        full, jobs, removed = self.changes_since(since)
        if limit is None:
            return FeedPage(full, jobs, removed, False, None)
        if full:
            jobs = sorted(jobs, key=lambda job: job.version)  # changes come in version order already
        if after:
            jobs = [job for job in jobs if job.version > after]
        more = len(jobs) > limit
        if not more:
            return FeedPage(full, jobs, removed, False, None)
        jobs = jobs[:limit]
        cursor = jobs[-1].version
        if not full:
            removed = [prompt_id for prompt_id in removed if self._tombstones.get(prompt_id, 0) <= cursor]
        return FeedPage(full, jobs, removed, True, cursor)

    # --- changing -----------------------------------------------------------

    def add(self, job: Job) -> Job:
        if job.prompt_id in self._jobs:
            raise KeyError(f"job {job.prompt_id} exists")
        self._tombstones.pop(job.prompt_id, None)
        return self.put(job)

    def restore(self, jobs: Iterable[Job], tombstones: Iterable[str]) -> None:
        """Jobs and tombstones read back from the journal at start-up (oldest first)."""
        for prompt_id in tombstones:
            self.seq += 1
            self._tombstones[prompt_id] = self.seq
        for job in jobs:
            self._tombstones.pop(job.prompt_id, None)
            self.put(job)

    def put(self, job: Job) -> Job:
        """Hold ``job`` as the current state of its id: a new version, waiters woken."""
        before = self._jobs.get(job.prompt_id)
        urgent = before is None or job.phase in FINISHED or before.phase in FINISHED
        if job.phase in FINISHED:
            if job.finished_at is None:
                job.finished_at = self.clock()
            self._finished.setdefault(job.prompt_id, job.finished_at)
            self._unfinished.pop(job.prompt_id, None)
        elif job.prompt_id in self._unfinished or job.prompt_id not in self._jobs:
            self._unfinished[job.prompt_id] = job
        else:  # a finished job unfinished again: rebuilt, so the order stays _jobs' order
            self._jobs[job.prompt_id] = job
            self._unfinished = {pid: held for pid, held in self._jobs.items() if held.phase not in FINISHED}
        self._jobs[job.prompt_id] = job
        self._touch(job, urgent)
        return job

    def update(self, job: Job | str, **changes: Any) -> Job | None:
        """The held job with ``changes`` applied; None (and no new version) when nothing changed."""
        current = self._jobs.get(job if isinstance(job, str) else job.prompt_id)
        if current is None or not current.differs(changes):
            return None
        return self.put(current.evolve(**changes))

    def remove(self, prompt_ids: Iterable[str]) -> int:
        removed_ids = []
        for prompt_id in prompt_ids:
            job = self._jobs.pop(prompt_id, None)
            if job is None:
                continue
            self._unfinished.pop(prompt_id, None)
            removed_ids.append(prompt_id)
            self._changes.pop(prompt_id, None)
            self._finished.pop(prompt_id, None)
            self.seq += 1
            self._tombstones[prompt_id] = self.seq
            self._tombstones.move_to_end(prompt_id)
            self._waiters.wake(prompt_id)
            self._endings.wake(prompt_id)
        while len(self._tombstones) > self._tombstone_limit:
            _, seq = self._tombstones.popitem(last=False)
            self._forgotten_before = seq + 1
        if removed_ids:
            self._waiters.wake(FEED)
            self._urgent()
            if self.on_remove is not None:
                self.on_remove(removed_ids)
        return len(removed_ids)

    def _touch(self, job: Job, urgent: bool) -> None:
        # The feed walks _changes and finds the current job in _jobs; the version is set on
        # the new copy only, which no reader has seen yet.
        self.seq += 1
        job.version = self.seq
        self._changes[job.prompt_id] = self.seq
        self._changes.move_to_end(job.prompt_id)
        # Woken in this order, they run in this order: the job's own clients are answered before the
        # feed's followers are written to (a client waiting for the image does not wait for the feed).
        self._waiters.wake(job.prompt_id)
        if job.phase in FINISHED:
            self._endings.wake(job.prompt_id)
        self._waiters.wake(FEED)
        if urgent:
            self._urgent()

    def _urgent(self) -> None:
        self.urgent_seq = self.seq
        self._waiters.wake(URGENT)

    # --- waiting ------------------------------------------------------------

    async def wait_job(self, prompt_id: str, since_version: int, timeout: float) -> None:
        """Return when the job's version passes ``since_version``, it is removed, or after ``timeout``."""
        job = self._jobs.get(prompt_id)
        if job is None or job.version > since_version or timeout <= 0:
            return
        await self._waiters.wait(prompt_id, timeout)

    async def wait_ending(self, prompt_id: str, timeout: float) -> None:
        """Return when the job ends or is removed (not at each of its changes), at :meth:`wake_ending`,
        or after ``timeout``."""
        job = self._jobs.get(prompt_id)
        if job is None or job.phase in FINISHED or timeout <= 0:
            return
        await self._endings.wait(prompt_id, timeout)

    def wake_ending(self, prompt_id: str) -> None:
        """Wake those waiting for the job's end to look again (its image is in hand before it ends)."""
        self._endings.wake(prompt_id)

    async def wait_feed(self, since: int, timeout: float) -> None:
        """Return when the store's seq passes ``since``, or after ``timeout``."""
        if self.seq != since or timeout <= 0:
            return
        await self._waiters.wait(FEED, timeout)

    async def wait_urgent(self, since: int, timeout: float) -> None:
        """Return when a change a feed sends at once comes after ``since`` (see ``urgent_seq``), or after ``timeout``."""
        if self.urgent_seq > since or timeout <= 0:
            return
        await self._waiters.wait(URGENT, timeout)
