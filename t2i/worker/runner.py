"""The job lifecycle: submit to ComfyUI, follow its messages, reconcile, time out, store images.

:class:`Runner` is the ComfyUI client's listener. Every state change goes
through the :class:`~t2i.worker.jobs.JobStore`, so ``/status`` long-polls and
the ``/jobs`` feed hear of it. Messages are never replayed by ComfyUI, so after
every reconnect (and every few seconds for jobs submitted under an older
websocket, whose messages ComfyUI now drops) unfinished jobs are checked
against ``GET /queue`` and ``GET /history/{id}``.
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
                         ImageRef, PromptRejected,
                         describe_rejection, error_sentence, images_of, outcome_of)
from t2i.config import WorkerConfig
from t2i.validation import GenerateRequest
from t2i.worker.collect import CollectError, collect_images, discard_images
from t2i.worker.health import ComfyUIProbe
from t2i.worker.images import ImageStore
from t2i.worker.jobs import CANCELLED, COMPLETED, FAILED, PENDING, RUNNING, Job, JobStore
from t2i.worker.workflow import build_workflow

log = logging.getLogger(__name__)

LOST = "ComfyUI lost this job (it restarted or its queue was cleared)."
INTERRUPTED = "The job was interrupted in ComfyUI (not by t2i)."
CANCELLED_BY_REQUEST = "Cancelled by request."
QUEUE_TIMEOUT_FACTOR = 4  # a job may wait in ComfyUI's queue this many job_timeouts


class JobFinished(Exception):
    """A cancel of a job that already ended."""

    def __init__(self, job: Job, message: str | None = None):
        super().__init__(message or f"Job {job.prompt_id} already ended ({job.status}).")
        self.job = job


class Runner:
    """Drives one ComfyUI for one worker's :class:`JobStore`."""

    reconcile_interval = 2.0  # seconds between safety-net checks of jobs we get no messages for
    full_reconcile_interval = 20.0  # seconds between checks of every unfinished job
    tick_interval = 0.5  # seconds between job_timeout checks
    queue_refresh_delay = 0.05  # debounce of GET /queue after `status` messages

    def __init__(self, config: WorkerConfig, store: JobStore, images: ImageStore,
                 comfy: ComfyUIClient | None = None, clock: Callable[[], float] = time.time):
        self.config = config
        self.store = store
        self.images = images
        self.clock = clock
        self.comfy = comfy or ComfyUIClient(
            config.comfyui.url, connect_timeout=config.comfyui.connect_timeout,
            request_timeout=config.comfyui.request_timeout)
        self.comfy.listener = self
        self.name = config.name
        # Newest live preview per running job: prompt_id -> (bytes, content type).
        self.previews: dict[str, tuple[bytes, str]] = {}
        self._executed: dict[str, list[ImageRef]] = {}  # images named in `executed` messages
        self._submitting: set[str] = set()  # POST /prompt in flight: reconcile keeps off
        self._finishing: set[str] = set()  # reading history / downloading images
        self._ending: dict[str, tuple[str, str]] = {}  # we interrupted it: the end it gets
        self._running_id: str | None = None  # whom legacy previews (no prompt_id) belong to
        self._queued_since: dict[str, float] = {}  # monotonic time of submission, for timeouts
        self._running_since: dict[str, float] = {}  # monotonic time ComfyUI started it
        self._queue_refresh: asyncio.TimerHandle | None = None
        self._queue_refreshing = False
        self._queue_dirty = False
        self._reconcile_task: asyncio.Task | None = None
        self._reconcile_again = False
        self._last_full_reconcile = time.monotonic()
        self._tasks: set[asyncio.Task] = set()
        self._callbacks: list[PeriodicCallback] = []
        self.probe = ComfyUIProbe(self.comfy, timeout=min(2.0, config.comfyui.request_timeout))

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        self.comfy.start()
        self._callbacks = [
            PeriodicCallback(self._tick, self.tick_interval * 1000, jitter=0.1),
            PeriodicCallback(self._periodic_reconcile, self.reconcile_interval * 1000, jitter=0.1),
        ]
        for callback in self._callbacks:
            callback.start()

    async def stop(self) -> None:
        for callback in self._callbacks:
            callback.stop()
        self._callbacks = []
        if self._queue_refresh is not None:
            self._queue_refresh.cancel()
        await self.comfy.stop()
        tasks = list(self._tasks)
        if self._reconcile_task is not None:
            tasks.append(self._reconcile_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    # --- submitting -----------------------------------------------------------------

    async def submit(self, request: GenerateRequest) -> Job:
        """Queue a checked request in ComfyUI; the job is in the store before the POST goes out.

        Raises ComfyUIUnavailable (503; ComfyUIIncompatible and ComfyUITimeout are kinds
        of it) or PromptRejected (502); in every case the job is removed again.
        """
        wait = min(self.config.comfyui.connect_timeout, 2.0)
        if not await self.comfy.wait_connected(wait):
            detail = self.comfy.last_error or "its websocket is not connected"
            raise ComfyUIUnavailable(f"ComfyUI is not reachable ({detail}).")
        prompt_id = str(uuid.uuid4())
        workflow = build_workflow(self.config, request, prompt_id)
        client_id = self.comfy.client_id
        job = Job(prompt_id, self.clock(), workflow=request.workflow if request.raw_workflow is None else "(raw)",
                  seed=request.params.get("seed"), client_id=client_id)
        # Messages can beat the POST reply (PROTOCOL §3): the job must already be findable.
        self.store.add(job)
        self._queued_since[prompt_id] = time.monotonic()
        self._submitting.add(prompt_id)
        try:
            reply = await self.comfy.submit(prompt_id, workflow, client_id)
            if reply.get("node_errors"):
                # 200 with node_errors: some output nodes were dropped. A template job
                # that silently loses an output is wrong, so this is a rejection too.
                await self._withdraw(prompt_id)
                raise PromptRejected(
                    "ComfyUI accepted only part of the workflow: " + _node_error_summary(reply["node_errors"]),
                    reply["node_errors"], {"type": "partially_invalid", "message": "some outputs failed validation"})
        except PromptRejected as exc:
            log.warning("job %s: %s", prompt_id, exc.message)
            self._drop(prompt_id)
            raise
        except ComfyUIIncompatible as exc:
            log.error("job %s: %s", prompt_id, exc)
            self._drop(prompt_id)
            if exc.other_prompt_id:
                self._spawn(self._withdraw(exc.other_prompt_id))  # queued under ComfyUI's own id: adopt nothing
            raise
        except ComfyUIUnavailable as exc:
            log.warning("job %s: not submitted: %s", prompt_id, exc)
            self._drop(prompt_id)
            if isinstance(exc, ComfyUITimeout):
                # Sent but unanswered: ComfyUI may have queued it anyway; an owner-less run helps nobody.
                self._spawn(self._withdraw(prompt_id))
            raise
        except BaseException:
            self._drop(prompt_id)
            raise
        finally:
            self._submitting.discard(prompt_id)
        metrics.JOBS_SUBMITTED.labels(self.name).inc()
        log.info("job %s: queued in ComfyUI as number %s (workflow %s, seed %s)", prompt_id,
                 reply.get("number"), job.workflow, job.seed)
        if job.status == PENDING:
            self._schedule_queue_refresh()
        return job

    def _drop(self, prompt_id: str) -> None:
        self.store.remove([prompt_id])
        self._forget(prompt_id)

    async def _withdraw(self, prompt_id: str) -> None:
        """Take a prompt back out of ComfyUI, best effort (it is not ours to run)."""
        try:
            await self.comfy.withdraw(prompt_id)
        except ComfyUIError as exc:
            log.warning("job %s: could not withdraw it from ComfyUI: %s", prompt_id, exc)

    # --- cancel and timeouts --------------------------------------------------------

    async def cancel(self, prompt_id: str) -> Job:
        """Stop a job in ComfyUI and mark it cancelled; KeyError unknown, JobFinished when it ended."""
        job = self.store.get(prompt_id)
        if job is None:
            raise KeyError(prompt_id)
        if job.finished:
            raise JobFinished(job)
        if prompt_id in self._finishing:
            raise JobFinished(job, f"Job {prompt_id} already finished in ComfyUI; its images are being stored.")
        await self._stop_in_comfyui(job, CANCELLED, CANCELLED_BY_REQUEST)
        if job.status != CANCELLED:
            raise JobFinished(job, f"Job {prompt_id} finished in ComfyUI before the cancel took effect.")
        return job

    async def _stop_in_comfyui(self, job: Job, status: str, error: str) -> None:
        self._ending[job.prompt_id] = (status, error)
        try:
            await self.comfy.withdraw(job.prompt_id)
        except ComfyUIUnavailable as exc:
            self._ending.pop(job.prompt_id, None)
            raise ComfyUIUnavailable(f"{exc}; the job was not stopped.") from None
        except ComfyUIError:
            self._ending.pop(job.prompt_id, None)
            raise
        if not job.finished and job.prompt_id not in self._finishing:
            self._end(job, status, error=error)

    def _tick(self) -> None:
        """Every tick: jobs past their time, and the queue gauges.

        A job may run for ``job_timeout`` (from when ComfyUI started it), and wait in the
        queue for QUEUE_TIMEOUT_FACTOR times that: a deep queue is not a fault, a queue
        that does not move is. Monotonic time: a clock step must not fail every job.
        """
        now = time.monotonic()
        limit = self.config.job_timeout
        for job in self.store.unfinished():
            prompt_id = job.prompt_id
            if prompt_id in self._submitting or prompt_id in self._finishing or prompt_id in self._ending:
                continue
            if prompt_id in self._running_since:
                if now - self._running_since[prompt_id] > limit:
                    self._spawn(self._time_out(job, f"Timed out after {limit:g} s."))
            elif now - self._queued_since.get(prompt_id, now) > limit * QUEUE_TIMEOUT_FACTOR:
                self._spawn(self._time_out(job, f"Timed out after {limit * QUEUE_TIMEOUT_FACTOR:g} s in "
                                                "ComfyUI's queue without starting."))
        counts = self.store.counts()
        metrics.QUEUE_DEPTH.labels(self.name, PENDING).set(counts[PENDING])
        metrics.QUEUE_DEPTH.labels(self.name, RUNNING).set(counts[RUNNING])

    async def _time_out(self, job: Job, error: str) -> None:
        log.warning("job %s: %s (%s); stopping it in ComfyUI", job.prompt_id, error, job.status)
        try:
            await self._stop_in_comfyui(job, FAILED, error)
        except ComfyUIError as exc:
            log.warning("job %s: %s", job.prompt_id, exc)
            if not job.finished:
                self._end(job, FAILED, error=error)

    # --- websocket events (ComfyUIListener) -----------------------------------------

    def on_connected(self, client_id: str, reconnect: bool) -> None:
        if reconnect:
            metrics.COMFYUI_RECONNECTS.labels(self.name).inc()
        self._running_id = None
        # Nothing is replayed: whatever happened while we were away is in /queue and /history.
        self.request_reconcile()

    def on_disconnected(self, reason: str) -> None:
        self._running_id = None

    def on_message(self, msg_type: str, data: dict[str, Any]) -> None:
        if msg_type == "status":
            self._schedule_queue_refresh()
            return
        handler = self._message_handlers.get(msg_type)
        if handler is None:
            return  # progress_state, feature_flags, custom nodes' types: not needed
        job = self._live(data.get("prompt_id"))
        if job is not None:
            handler(self, job, data)

    def on_preview(self, prompt_id: str | None, image: bytes, content_type: str) -> None:
        job = self._live(prompt_id or self._running_id)
        if job is None or job.status != RUNNING:
            return
        self.previews[job.prompt_id] = (image, content_type)
        self.store.update(job, preview_version=job.preview_version + 1)

    def _live(self, prompt_id: Any) -> Job | None:
        job = self.store.get(prompt_id) if isinstance(prompt_id, str) else None
        return job if job is not None and not job.finished else None

    def _mark_running(self, job: Job) -> None:
        self._running_id = job.prompt_id
        if job.status == PENDING:
            self._running_since[job.prompt_id] = time.monotonic()
            self.store.update(job, status=RUNNING, started_at=self.clock(), queue_position=None)

    def _on_execution_start(self, job: Job, data: dict[str, Any]) -> None:
        self._mark_running(job)

    def _on_executing(self, job: Job, data: dict[str, Any]) -> None:
        if data.get("node") is None:
            # The end of the run; its history entry is written by now (PROTOCOL §5).
            self._begin_finish(job, self._finish_after_run(job))
        else:
            self._mark_running(job)

    def _on_progress(self, job: Job, data: dict[str, Any]) -> None:
        value, maximum = data.get("value"), data.get("max")
        if isinstance(value, (int, float)) and isinstance(maximum, (int, float)) and maximum > 0:
            self._mark_running(job)
            self.store.update(job, progress_value=int(value), progress_max=int(maximum))

    def _on_executed(self, job: Job, data: dict[str, Any]) -> None:
        refs = images_of(data.get("output"))
        if refs:
            self._executed.setdefault(job.prompt_id, []).extend(refs)

    def _on_execution_error(self, job: Job, data: dict[str, Any]) -> None:
        if job.prompt_id in self._finishing:
            return
        error = error_sentence(data)
        log.warning("job %s: failed in ComfyUI: %s", job.prompt_id, error)
        self._end(job, FAILED, error=error)

    def _on_execution_interrupted(self, job: Job, data: dict[str, Any]) -> None:
        if job.prompt_id in self._finishing:
            return
        status, error = self._ending.get(job.prompt_id, (FAILED, INTERRUPTED))
        if status == FAILED:
            log.warning("job %s: %s", job.prompt_id, error)
        self._end(job, status, error=error)

    _message_handlers: dict[str, Callable[["Runner", Job, dict[str, Any]], None]] = {
        "execution_start": _on_execution_start,
        "execution_cached": _on_execution_start,
        "executing": _on_executing,
        "progress": _on_progress,
        "executed": _on_executed,
        "execution_error": _on_execution_error,
        "execution_interrupted": _on_execution_interrupted,
    }

    # --- finishing ------------------------------------------------------------------

    def _begin_finish(self, job: Job, coro) -> None:
        if job.prompt_id in self._finishing or job.finished:
            coro.close()
            return
        self._finishing.add(job.prompt_id)
        self._spawn(self._guarded_finish(job, coro))

    async def _guarded_finish(self, job: Job, coro) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("job %s: could not be finished", job.prompt_id)
            if not job.finished:
                self._end(job, FAILED, error=f"The worker could not finish the job: {exc}")
        finally:
            self._finishing.discard(job.prompt_id)

    async def _finish_after_run(self, job: Job) -> None:
        """After ``executing null``: the outcome from history, images from history or ``executed``."""
        try:
            entry = await self.comfy.history(job.prompt_id)
        except ComfyUIError as exc:
            log.warning("job %s: reading its history failed (%s); using the websocket's report", job.prompt_id, exc)
            entry = None
        if entry is not None:
            await self._finish_from_history(job, entry)
            return
        refs = self._executed.get(job.prompt_id, [])
        if refs:
            await self._collect_images(job, refs)
        else:
            self._end(job, FAILED, error="ComfyUI finished the job without reporting any image.")

    async def _finish_from_history(self, job: Job, entry: dict[str, Any]) -> None:
        outcome = outcome_of(entry)
        if outcome.status == "success":
            refs = outcome.images or self._executed.get(job.prompt_id, [])
            if refs:
                await self._collect_images(job, refs)
            else:
                self._end(job, FAILED, error="ComfyUI finished the job without saving any image.")
        elif outcome.status == "interrupted":
            status, error = self._ending.get(job.prompt_id, (FAILED, INTERRUPTED))
            self._end(job, status, error=error)
        else:
            log.warning("job %s: failed in ComfyUI: %s", job.prompt_id, outcome.error)
            self._end(job, FAILED, error=outcome.error)

    async def _collect_images(self, job: Job, refs: list[ImageRef]) -> None:
        """Copy the outputs into images/; then the job is completed."""
        try:
            saved = await collect_images(self.comfy, self.images, job.prompt_id, refs)
        except CollectError as exc:
            self._end(job, FAILED, error=str(exc))
            return
        if job.finished or job.prompt_id not in self.store:
            await discard_images(self.images, saved)  # cancelled or pruned while we downloaded
            return
        steps = max(job.progress_max or 1, 1)
        self._end(job, COMPLETED, images=tuple(saved), progress_value=steps, progress_max=steps)

    def _end(self, job: Job, status: str, **changes: Any) -> None:
        """The one way a job finishes: state, metrics, log, memory freed."""
        if job.finished:
            return
        self.store.update(job, status=status, queue_position=None, **changes)
        metrics.JOBS_FINISHED.labels(self.name, status).inc()
        if status == COMPLETED:
            metrics.JOB_DURATION.labels(self.name).observe(max(0.0, (job.finished_at or self.clock()) - job.created_at))
            log.info("job %s: completed, %d image(s)", job.prompt_id, len(job.images))
        elif status == CANCELLED:
            log.info("job %s: cancelled", job.prompt_id)
        self._forget(job.prompt_id)

    def _forget(self, prompt_id: str) -> None:
        self._queued_since.pop(prompt_id, None)
        self._running_since.pop(prompt_id, None)
        self.previews.pop(prompt_id, None)
        self._executed.pop(prompt_id, None)
        self._ending.pop(prompt_id, None)
        if self._running_id == prompt_id:
            self._running_id = None

    def preview(self, prompt_id: str) -> tuple[bytes, str] | None:
        return self.previews.get(prompt_id)

    # --- queue positions ------------------------------------------------------------

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
        if not any(job.status == PENDING for job in self.store.unfinished()):
            return
        self._queue_refreshing = True
        try:
            queue = await self.comfy.queue()
        except ComfyUIError as exc:
            log.debug("queue refresh failed: %s", exc)
            return
        finally:
            self._queue_refreshing = False
        for job in self.store.unfinished():
            if job.status != PENDING:
                continue
            if job.prompt_id in queue.running:
                self._mark_running(job)
            else:
                position = queue.position(job.prompt_id)
                if position is not None:
                    self.store.update(job, queue_position=position)
        if self._queue_dirty:
            self._queue_dirty = False
            self._schedule_queue_refresh()

    # --- reconciling ----------------------------------------------------------------

    def request_reconcile(self) -> None:
        """Check every unfinished job against /queue and /history (one pass at a time)."""
        if self._reconcile_task is not None and not self._reconcile_task.done():
            self._reconcile_again = True
            return
        self._reconcile_task = asyncio.ensure_future(self._reconcile_loop())

    async def _reconcile_loop(self) -> None:
        while True:
            self._reconcile_again = False
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconciling jobs with ComfyUI failed")
            if not self._reconcile_again:
                return

    def _periodic_reconcile(self) -> None:
        """The safety net: jobs whose messages go to an older websocket never hear them; and now
        and then every unfinished job, in case ComfyUI dropped one without a word (queue cleared)."""
        if not self.comfy.connected:
            return
        unfinished = self.store.unfinished()
        now = time.monotonic()
        if unfinished and now - self._last_full_reconcile >= self.full_reconcile_interval:
            self._last_full_reconcile = now
            self.request_reconcile()
        elif any(job.client_id != self.comfy.client_id for job in unfinished):
            self.request_reconcile()

    async def reconcile(self, jobs: list[Job] | None = None) -> None:
        jobs = [job for job in (jobs if jobs is not None else self.store.unfinished()) if not self._busy(job)]
        if not jobs:
            return
        try:
            queue = await self.comfy.queue()  # before history: a job leaves the queue after its history is written
        except ComfyUIError as exc:
            log.info("cannot reconcile %d job(s) yet: %s", len(jobs), exc)
            return
        for job in jobs:
            if self._busy(job) or job.finished:
                continue
            if job.prompt_id in queue.running:
                self._mark_running(job)
                continue
            position = queue.position(job.prompt_id)
            if position is not None:
                self.store.update(job, queue_position=position)
                continue
            try:
                entry = await self.comfy.history(job.prompt_id)
            except ComfyUIError as exc:
                log.info("job %s: cannot read its history yet: %s", job.prompt_id, exc)
                return
            if self._busy(job) or job.finished:
                continue
            if entry is not None:
                log.info("job %s: finished while we were not listening; taking the result from history",
                         job.prompt_id)
                self._begin_finish(job, self._finish_from_history(job, entry))
            else:
                log.warning("job %s: %s", job.prompt_id, LOST)
                self._end(job, FAILED, error=LOST)

    def _busy(self, job: Job) -> bool:
        return job.prompt_id in self._submitting or job.prompt_id in self._finishing


def _node_error_summary(node_errors: dict[str, Any]) -> str:
    return describe_rejection(None, node_errors).split(": ", 1)[1]

