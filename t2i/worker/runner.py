"""Drives one ComfyUI for one worker: turns I/O into lifecycle events and carries out their effects.

What a job's state is and how it changes is written in :mod:`t2i.worker.lifecycle`
(pure); every per-job fact lives on the job record in the
:class:`~t2i.worker.jobs.JobStore`. This module only listens (websocket messages,
``/queue`` and ``/history`` snapshots, timer ticks, requests), calls
:func:`~t2i.worker.lifecycle.advance`, and does what the effects say: talk to
ComfyUI, copy images, write the journal.

ComfyUI never replays messages, so after every reconnect (and every few seconds
for jobs submitted under an older websocket, whose messages ComfyUI now drops)
unfinished jobs are checked against ``GET /queue`` and ``GET /history/{id}``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Callable

from tornado.ioloop import PeriodicCallback

from t2i import metrics
from t2i.comfyui import (ComfyUIClient, ComfyUIError, ComfyUIIncompatible, ComfyUITimeout, ComfyUIUnavailable,
                         PromptRejected, describe_rejection, outcome_of)
from t2i.config import WorkerConfig
from t2i.httpclient import drop_outcome
from t2i.idempotency import HEADER as IDEMPOTENCY_HEADER
from t2i.passes import SerialPass
from t2i.idempotency import prompt_id_for
from t2i.validation import GenerateRequest
from t2i.waiters import done_within
from t2i.worker import lifecycle as lc
from t2i.worker.collect import CollectError, collect_images, discard_images
from t2i.worker.health import ComfyUIProbe
from t2i.worker.images import ImageStore
from t2i.worker.inputs import upload_inputs
from t2i.worker.jobs import CANCELLED, COMPLETED, PENDING, RUNNING, STARTED, Job, JobStore
from t2i.worker.journal import Journal
from t2i.worker.readiness import WorkflowReadiness
from t2i.worker.speed import Speed
from t2i.worker.webhooks import Webhooks, new_state
from t2i.worker.workflow import build_workflow

log = logging.getLogger(__name__)

QUEUE_TIMEOUT_FACTOR = lc.QUEUE_TIMEOUT_FACTOR  # read at construction: a test (or ops) may change it here
IN_COMFYUI = (lc.SUBMITTING, lc.QUEUED, lc.STARTED)  # phases that hold a place in ComfyUI's queue
SERVED_LIMIT = 10000  # clients remembered for taking turns in the worker's own queue


DEFAULT_STEPS = 20  # a raw workflow's steps are unknown: count it as a typical job


class JobFinished(Exception):
    """A cancel of a job that already ended."""

    def __init__(self, job: Job, message: str | None = None):
        super().__init__(message or f"Job {job.prompt_id} already ended ({job.status}).")
        self.job = job


class WorkerStarting(ComfyUIUnavailable):
    """Journaled jobs are still being checked against ComfyUI: no new job yet."""


class QueueFull(ComfyUIUnavailable):
    """This worker's own queue is at ``backlog``: go elsewhere, or come back."""


class WorkflowNotReady(ComfyUIUnavailable):
    """This worker's ComfyUI cannot run the workflow (a model or node is missing): go elsewhere."""

    def __init__(self, workflow: str, reason: str):
        super().__init__(f"Workflow {workflow!r} is not ready on this worker: {reason}")
        self.workflow = workflow


class KeyConflict(Exception):
    """An Idempotency-Key seen before: ``status`` 422 (another request) or 409 (the first is in flight)."""

    def __init__(self, status: int, message: str, prompt_id: str):
        super().__init__(message)
        self.status = status
        self.prompt_id = prompt_id


class Runner:
    """Drives one ComfyUI for one worker's :class:`JobStore`."""

    reconcile_interval = 2.0  # seconds between safety-net checks of jobs we get no messages for
    full_reconcile_interval = 20.0  # seconds between checks of every unfinished job
    tick_interval = 0.5  # seconds between timer checks (timeouts, the stall watchdog)
    queue_refresh_delay = 0.05  # debounce of GET /queue after `status` messages
    stop_grace = 5.0  # seconds a graceful stop waits for image collections in flight

    def __init__(self, config: WorkerConfig, store: JobStore, images: ImageStore,
                 comfy: ComfyUIClient | None = None, journal: Journal | None = None,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic):
        self.config = config
        self.store = store
        self.images = images
        self.journal = journal
        self.clock = clock
        self.monotonic = monotonic
        self.limits = lc.Limits(job_timeout=config.job_timeout, stall_timeout=config.comfyui.stall_timeout,
                                max_resubmits=config.comfyui.max_resubmits,
                                queue_timeout_factor=QUEUE_TIMEOUT_FACTOR)
        self.comfy = comfy or ComfyUIClient(
            config.comfyui.url, connect_timeout=config.comfyui.connect_timeout,
            request_timeout=config.comfyui.request_timeout)
        self.comfy.listener = self
        self.name = config.name
        # Newest live preview per running job: prompt_id -> (bytes, content type). Bytes, not state:
        # the job's preview_version says whether there is one.
        self.previews: dict[str, tuple[bytes, str]] = {}
        # prompt_id -> {ImageRef: its /view in flight or done}, from `executed` until the images are copied
        self._early_views: dict[str, dict[Any, asyncio.Future]] = {}
        # prompt_id -> its first image's name, from its bytes being fetched until they are stored (or not)
        self._in_hand: dict[str, str] = {}
        self.stalled: dict[str, Any] | None = None  # the watchdog fired: {prompt_id, error} until ComfyUI moves
        self.ready = asyncio.Event()  # journaled jobs reconciled: /generate may go ahead
        self.accepting: set[str] = set()  # ids of POST /generate requests between arrival and stored or refused
        self._running_id: str | None = None  # whom legacy previews (no prompt_id) belong to
        self._queue_refresh: asyncio.TimerHandle | None = None
        self._queue_refreshing = False
        self._queue_dirty = False
        self._reconcile = SerialPass(self.reconcile, "reconciling jobs with ComfyUI", after=self._reconciled)
        self._last_full_reconcile = self.monotonic()
        self._tasks: set[asyncio.Task] = set()
        self._finishing: set[asyncio.Task] = set()  # history reads and image copies: a stop waits for them
        # client -> when it last had a job handed to ComfyUI (a count): whose turn it is in the backlog
        self._served: dict[str | None, int] = {}
        self._serves = 0
        self._callbacks: list[PeriodicCallback] = []
        self.probe = ComfyUIProbe(self.comfy, timeout=min(2.0, config.comfyui.request_timeout))
        self.readiness = WorkflowReadiness(config, self.comfy, monotonic)
        self.webhooks = Webhooks(config, store, journal, clock)
        self.speed = Speed()

    # --- the one way a job changes ------------------------------------------------------

    def now(self) -> lc.Now:
        return lc.Now(self.monotonic(), self.clock())

    def apply(self, prompt_id: str, event: Any, skip: tuple[lc.Effect, ...] = ()) -> Job | None:
        """Advance the held job by ``event`` and carry out the effects (but ``skip``); the job after."""
        job = self.store.get(prompt_id)
        if job is None:
            return None
        now = self.now()
        changes, effects = lc.changes_of(job, event, now, self.limits)  # what lc.advance would apply
        new = job
        phase = changes.get("phase", job.phase)
        left_comfyui = job.phase in IN_COMFYUI and phase not in IN_COMFYUI
        if phase == STARTED and job.phase in (lc.SUBMITTING, lc.QUEUED):
            self.speed.run_started(prompt_id, now.mono)
        elif job.phase == STARTED and phase in (lc.FINISHING, lc.COLLECTING):
            self.speed.run_ended(prompt_id, now.mono)   # the run's span: ComfyUI's, not the image copy after it
        if changes and job.differs(changes):
            if job.shows_the_same(changes):
                # E.g. each node's `executing` only restarts the stall watchdog: a new version would
                # wake every long-poll and feed follower of the job for nothing they can see.
                for name, value in changes.items():
                    setattr(job, name, value)
            else:
                new = self.store.put(job.evolve(**changes))
        for effect in effects:
            if effect not in skip:
                self._carry_out(new, effect)
        if left_comfyui:
            self._dispatch()  # ComfyUI has room for the next one of this worker's queue
        return new

    def _carry_out(self, job: Job, effect: lc.Effect) -> None:
        kind = effect.kind
        if kind == "journal":
            if self.journal is not None:
                self.journal.save(job)
                metrics.JOURNAL_WRITES.labels(self.name).inc()
        elif kind == "finished":
            self._finished(job)
        elif kind == "withdraw":
            self._spawn(self._withdraw(job.prompt_id))
        elif kind == "fetch_history":
            self._spawn(self._fetch_history(job.prompt_id), finishing=True)
        elif kind == "collect":
            self._spawn(self._collect(job.prompt_id, list(effect.refs)), finishing=True)
        elif kind == "dispatch":
            self._spawn(self._dispatch_post(job.prompt_id), finishing=True)
        elif kind == "submit":
            metrics.JOBS_RESUBMITTED.labels(self.name).inc()
            log.warning("job %s: ComfyUI lost it; submitting it again (attempt %d)", job.prompt_id, job.attempt + 1)
            self._spawn(self._resubmit(job.prompt_id), finishing=True)
        elif kind == "stalled":
            metrics.COMFYUI_STALLS.labels(self.name).inc()
            self.stalled = {"prompt_id": job.prompt_id, "error": job.error}
            log.error("job %s: %s Interrupting it; this worker reports unhealthy until ComfyUI moves",
                      job.prompt_id, job.error)
        elif kind == "drop":
            self.store.remove([job.prompt_id])
            self.previews.pop(job.prompt_id, None)
            self.speed.finished(job.prompt_id, None, False)
            self._forget_early_views(job.prompt_id)
        elif kind == "discard":
            self._spawn(discard_images(self.images, list(effect.refs)))
        else:  # a new effect in lifecycle.py without a line here is a bug worth hearing of at once
            raise AssertionError(f"unknown effect {effect}")

    def _finished(self, job: Job) -> None:
        """Log, metrics, memory freed: once per job, when it reaches a final phase."""
        metrics.JOBS_FINISHED.labels(self.name, job.status).inc()
        metrics.observe_job(self.name, job)
        self.speed.finished(job.prompt_id, (job.params or {}).get("steps") or job.progress_max, job.status == COMPLETED)
        if job.status == COMPLETED:
            metrics.JOB_DURATION.labels(self.name).observe(max(0.0, (job.finished_at or self.clock()) - job.created_at))
            log.info("job %s: completed, %d image(s)", job.prompt_id, len(job.images))
        elif job.status == CANCELLED:
            log.info("job %s: cancelled", job.prompt_id)
        else:
            log.warning("job %s: failed: %s", job.prompt_id, job.error)
        self.previews.pop(job.prompt_id, None)
        self._forget_early_views(job.prompt_id)
        if self._running_id == job.prompt_id:
            self._running_id = None
        if job.webhook:
            self.webhooks.job_ended(job)

    # --- start and stop -------------------------------------------------------------------

    async def start(self) -> None:
        """Start following ComfyUI; the store already holds what the journal had."""
        reattached = 0
        for job in self.store.unfinished():
            after = self.apply(job.prompt_id, lc.Restored())
            if after is not None and self.store.get(job.prompt_id) is not None:
                reattached += 1
        if reattached:
            metrics.JOBS_REATTACHED.labels(self.name).inc(reattached)
            log.info("%d unfinished job(s) from the journal: checking them against ComfyUI before taking new ones",
                     reattached)
        else:
            self.ready.set()
        self.webhooks.start()
        self.comfy.start()
        self.readiness.start()
        self._callbacks = [
            PeriodicCallback(self._tick, self.tick_interval * 1000, jitter=0.1),
            PeriodicCallback(self._periodic_reconcile, self.reconcile_interval * 1000, jitter=0.1),
        ]
        for callback in self._callbacks:
            callback.start()

    async def stop(self) -> None:
        """Stop following ComfyUI. Image collections in flight get ``stop_grace`` seconds to finish;
        jobs left in ComfyUI carry on there and are picked up by the next start."""
        for callback in self._callbacks:
            callback.stop()
        self._callbacks = []
        if self._queue_refresh is not None:
            self._queue_refresh.cancel()
        self.readiness.stop()
        finishing = [task for task in self._finishing if not task.done()]
        if finishing:
            log.info("waiting up to %g s for %d image collection(s) in flight", self.stop_grace, len(finishing))
            await asyncio.wait(finishing, timeout=self.stop_grace)
        await self.comfy.stop()
        await self.webhooks.stop()  # pending deliveries are in the journal: the next start resumes them
        tasks = list(self._tasks)
        if self._reconcile.task is not None:
            tasks.append(self._reconcile.task)
        tasks += [task for views in self._early_views.values() for task in views.values()]
        self._early_views.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro, finishing: bool = False) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        if finishing:
            self._finishing.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._finishing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    # --- submitting -----------------------------------------------------------------------

    async def submit(self, request: GenerateRequest, key: str | None = None,
                     request_hash: str | None = None, client: str | None = None) -> tuple[Job, bool]:
        """Queue a checked request in ComfyUI; answers once ComfyUI took it and the journal holds it.

        With an Idempotency-Key the job's id comes from the key, and a key seen before gives
        back its job (``(job, True)``: nothing is submitted again) or raises KeyConflict.
        Raises ComfyUIUnavailable (503; WorkerStarting, WorkflowNotReady, ComfyUIIncompatible
        and ComfyUITimeout are kinds of it), PromptRejected (502) or JournalError (503); then
        no job remains. ``client``: the scheduler's client name, journaled and shown in ``/status``.
        """
        prompt_id = prompt_id_for(key) if key is not None else str(uuid.uuid4())
        known = self.store.get(prompt_id)
        if known is not None:
            if known.request_hash != request_hash:
                raise KeyConflict(422, f"The {IDEMPOTENCY_HEADER} was used for another request (job {prompt_id}).",
                                  prompt_id)
            if known.phase == lc.SUBMITTING and not known.accepted:
                raise KeyConflict(409, f"A request with this {IDEMPOTENCY_HEADER} is still being submitted "
                                       f"(job {prompt_id}); ask again in a moment.", prompt_id)
            return known, True
        if prompt_id in self.accepting:  # the same key, its first request not through our checks yet
            raise KeyConflict(409, f"A request with this {IDEMPOTENCY_HEADER} is still being submitted "
                                   f"(job {prompt_id}); ask again in a moment.", prompt_id)
        # Known as being accepted from here until the job is stored or refused: a scheduler whose POST
        # timed out asks /status, which must not say "no such job" while it may still be created.
        self.accepting.add(prompt_id)
        try:
            return await self._accept(prompt_id, request, key, request_hash, client)
        finally:
            self.accepting.discard(prompt_id)

    async def _accept(self, prompt_id: str, request: GenerateRequest, key: str | None, request_hash: str | None,
                      client: str | None) -> tuple[Job, bool]:
        if request.raw_workflow is None:
            ready, reason = self.readiness.of(request.workflow or self.config.default_workflow)
            if ready is False:
                raise WorkflowNotReady(request.workflow or self.config.default_workflow, reason or "")
        wait = min(self.config.comfyui.connect_timeout, 2.0)
        if not self.ready.is_set():
            if not (await done_within(self.ready.wait(), wait)).done():
                held = len(self.store.unfinished())
                raise WorkerStarting(f"The worker is starting: it is checking {held} job(s) from its journal "
                                     "against ComfyUI.") from None
        if self.stalled is not None:
            raise ComfyUIUnavailable(f"{self.stalled['error']} This worker takes jobs again when ComfyUI moves.")
        if not await self.comfy.wait_connected(wait):
            detail = self.comfy.last_error or "its websocket is not connected"
            raise ComfyUIUnavailable(f"ComfyUI is not reachable ({detail}).")
        # ComfyUI is kept `ahead` prompts deep; beyond that, jobs wait in this worker's own queue.
        waiting = self._backlog()
        backlogged = bool(waiting) or self._in_comfyui() >= self.config.comfyui.ahead
        if backlogged and len(waiting) >= self.config.backlog:
            raise QueueFull(f"This worker's queue is full ({len(waiting)} job(s) waiting); try another worker "
                            "or again shortly.")
        # Input images go to ComfyUI first: the workflow names them as ComfyUI answered.
        request, _ = await upload_inputs(self.comfy, self.config, request, prompt_id)
        graph = build_workflow(self.config, request, prompt_id)
        job = Job(prompt_id, self.clock(), workflow=request.workflow if request.raw_workflow is None else "(raw)",
                  seed=request.params.get("seed"), client_id=self.comfy.client_id, graph=graph,
                  params=dict(request.params), idempotency_key=key, request_hash=request_hash, client=client,
                  webhook=new_state(request.webhook_url) if request.webhook_url else None,
                  phase=lc.BACKLOG if backlogged else lc.SUBMITTING)
        if backlogged:
            return await self._accept_into_backlog(job), False
        # Messages can beat the POST reply (PROTOCOL §3): the job must already be findable.
        self.store.add(job)
        self._served_now(job.client)
        if self.journal is not None:
            self.journal.save(job)  # committed while POST /prompt is in flight: a kill then can withdraw it
        try:
            await self._post(prompt_id)
        except PromptRejected as exc:
            # A template that passed our checks, refused by ComfyUI's own validation: this ComfyUI
            # cannot run it (a model or node is missing). A bare 500 text may be passing: not marked.
            if request.raw_workflow is None and (exc.node_errors or isinstance(exc.comfyui_error, dict)):
                self.readiness.mark_rejected(job.workflow or self.config.default_workflow, exc.message)
            raise
        if self.journal is not None:
            try:
                await self.journal.flush()
            except Exception:
                # Not on disk, so not accepted: a restart would not know it. Take it back.
                self._spawn(self._withdraw(prompt_id))
                self.store.remove([prompt_id])
                raise
        job = self.store.get(prompt_id) or job
        metrics.JOBS_SUBMITTED.labels(self.name).inc()
        log.info("job %s: queued in ComfyUI (workflow %s, seed %s)", prompt_id, job.workflow, job.seed)
        if job.status == PENDING:
            self._schedule_queue_refresh()
        return job, False

    async def _accept_into_backlog(self, job: Job) -> Job:
        """Accepted into this worker's own queue: answered once the journal holds it."""
        self.store.add(job)
        if self.journal is not None:
            self.journal.save(job)
            try:
                await self.journal.flush()
            except Exception:
                self.store.remove([job.prompt_id])
                raise
        metrics.JOBS_SUBMITTED.labels(self.name).inc()
        log.info("job %s: accepted into this worker's queue (workflow %s, seed %s)", job.prompt_id, job.workflow,
                 job.seed)
        self._dispatch()  # room may have opened while we wrote; and it needs its position
        return self.store.get(job.prompt_id) or job

    def _in_comfyui(self) -> int:
        return sum(1 for job in self.store.unfinished() if job.phase in IN_COMFYUI)

    def _backlog(self) -> list[Job]:
        """This worker's own queue in the order it feeds ComfyUI: the scheduler's clients (``job.client``)
        take turns, so one client's burst does not queue every other client's job behind all of it.
        A client's jobs go oldest first, its jobs in ComfyUI count as turns taken, and between clients
        on the same turn the one served least lately goes first. Jobs without a client are one client
        (among themselves: oldest first)."""
        unfinished = self.store.unfinished()
        turns: dict[str | None, int] = {}
        for job in unfinished:
            if job.phase in IN_COMFYUI:
                turns[job.client] = turns.get(job.client, 0) + 1
        ranked = []
        for job in sorted((job for job in unfinished if job.phase == lc.BACKLOG), key=lambda job: job.created_at):
            turn = turns.get(job.client, 0)
            turns[job.client] = turn + 1
            ranked.append((turn, self._served.get(job.client, -1), job.created_at, job))
        ranked.sort(key=lambda item: item[:3])
        return [item[3] for item in ranked]

    def _served_now(self, client: str | None) -> None:
        self._serves += 1
        self._served[client] = self._serves
        if len(self._served) > SERVED_LIMIT:  # anonymous clients come and go: keep those with jobs here
            held = {job.client for job in self.store.unfinished()}
            self._served = {name: n for name, n in self._served.items() if name in held}

    def _dispatch(self) -> None:
        """Keep ComfyUI ``ahead`` prompts deep from this worker's own queue, in turn (:meth:`_backlog`); number
        the rest."""
        waiting = self._backlog()
        if not waiting:
            return
        in_comfyui = self._in_comfyui()
        room = self.config.comfyui.ahead - in_comfyui
        if room > 0 and self.comfy.connected and self.stalled is None and self.ready.is_set():
            for job in waiting[:room]:
                self._served_now(job.client)
                self.apply(job.prompt_id, lc.Dispatch())
            waiting, in_comfyui = waiting[room:], in_comfyui + min(room, len(waiting))
        for index, job in enumerate(waiting):
            self.apply(job.prompt_id, lc.Waiting(in_comfyui + index))

    async def _dispatch_post(self, prompt_id: str) -> None:
        try:
            await self._post(prompt_id)
        except ComfyUIError as exc:
            log.warning("job %s: could not hand it to ComfyUI: %s", prompt_id, exc)

    async def _post(self, prompt_id: str) -> None:
        """POST /prompt of the job's graph under our current websocket; the answer becomes an event."""
        job = self.store.get(prompt_id)
        if job is None or job.graph is None:
            return
        client_id = self.comfy.client_id
        if job.client_id != client_id:
            self.store.update(job, client_id=client_id)  # messages of this run come to this websocket
        try:
            reply = await self.comfy.submit(prompt_id, job.graph, client_id)
        except PromptRejected as exc:
            log.warning("job %s: %s", prompt_id, exc.message)
            self.apply(prompt_id, lc.SubmitRefused(exc.message))
            raise
        except ComfyUIIncompatible as exc:
            log.error("job %s: %s", prompt_id, exc)
            self.apply(prompt_id, lc.SubmitRefused(str(exc), unavailable=True))
            if exc.other_prompt_id:
                self._spawn(self._withdraw(exc.other_prompt_id))  # queued under ComfyUI's own id: adopt nothing
            raise
        except ComfyUIUnavailable as exc:
            log.warning("job %s: not submitted: %s", prompt_id, exc)
            # Sent but unanswered: ComfyUI may have queued it anyway; an owner-less run helps nobody.
            self.apply(prompt_id, lc.SubmitRefused(str(exc), unavailable=True,
                                                   maybe_queued=isinstance(exc, ComfyUITimeout)))
            raise
        except BaseException:
            self.apply(prompt_id, lc.SubmitRefused("the submission was abandoned", unavailable=True,
                                                   maybe_queued=True))
            raise
        if reply.get("node_errors"):
            # 200 with node_errors: some output nodes were dropped. A template job that
            # silently loses an output is wrong, so this is a rejection too: the job goes
            # first (so the interrupt's message finds none), then the run.
            exc = PromptRejected(
                "ComfyUI accepted only part of the workflow: " + _node_error_summary(reply["node_errors"]),
                reply["node_errors"], {"type": "partially_invalid", "message": "some outputs failed validation"})
            log.warning("job %s: %s", prompt_id, exc.message)
            self.apply(prompt_id, lc.SubmitRefused(exc.message), skip=(lc.WITHDRAW,))
            await self._withdraw(prompt_id)
            raise exc
        self.apply(prompt_id, lc.Submitted())

    async def _resubmit(self, prompt_id: str) -> None:
        try:
            await self._post(prompt_id)
        except ComfyUIError as exc:
            log.warning("job %s: submitting it again failed: %s", prompt_id, exc)

    async def _withdraw(self, prompt_id: str) -> None:
        """Take a prompt back out of ComfyUI, best effort (it is not ours to run)."""
        try:
            await self.comfy.withdraw(prompt_id)
        except ComfyUIError as exc:
            log.warning("job %s: could not withdraw it from ComfyUI: %s", prompt_id, exc)

    # --- cancel ----------------------------------------------------------------------------

    async def cancel(self, prompt_id: str) -> Job:
        """Stop a job in ComfyUI and mark it cancelled; KeyError unknown, JobFinished when it ended."""
        job = self.store.get(prompt_id)
        if job is None:
            raise KeyError(prompt_id)
        if job.finished:
            raise JobFinished(job)
        before = job
        job = self.apply(prompt_id, lc.CancelRequested(), skip=(lc.WITHDRAW,))
        asked_comfyui = job is not None and not job.finished and before.phase in lc.FOLLOWED
        if asked_comfyui:
            try:
                await self.comfy.withdraw(prompt_id)
            except ComfyUIError as exc:
                self.apply(prompt_id, lc.StopFailed(str(exc)))
                if isinstance(exc, ComfyUIUnavailable):
                    raise ComfyUIUnavailable(f"{exc}; the job was not stopped.") from None
                raise
            self.apply(prompt_id, lc.StopDone())
        job = await self._until_finished(prompt_id)
        if job.phase == CANCELLED:
            return job
        raise JobFinished(job, f"Job {prompt_id} finished in ComfyUI before the cancel took effect ({job.status}).")

    async def _until_finished(self, prompt_id: str) -> Job:
        """The job once final: a run that ended before the cancel is still storing its images."""
        deadline = self.monotonic() + self.config.comfyui.request_timeout * 2
        while True:
            job = self.store.get(prompt_id)
            if job is None:
                raise KeyError(prompt_id)
            left = deadline - self.monotonic()
            if job.finished or left <= 0:
                return job
            await self.store.wait_job(prompt_id, job.version, left)

    # --- timers --------------------------------------------------------------------------

    def _tick(self) -> None:
        """Every tick: jobs past their time or stalled, and the queue gauges."""
        event = lc.Tick(self.comfy.client_id if self.comfy.connected else None)
        for job in self.store.unfinished():
            self.apply(job.prompt_id, event)
        self._dispatch()  # after a stall or an outage, or once the journal's jobs are checked
        counts = self.store.counts()
        metrics.QUEUE_DEPTH.labels(self.name, PENDING).set(counts[PENDING])
        metrics.QUEUE_DEPTH.labels(self.name, RUNNING).set(counts[RUNNING])

    # --- websocket events (ComfyUIListener) -----------------------------------------------

    def on_connected(self, client_id: str, reconnect: bool) -> None:
        if reconnect:
            metrics.COMFYUI_RECONNECTS.labels(self.name).inc()
        self._running_id = None
        for job in self.store.unfinished():
            self.apply(job.prompt_id, lc.ComfyUp())
        # Nothing is replayed: whatever happened while we were away is in /queue and /history.
        self.request_reconcile()
        self.readiness.request_check()  # a restarted ComfyUI may have other models now
        self._dispatch()

    def on_disconnected(self, reason: str) -> None:
        self._running_id = None

    def on_unreachable(self, reason: str) -> None:
        """ComfyUI refuses connections (its process is gone): say so in every unfinished job now."""
        for job in self.store.unfinished():
            self.apply(job.prompt_id, lc.ComfyDown(reason))

    def on_message(self, msg_type: str, data: dict[str, Any]) -> None:
        if msg_type == "status":
            self._schedule_queue_refresh()
            return
        prompt_id = data.get("prompt_id")
        if not isinstance(prompt_id, str):
            return
        if self.stalled is not None:
            self._unstall(f"ComfyUI sent {msg_type}")
        event = lc.event_of(msg_type, data)
        if event is None:
            return  # progress_state, feature_flags, custom nodes' types: not needed
        if isinstance(event, (lc.Started, lc.Progress)):
            self._running_id = prompt_id
        job = self.apply(prompt_id, event)
        if isinstance(event, lc.Executed) and job is not None and job.phase in lc.BEFORE_RUN_END:
            self._view_early(prompt_id, event.refs)

    def on_preview(self, prompt_id: str | None, image: bytes, content_type: str) -> None:
        prompt_id = prompt_id or self._running_id
        job = self.store.get(prompt_id) if prompt_id else None
        if job is None or job.phase != STARTED:
            return
        self.previews[job.prompt_id] = (image, content_type)
        self.apply(job.prompt_id, lc.Preview())

    def preview(self, prompt_id: str) -> tuple[bytes, str] | None:
        return self.previews.get(prompt_id)

    # --- finishing -----------------------------------------------------------------------

    async def _fetch_history(self, prompt_id: str) -> None:
        """After ``executing null``: the outcome from history (or, failing that, the `executed` reports)."""
        try:
            entry = await self.comfy.history(prompt_id)
        except ComfyUIError as exc:
            log.warning("job %s: reading its history failed (%s); using the websocket's report", prompt_id, exc)
            self.apply(prompt_id, lc.HistoryUnreadable(str(exc)))
            return
        if entry is None:
            self.apply(prompt_id, lc.HistoryUnreadable("no history entry"))
        else:
            self.apply(prompt_id, lc.HistoryRead(outcome_of(entry)))

    async def _collect(self, prompt_id: str, refs: list) -> None:
        """Copy the outputs into images/; then the job is completed, and its clients are answered at once.

        The fsync of the images comes after that, off the path to the client: the journal holds the
        job's ``completed`` row back until the images are durable, so a worker killed in between
        restarts with the job collecting and copies its images out of ComfyUI again.
        """
        early = self._early_views.pop(prompt_id, None)
        try:
            saved = tuple(await collect_images(self.comfy, self.images, prompt_id, refs, early,
                                               in_hand=lambda name: self._hand_over(prompt_id, name)))
        except CollectError as exc:
            self.apply(prompt_id, lc.CollectFailed(str(exc), retry=exc.retry))
            return
        finally:
            self._in_hand.pop(prompt_id, None)
        journal = self.journal
        if journal is not None:
            journal.hold(prompt_id)
        job = self.apply(prompt_id, lc.Collected(saved))
        if job is None or job.images != saved:  # pruned, or it had ended, while we downloaded
            if journal is not None:
                journal.release(prompt_id)
            if job is None:
                await discard_images(self.images, list(saved))
            return
        try:
            await self.images.make_durable(saved)
        except OSError as exc:
            # Never journaled completed, then: a restart copies the images out of ComfyUI again.
            log.error("job %s: its images could not be made durable (%s); it stays journaled as collecting",
                      prompt_id, exc)
            return
        if journal is not None:
            journal.release(prompt_id)

    def _hand_over(self, prompt_id: str, name: str) -> None:
        """The run succeeded and its first image's bytes are here: a client waiting for the image itself
        (``GET /result?wait`` with ``Accept: image/*``) has them now, not after the disk write."""
        self._in_hand[prompt_id] = name
        self.store.wake_ending(prompt_id)

    def image_in_hand(self, prompt_id: str) -> str | None:
        """The name of the job's first image while it is being stored (its bytes: ``images.fresh``)."""
        return self._in_hand.get(prompt_id)

    def _view_early(self, prompt_id: str, refs: tuple) -> None:
        """`executed` named output files, which are on disk now: fetch them while ComfyUI finishes the run
        (its `execution_success` follows), not after."""
        early = self._early_views.setdefault(prompt_id, {})
        for ref in refs:
            if ref not in early:
                task = asyncio.ensure_future(self.comfy.view(ref))
                task.add_done_callback(drop_outcome)  # nobody may await it (the job failed, or it was fetched again)
                early[ref] = task

    def _forget_early_views(self, prompt_id: str) -> None:
        for task in self._early_views.pop(prompt_id, {}).values():
            task.cancel()

    # --- the stall watchdog ------------------------------------------------------------------

    def _unstall(self, why: str) -> None:
        log.info("ComfyUI moves again (%s): this worker is healthy again", why)
        self.stalled = None

    def load(self) -> dict[str, Any]:
        """What placement needs to tell which worker finishes a new job first: the sampler steps
        this worker still has to run (its own queue included) and how fast it runs them; and how
        many jobs it holds at most (ComfyUI's ``ahead`` + its own ``backlog``), so a scheduler
        fills it that far and no further."""
        steps = 0
        for job in self.store.unfinished():
            total = (job.params or {}).get("steps") or job.progress_max or DEFAULT_STEPS
            steps += max(int(total) - (job.progress_value or 0), 0) if job.phase == lc.STARTED else int(total)
        return {"steps": steps, "seconds_per_step": self.speed.seconds_per_step,
                "seconds_per_job": self.speed.seconds_per_job,
                "capacity": self.config.comfyui.ahead + self.config.backlog}

    async def health(self) -> dict[str, Any]:
        """The probe's view of ComfyUI, plus what only the runner knows: a stall, a start-up check."""
        state = dict(await self.probe.state())
        if self.stalled is not None:
            state.update(ok=False, stalled=True, error=f"{self.stalled['error']} (job {self.stalled['prompt_id']}); "
                                                       "healthy again when ComfyUI moves")
        elif not self.ready.is_set() and state["ok"]:
            state.update(ok=False, error="checking the jobs of its journal against ComfyUI")
        return state

    # --- queue positions --------------------------------------------------------------------

    def _schedule_queue_refresh(self) -> None:
        """Debounced ``GET /queue``: a burst of `status` messages costs one call."""
        if self._queue_refreshing:
            self._queue_dirty = True
            return
        if self._queue_refresh is None:
            self._queue_refresh = asyncio.get_running_loop().call_later(
                self.queue_refresh_delay, lambda: self._spawn(self._refresh_queue()))

    async def _refresh_queue(self) -> None:
        self._queue_refresh = None
        if not any(job.phase == lc.QUEUED for job in self.store.unfinished()) and self.stalled is None:
            return
        self._queue_refreshing = True
        try:
            queue = await self.comfy.queue()
        except ComfyUIError as exc:
            log.debug("queue refresh failed: %s", exc)
            return
        finally:
            self._queue_refreshing = False
        self._check_stall(queue)
        for job in self.store.unfinished():
            if job.phase == lc.QUEUED:
                self._apply_queue(job, queue)
        if self._queue_dirty:
            self._queue_dirty = False
            self._schedule_queue_refresh()

    def _apply_queue(self, job: Job, queue) -> bool:
        """An InQueue event when the snapshot shows the job; False when it does not."""
        if job.prompt_id in queue.running:
            self.apply(job.prompt_id, lc.InQueue(running=True))
            return True
        position = queue.position(job.prompt_id)
        if position is None:
            return False
        self.apply(job.prompt_id, lc.InQueue(running=False, position=position))
        return True

    def _check_stall(self, queue) -> None:
        if self.stalled is not None and self.stalled["prompt_id"] not in queue.running:
            self._unstall("the stalled prompt is no longer running")

    # --- reconciling --------------------------------------------------------------------

    def request_reconcile(self) -> None:
        """Check every unfinished job against /queue and /history (one pass at a time)."""
        self._reconcile.request()

    def _reconciled(self, done: bool | None) -> None:
        if done and not self.ready.is_set():
            log.info("journaled jobs checked against ComfyUI; taking new jobs")
            self.ready.set()

    def _periodic_reconcile(self) -> None:
        """The safety net: jobs whose messages go to an older websocket never hear them; and now
        and then every unfinished job, in case ComfyUI dropped one without a word (queue cleared)."""
        if not self.comfy.connected:
            return
        unfinished = self.store.unfinished()
        now = self.monotonic()
        if (unfinished or self.stalled) and now - self._last_full_reconcile >= self.full_reconcile_interval:
            self._last_full_reconcile = now
            self.request_reconcile()
        elif self.stalled is not None or any(job.client_id != self.comfy.client_id for job in unfinished):
            self.request_reconcile()

    async def reconcile(self) -> bool:
        """One pass; False when ComfyUI could not be asked (the pass is tried again later)."""
        jobs = [job for job in self.store.unfinished() if job.phase in lc.FOLLOWED]
        if not jobs and self.stalled is None:
            return True
        try:
            queue = await self.comfy.queue()  # before history: a job leaves the queue after its history is written
        except ComfyUIError as exc:
            log.info("cannot reconcile %d job(s) yet: %s", len(jobs), exc)
            return False
        self._check_stall(queue)
        for job in jobs:
            job = self.store.get(job.prompt_id)
            if job is None or job.phase not in lc.FOLLOWED or self._apply_queue(job, queue):
                continue
            try:
                entry = await self.comfy.history(job.prompt_id)
            except ComfyUIError as exc:
                log.info("job %s: cannot read its history yet: %s", job.prompt_id, exc)
                return False
            if entry is not None:
                log.info("job %s: finished while we were not listening; taking the result from history",
                         job.prompt_id)
                self.apply(job.prompt_id, lc.HistoryRead(outcome_of(entry)))
            else:
                self.apply(job.prompt_id, lc.Absent())
        return True


def _node_error_summary(node_errors: dict[str, Any]) -> str:
    return describe_rejection(None, node_errors).split(": ", 1)[1]


