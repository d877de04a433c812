"""Retention: prune finished task states, old images and t2i's files in ComfyUI's output and input folders.

One pass (:meth:`Pruner.prune_once`) at start, then one every ``retention.interval``
seconds from a ``PeriodicCallback`` (jitter 0.1), as jupyterhub-idle-culler does.
A pass never holds the event loop long: Python work on the loop runs in slices
that yield every few milliseconds, and directory scans and unlinks run in the
default executor in batches.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

from tornado.ioloop import PeriodicCallback

from t2i.config import RetentionConfig
from t2i.metrics import PRUNED, PRUNED_BYTES
from t2i.worker.images import ImageStore
from t2i.worker.inputs import SUBFOLDER as INPUT_SUBFOLDER
from t2i.worker.inputs import UPLOAD_NAME
from t2i.worker.jobs import JobStore
from t2i.worker.webhooks import PENDING as WEBHOOK_PENDING
from t2i.worker.webhooks import WAITING as WEBHOOK_WAITING

log = logging.getLogger(__name__)

# The files t2i's SaveImage node writes (filename_prefix ``t2i_<prompt_id>``); nothing else there is touched.
# (Job ids are UUID4s, or UUID5s made from an Idempotency-Key.)
COMFY_OUTPUT_NAME = re.compile(
    r"^t2i_(?P<prompt_id>[0-9a-f]{8}-[0-9a-f]{4}-[45][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12})"
    r"_\d{5}_\.(?:png|jpg|jpeg|webp)$")

SLICE_SECONDS = 0.005    # longest run of Python work on the loop before yielding
UNLINK_BATCH = 200       # unlinks per executor call
TASK_BATCH = 500         # task states per JobStore.remove call
COMFY_GRACE = 60.0       # a finished job's ComfyUI file is kept this long (seconds, by mtime)


class _Slicer:
    """Yield to the event loop once ``budget`` seconds of work have passed since the last yield."""

    __slots__ = ("budget", "deadline")

    def __init__(self, budget: float = SLICE_SECONDS):
        self.budget = budget
        self.deadline = time.perf_counter() + budget

    def due(self) -> bool:
        return time.perf_counter() >= self.deadline

    async def pause(self) -> None:
        # One sleep(0) queues our next slice in the loop's next iteration, but a coroutine
        # that a timer or socket wakes (future -> done callback -> task step) only lands
        # in the iteration after that, behind our next slice: a 5 ms slice would then hold
        # it up to 15 ms. Yielding over three iterations lets it run first.
        for _ in range(3):
            await asyncio.sleep(0)
        self.deadline = time.perf_counter() + self.budget

    async def tick(self) -> None:
        if time.perf_counter() >= self.deadline:
            await self.pause()


def _unlink_batch(directory: str, names: list[str]) -> tuple[list[str], list[str], list[tuple[str, OSError]]]:
    """(removed, already gone, failed) -- runs in the executor."""
    removed, gone, failed = [], [], []
    for name in names:
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            gone.append(name)
        except OSError as exc:
            failed.append((name, exc))
        else:
            removed.append(name)
    return removed, gone, failed


def _scan_comfy_output(directory: str, pattern: re.Pattern = COMFY_OUTPUT_NAME) -> list[tuple[str, str, float]]:
    """(name, prompt_id, mtime) of t2i's files in a ComfyUI folder -- runs in the executor."""
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            match = pattern.match(entry.name)
            if match is None:
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                mtime = entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue
            found.append((entry.name, match.group("prompt_id"), mtime))
    return found


def _webhook_owed(job: Any) -> bool:
    return job is not None and bool(job.webhook) and job.webhook["state"] in (WEBHOOK_WAITING, WEBHOOK_PENDING)


def _prompt_id_of(image_name: str) -> str:
    """``<prompt_id>_<n>.<ext>`` -> prompt_id."""
    return image_name.rsplit("_", 1)[0]


class Pruner:
    """Removes what retention says should go; see the "Pruning" section of the design."""

    def __init__(self, store: JobStore, images: ImageStore, config: RetentionConfig,
                 comfy_output_dir: Path | str | None, worker_name: str,
                 clock: Callable[[], float] = time.time, *, comfy_grace: float = COMFY_GRACE,
                 slice_seconds: float = SLICE_SECONDS, unlink_batch: int = UNLINK_BATCH,
                 comfy_input_dir: Path | str | None = None,
                 record_removal: Callable[[list[str]], Awaitable[None]] | None = None):
        self.store = store
        # Awaited before task states are removed (the journal's Journal.forget_now): a pruned job answers
        # 410 only once its removal is on disk, so a worker killed right after does not bring it back.
        self.record_removal = record_removal
        self.images = images
        self.config = config
        self.comfy_output_dir = Path(comfy_output_dir) if comfy_output_dir else None
        # t2i's uploads: input/t2i/<prompt_id>_<param>.<ext> (t2i.worker.inputs), nothing else
        self.comfy_inputs_dir = Path(comfy_input_dir) / INPUT_SUBFOLDER if comfy_input_dir else None
        self.worker_name = worker_name
        self.clock = clock
        self.comfy_grace = comfy_grace
        self.slice_seconds = slice_seconds
        self.unlink_batch = unlink_batch
        self.last_report: dict[str, Any] | None = None
        self._lock = asyncio.Lock()
        self._callback: PeriodicCallback | None = None
        self._task: asyncio.Task | None = None

    # --- scheduling ---------------------------------------------------------

    def start(self) -> None:
        """Run one pass now (as a task), then one every ``interval`` seconds."""
        self._tick()
        self._callback = PeriodicCallback(self._tick, self.config.interval * 1000, jitter=0.1)
        self._callback.start()

    def stop(self) -> None:
        if self._callback is not None:
            self._callback.stop()
            self._callback = None
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._task = None

    def _tick(self) -> None:
        if self._lock.locked() or (self._task is not None and not self._task.done()):
            log.debug("Prune pass still running; skipping this tick")
            return
        self._task = asyncio.ensure_future(self._pass())

    async def _pass(self) -> None:
        try:
            await self.prune_once()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("Prune pass failed")

    # --- one pass -----------------------------------------------------------

    async def prune_once(self) -> dict[str, Any]:
        """One pass over task states, images and ComfyUI's output files; returns the report."""
        async with self._lock:
            started = time.perf_counter()
            report: dict[str, Any] = {"at": self.clock(), "duration": 0.0, "tasks_removed": 0,
                                      "images_removed": 0, "bytes_removed": 0,
                                      "comfyui_files_removed": 0, "comfyui_inputs_removed": 0, "errors": []}
            slicer = _Slicer(self.slice_seconds)
            for phase in (self._prune_tasks, self._prune_images, self._prune_comfy_output,
                          self._prune_comfy_inputs):
                try:
                    await phase(report, slicer)
                except Exception as exc:
                    log.exception("Prune step %s failed", phase.__name__)
                    report["errors"].append(f"{phase.__name__.lstrip('_')}: {exc}")
            report["duration"] = round(time.perf_counter() - started, 6)
            self._count(report)
            self.last_report = report
            return report

    async def _prune_tasks(self, report: dict[str, Any], slicer: _Slicer) -> None:
        """Finished task states older than ``task_ttl``, in batches (the store lists only finished ones)."""
        cutoff = report["at"] - self.config.task_ttl
        # One pass over the finish order (remove() changes it, so never iterate it across an await).
        # A job whose webhook is still owed stays until it is delivered or given up.
        due = [prompt_id for prompt_id in self.store.finished_before(cutoff)
               if not _webhook_owed(self.store.get(prompt_id))]
        for start in range(0, len(due), TASK_BATCH):
            batch = due[start:start + TASK_BATCH]
            if self.record_removal is not None:
                await self.record_removal(batch)
            report["tasks_removed"] += self.store.remove(batch)
            await slicer.tick()

    async def _prune_images(self, report: dict[str, Any], slicer: _Slicer) -> None:
        victims = await self._choose_images(report["at"], slicer)
        if not victims:
            return
        sizes = dict(victims)
        failures: list[tuple[str, OSError]] = []
        async for removed, gone, failed in self._unlink(self.images.directory, [n for n, _ in victims]):
            for name in removed:
                report["bytes_removed"] += sizes[name]
            failures.extend(failed)
            # Forget and expire as we go, so a stopped pass leaves the index true.
            self.images.forget(removed)
            self.images.forget(gone)
            report["images_removed"] += len(removed) + len(gone)
            await self._expire(removed + gone, slicer)
        if failures:
            report["errors"].append(self._summarise("images", self.images.directory, len(victims), failures))

    async def _choose_images(self, now: float, slicer: _Slicer) -> list[tuple[str, int]]:
        """(name, size) of the images to remove, oldest first."""
        # One C-level copy: the index may change while we yield (new images saved).
        entries = list(self.images.index.items())
        await slicer.tick()
        count = len(entries)
        total = 0
        ordered = True
        last = float("-inf")
        for i, (_, (size, mtime)) in enumerate(entries):
            total += size
            if mtime < last:
                ordered = False
            last = mtime
            if i & 255 == 0:
                await slicer.tick()
        if not ordered:
            # Insertion order is only roughly age order (take_stock sorts; saves append).
            await slicer.pause()
            entries.sort(key=lambda item: item[1][1])
            await slicer.pause()
        age_cutoff = now - self.config.image_max_age
        max_count = self.config.image_max_count
        max_bytes = self.config.image_max_bytes
        victims = []
        for i, (name, (size, mtime)) in enumerate(entries):
            if not (mtime < age_cutoff
                    or (max_count is not None and count > max_count)
                    or (max_bytes is not None and total > max_bytes)):
                break  # oldest first: everything after is younger and within the limits
            victims.append((name, size))
            count -= 1
            total -= size
            if i & 255 == 0:
                await slicer.tick()
        return victims

    async def _expire(self, names: Iterable[str], slicer: _Slicer) -> None:
        """Mark the held jobs whose images were removed: ``/status`` then says the image expired."""
        for i, name in enumerate(names):
            job = self.store.get(_prompt_id_of(name))
            # Only a job that shows this image expires (not one still saving its images).
            if job is not None and not job.image_expired and name in job.images:
                self.store.update(job, image_expired=True)
            if i & 63 == 0:
                await slicer.tick()

    async def _prune_comfy_output(self, report: dict[str, Any], slicer: _Slicer) -> None:
        """t2i's own files in ComfyUI's output folder (and only those)."""
        if self.comfy_output_dir is None:
            return
        await self._prune_comfy_files(report, slicer, str(self.comfy_output_dir), COMFY_OUTPUT_NAME,
                                      "comfyui_files_removed", "ComfyUI output files")

    async def _prune_comfy_inputs(self, report: dict[str, Any], slicer: _Slicer) -> None:
        """The input images t2i uploaded (ComfyUI never deletes them), once their job has ended."""
        if self.comfy_inputs_dir is None:
            return
        await self._prune_comfy_files(report, slicer, str(self.comfy_inputs_dir), UPLOAD_NAME,
                                      "comfyui_inputs_removed", "ComfyUI input images")

    async def _prune_comfy_files(self, report: dict[str, Any], slicer: _Slicer, directory: str,
                                 pattern: re.Pattern, counter: str, what: str) -> None:
        """t2i's files of ended (or forgotten) jobs in a ComfyUI folder, after ``comfy_grace``."""
        loop = asyncio.get_running_loop()
        try:
            found = await loop.run_in_executor(None, _scan_comfy_output, directory, pattern)
        except FileNotFoundError:
            return
        now = report["at"]
        age_cutoff = now - self.config.image_max_age
        grace_cutoff = now - self.comfy_grace
        victims = []
        for i, (name, prompt_id, mtime) in enumerate(found):
            job = self.store.get(prompt_id)
            if job is not None and not job.finished:
                continue  # not collected yet (a job the journal brought back may be days old)
            # Copied into images/ (finished) or forgotten: ComfyUI's copy is no longer needed.
            if mtime < age_cutoff or mtime < grace_cutoff:
                victims.append(name)
            if i & 255 == 0:
                await slicer.tick()
        failures: list[tuple[str, OSError]] = []
        async for removed, gone, failed in self._unlink(directory, victims):
            report[counter] += len(removed) + len(gone)
            failures.extend(failed)
        if failures:
            report["errors"].append(self._summarise(what, directory, len(victims), failures))

    async def _unlink(self, directory: Path | str, names: list[str]):
        """Unlink ``names`` in the executor, ``unlink_batch`` at a time; yields each batch's outcome."""
        loop = asyncio.get_running_loop()
        directory = str(directory)
        for start in range(0, len(names), self.unlink_batch):
            batch = names[start:start + self.unlink_batch]
            yield await loop.run_in_executor(None, _unlink_batch, directory, batch)

    def _summarise(self, what: str, directory: Path | str, attempted: int,
                   failures: list[tuple[str, OSError]]) -> str:
        """One error line for many failed unlinks (a read-only folder fails them all)."""
        name, exc = failures[0]
        message = (f"could not remove {len(failures)} of {attempted} {what} in {directory} "
                   f"(first: {name}: {exc.strerror or exc}); kept for the next pass")
        log.error("Prune: %s", message)
        return message

    def _count(self, report: dict[str, Any]) -> None:
        worker = self.worker_name
        for kind, key in (("tasks", "tasks_removed"), ("images", "images_removed"),
                          ("comfyui_files", "comfyui_files_removed"), ("comfyui_inputs", "comfyui_inputs_removed")):
            if report[key]:
                PRUNED.labels(worker=worker, kind=kind).inc(report[key])
        if report["bytes_removed"]:
            PRUNED_BYTES.labels(worker=worker).inc(report["bytes_removed"])
        removed = report["tasks_removed"] or report["images_removed"] or report["comfyui_files_removed"] \
            or report["comfyui_inputs_removed"]
        log.log(logging.INFO if removed else logging.DEBUG,
                "Pruned %d task states, %d images (%d bytes), %d ComfyUI files, %d ComfyUI input images in %.3fs%s",
                report["tasks_removed"], report["images_removed"], report["bytes_removed"],
                report["comfyui_files_removed"], report["comfyui_inputs_removed"], report["duration"],
                f"; {len(report['errors'])} errors" if report["errors"] else "")
