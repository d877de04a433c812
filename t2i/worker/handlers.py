"""The worker's HTTP API (design.md "Public HTTP API"): thin handlers over the Runner and JobStore."""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from tornado.iostream import StreamClosedError

from t2i.comfyui import ComfyUIError, ComfyUIUnavailable, PromptRejected
from t2i.idempotency import HEADER as IDEMPOTENCY_HEADER
from t2i.idempotency import BadKey, check_key, fingerprint
from t2i.config import WorkerConfig
from t2i.jobstate import MAX_WAIT
from t2i.metrics import POLL_REQUESTS, MetricsHandler
from t2i.openapi import OpenAPIHandler
from t2i.validation import ValidationError, catalogue_of, validate_generate
from t2i.web import PROMPT_ID, APIError, JSONBodyHandler, JSONHandler, require_token
from t2i.worker.images import ImageHandler, ImageStore
from t2i.worker.jobs import COMPLETED, Job, JobStore
from t2i.worker.journal import JournalError
from t2i.worker.runner import JobFinished, KeyConflict, QueueFull, Runner, WorkflowNotReady

RETRY_AFTER = "5"
STREAM_TYPE = "application/x-ndjson"   # GET /jobs?stream=1: newline-delimited JSON
CLIENT_HEADER = "T2I-Client"   # the scheduler's client name for the job (t2i.scheduler.clients)


class WorkerHandler(JSONHandler):
    """Base of the worker's JSON handlers: shared objects come in through ``initialize``."""

    def initialize(self, config: WorkerConfig, store: JobStore, runner: Runner,
                   prune_report: Callable[[], Any] | None = None, catalogue: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
        self.config = config
        self.store = store
        self.runner = runner
        self.catalogue = catalogue or catalogue_of(config)
        self.prune_report = prune_report or (lambda: None)

    def job_or_404(self, prompt_id: str) -> Job:
        job = self.store.get(prompt_id)
        if job is not None:
            return job
        if prompt_id in self.runner.accepting:
            # POST /generate of this id is under way (a scheduler whose POST timed out asks): not "no
            # such job" while it may still be created.
            raise APIError(409, f"Job {prompt_id} is still being submitted on this worker; ask again in a moment.",
                           prompt_id=prompt_id, headers={"Retry-After": "1"})
        if self.store.was_removed(prompt_id):
            raise APIError(410, f"Job {prompt_id} is gone: this worker removed it after it ended "
                                "(task_ttl) or when ComfyUI refused it.", prompt_id=prompt_id)
        raise APIError(404, f"No job {prompt_id} on this worker.", prompt_id=prompt_id)

    def job_json(self, job: Job) -> dict[str, Any]:
        return job.to_json(self.config.public_url)


class WorkerBodyHandler(JSONBodyHandler, WorkerHandler):
    """A worker route with a (capped, streamed) request body."""

    def initialize(self, **kwargs: Any) -> None:
        WorkerHandler.initialize(self, **kwargs)
        JSONBodyHandler.initialize(self, max_body_bytes=kwargs["config"].max_body_bytes)


class GenerateHandler(WorkerBodyHandler):
    async def post(self) -> None:
        """Check a request, queue it in ComfyUI, answer with the job's id and URLs."""
        require_token(self, self.config.auth_token)
        body = self.get_json_body()
        key = self.request.headers.get(IDEMPOTENCY_HEADER)
        # Trusted as given: with an auth_token set only the scheduler got this far (require_token).
        client = self.request.headers.get(CLIENT_HEADER) or None
        if client is not None and (len(client) > 200 or not client.isprintable()):
            raise APIError(400, f"The {CLIENT_HEADER} header must be at most 200 printable characters.",
                           header=CLIENT_HEADER)
        try:
            if key is not None:
                check_key(key)
            # with the choices ComfyUI lists (object_info) for enum parameters that configure none
            request = validate_generate(body, self.runner.readiness.catalogue(self.catalogue))
        except BadKey as exc:
            raise APIError(400, str(exc), header=IDEMPOTENCY_HEADER) from None
        except ValidationError as exc:
            raise APIError(400, str(exc), field=exc.field) from None
        try:
            job, duplicate = await self.runner.submit(request, key, fingerprint(body) if key is not None else None,
                                                      client=client)
        except ValidationError as exc:  # an input image found wanting only when it was decoded
            raise APIError(400, str(exc), field=exc.field) from None
        except KeyConflict as exc:
            headers = {"Retry-After": "1"} if exc.status == 409 else {}
            raise APIError(exc.status, str(exc), prompt_id=exc.prompt_id, headers=headers) from None
        except WorkflowNotReady as exc:
            raise APIError(503, str(exc), workflow_not_ready=True, workflow=exc.workflow,
                           headers={"Retry-After": RETRY_AFTER}) from None
        except QueueFull as exc:  # said so that a scheduler tries another worker and keeps this one
            raise APIError(503, str(exc), queue_full=True, headers={"Retry-After": RETRY_AFTER}) from None
        except (ComfyUIUnavailable, JournalError) as exc:
            raise APIError(503, str(exc), headers={"Retry-After": RETRY_AFTER}) from None
        except PromptRejected as exc:
            raise APIError(502, exc.message, node_errors=exc.node_errors, comfyui_error=exc.comfyui_error) from None
        self.write_json({
            "prompt_id": job.prompt_id,
            "worker": self.config.name,
            "worker_url": self.config.public_url,
            "status_url": f"/status/{job.prompt_id}",
            "result_url": f"/result/{job.prompt_id}",
            "seed": job.seed,
            **({"duplicate": True} if duplicate else {}),
        })


class StatusHandler(WorkerHandler):
    async def get(self, prompt_id: str) -> None:
        """The job's state; with ``?wait=S&since=V`` held until its version passes V."""
        POLL_REQUESTS.labels("worker").inc()
        job = self.job_or_404(prompt_id)
        wait = min(self.get_number_argument("wait", float, 0.0), MAX_WAIT)
        since = self.get_number_argument("since", int, None)
        if wait > 0 and since is not None and job.version <= since:
            if not await self.wait_unless_gone(self.store.wait_job(prompt_id, since, wait)):
                return
            job = self.job_or_404(prompt_id)
        self.write_json(self.job_json(job))


class ResultHandler(WorkerHandler):
    async def get(self, prompt_id: str) -> None:
        """200 with the image URLs (or the error) when finished, 202 with the status while not;
        ``?wait=S`` holds the request until the job ends (one request to the result),
        ``?redirect=image`` answers a completed job with a 303 to its image, and ``Accept: image/*``
        with the image itself."""
        job = self.job_or_404(prompt_id)
        wait = min(self.get_number_argument("wait", float, 0.0), MAX_WAIT)
        deadline = time.monotonic() + wait
        image_wanted = self.image_asked()
        self.set_header("Vary", "Accept")
        while not job.finished and (left := deadline - time.monotonic()) > 0:
            if image_wanted and (name := self.runner.image_in_hand(prompt_id)) is not None:
                # Its run succeeded and the image is here: the client need not wait for the disk write.
                image = self.runner.images.fresh(name)
                if image is not None:
                    self.write_image(name, image)
                    return
            if not await self.wait_unless_gone(self.store.wait_ending(prompt_id, left)):
                return
            job = self.job_or_404(prompt_id)
        if job.status == COMPLETED and job.images and not job.image_expired and image_wanted:
            image = await self.runner.images.read(job.images[0])
            if image is not None:
                self.write_image(job.images[0], image)
                return
        self.write_result(self.job_json(job))

    def write_image(self, name: str, image: bytes) -> None:
        """The image itself: the client's second request saved (the bytes it would fetch from image_url next)."""
        self.set_header("Content-Type", ImageStore.content_type(name))
        self.set_header("Content-Location", f"{self.config.public_url}/images/{name}")
        self.set_header("Cache-Control", "no-store")
        # Its name is unique and the file immutable: the ETag Tornado would make is a SHA-1 over the
        # whole image, on the event loop, on the path to the client (about 1 ms per MB).
        self.set_header("Etag", f'"{name}"')
        if self.check_etag_header():  # Tornado checks only the ETags it makes itself
            self.set_status(304)
            self.finish()
            return
        self.finish(image)


class CancelHandler(WorkerBodyHandler):
    async def post(self, prompt_id: str) -> None:
        """Stop a pending or running job in ComfyUI; it ends ``cancelled``."""
        self.check_body_size()
        require_token(self, self.config.auth_token)
        self.job_or_404(prompt_id)
        try:
            job = await self.runner.cancel(prompt_id)
        except KeyError:
            raise APIError(404, f"No job {prompt_id} on this worker.", prompt_id=prompt_id) from None
        except JobFinished as exc:
            raise APIError(409, str(exc), prompt_id=prompt_id, status=exc.job.status) from None
        except ComfyUIUnavailable as exc:
            raise APIError(503, str(exc), headers={"Retry-After": RETRY_AFTER}) from None
        except ComfyUIError as exc:
            raise APIError(502, f"ComfyUI failed the cancel: {exc}", prompt_id=prompt_id) from None
        self.write_json(self.job_json(job))


class JobsHandler(WorkerHandler):
    async def get(self) -> None:
        """The change feed: jobs changed after ``since`` (and removals), waiting up to ``wait`` s;
        ``stream=1``: every change as it happens, on one answer that lasts ``wait`` s."""
        require_token(self, self.config.auth_token)
        since = self.get_number_argument("since", int, 0)
        wait = min(self.get_number_argument("wait", float, 0.0), MAX_WAIT)
        limit = self.get_number_argument("limit", int, None)
        after = self.get_number_argument("after", int, 0)
        stream = self.get_number_argument("stream", int, 0)
        if limit is not None and limit < 1:
            raise APIError(400, "limit must be at least 1.", field="limit")
        if stream > 1:
            raise APIError(400, "stream must be 0 or 1.", field="stream")
        if stream:
            await self.stream(since, wait, limit, self.get_query_argument("epoch", None))
            return
        if wait > 0 and since == self.store.seq:  # nothing new: hold the request
            if not await self.wait_unless_gone(self.store.wait_feed(since, wait)):
                return
        page = self.store.page(since, limit, after)
        body: dict[str, Any] = {"epoch": self.store.epoch, "seq": self.store.seq, "full": page.full}
        if limit is not None:
            body.update(more=page.more, cursor=page.cursor)
        body.update(jobs=[self.job_json(job) for job in page.jobs], removed=page.removed)
        self.write_json(body)

    async def stream(self, since: int, wait: float, limit: int | None, epoch: str | None) -> None:
        """Newline-delimited JSON, one batch of lines per change of the store: each changed job's status
        object (as ``GET /status`` shows it), then a mark, a feed page without jobs (``jobs: []``), that
        brings the follower up to its ``seq`` and names the removals. The first batch comes at once
        (the changes since ``since``, perhaps none); after ``wait`` seconds a last mark ends the answer.
        When ``since`` needs a full listing, or ``epoch`` (the follower's) is not this run's: one mark with
        ``full: true`` and the end (list the jobs with paged requests, then stream from the listing's ``seq``).

        A follower pays a decode and a mirror update per change, not a request and an answer on both
        sides (a job changes five or more times); changes made within one turn of the event loop come
        as one batch, and a job's progress superseded before it is sent is never sent: a known job's
        queue position, start and progress are held up to ``JobStore.feed_hold`` for what comes next; a new
        job, an ending and a removal go at once."""
        self.set_header("Content-Type", STREAM_TYPE)
        deadline = time.monotonic() + wait
        relist = epoch is not None and epoch != self.store.epoch
        while not relist:
            page = self.store.page(since, limit)
            if page.full:
                relist = True
                break
            since = page.cursor if page.more else self.store.seq
            lines = [json.dumps(self.job_json(job), separators=(",", ":")).encode() + b"\n" for job in page.jobs]
            lines.append(feed_mark(self.store.epoch, since, False, page.removed))
            self.write(b"".join(lines))
            try:
                await self.flush()
            except StreamClosedError:
                return
            if page.more:
                continue
            left = deadline - time.monotonic()
            if left <= 0 or self._client_gone:
                break
            if not await self.wait_unless_gone(self.store.wait_feed(since, left)):
                return
            if self.store.seq == since:
                break  # the wait passed
            # Only a known job's progress so far: held a moment (JobStore.feed_hold), unless something
            # urgent comes meanwhile, so that what follows it crosses in the same batch.
            hold = min(self.store.feed_hold, deadline - time.monotonic())
            if not await self.wait_unless_gone(self.store.wait_urgent(since, hold)):
                return
        self.finish(feed_mark(self.store.epoch, self.store.seq if relist else since, relist, []))


def feed_mark(epoch: str, seq: int, full: bool, removed: list[str]) -> bytes:
    """A streamed feed's line that ends a batch (see JobsHandler.stream): a feed page without jobs."""
    return json.dumps({"epoch": epoch, "seq": seq, "full": full, "jobs": [], "removed": removed},
                      separators=(",", ":")).encode() + b"\n"


class WorkflowsHandler(WorkerHandler):
    def get(self) -> None:
        """The workflow catalogue (what /generate accepts) and whether ComfyUI can run each one now."""
        self.write_json(self.runner.readiness.catalogue(self.catalogue))


class HealthHandler(WorkerHandler):
    async def get(self) -> None:
        """200 when ComfyUI answers, its websocket is up and it is not stalled, else 503 with the reason."""
        comfyui = await self.runner.health()
        ok = bool(comfyui.pop("ok"))
        self.write_json({"ok": ok, "name": self.config.name, "comfyui": comfyui, "jobs": self.store.counts(),
                         "load": self.runner.load(), "prune": self.prune_report()}, status=200 if ok else 503)


class PreviewHandler(WorkerHandler):
    def get(self, prompt_id: str) -> None:
        """The newest live preview of a running job (never cached)."""
        preview = self.runner.preview(prompt_id)
        if preview is None:
            raise APIError(404, f"No preview of job {prompt_id} right now.", prompt_id=prompt_id)
        image, content_type = preview
        self.set_header("Content-Type", content_type)
        self.set_header("Cache-Control", "no-store")
        self.finish(image)


def url_table(config: WorkerConfig, store: JobStore, runner: Runner,
              prune_report: Callable[[], Any] | None = None) -> list[tuple]:
    """``default_handlers`` bound to one worker's objects."""
    kwargs = {"config": config, "store": store, "runner": runner, "prune_report": prune_report,
              "catalogue": catalogue_of(config)}
    table = []
    for spec in default_handlers:
        pattern, handler = spec[0], spec[1]
        if handler is ImageHandler:
            table.append((pattern, handler, {"path": str(config.images_dir)}))
        elif handler is OpenAPIHandler:
            table.append((pattern, handler, {"server": "worker"}))
        elif handler is MetricsHandler:
            table.append((pattern, handler))
        else:
            table.append((pattern, handler, kwargs))
    return table


default_handlers = [
    (r"/generate", GenerateHandler),
    (rf"/status/{PROMPT_ID}", StatusHandler),
    (rf"/result/{PROMPT_ID}", ResultHandler),
    (rf"/cancel/{PROMPT_ID}", CancelHandler),
    (r"/jobs", JobsHandler),
    (r"/workflows", WorkflowsHandler),
    (r"/health", HealthHandler),
    (rf"/previews/{PROMPT_ID}", PreviewHandler),
    (r"/images/(.*)", ImageHandler),
    (r"/metrics", MetricsHandler),
    (r"/openapi.json", OpenAPIHandler),
]
