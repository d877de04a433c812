"""The scheduler's HTTP API (design.md): thin handlers over JobRouter, Mirror and Registry."""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import quote

from t2i.idempotency import HEADER as IDEMPOTENCY_HEADER
from t2i.jobstate import COMPLETED, MAX_WAIT
from t2i.metrics import POLL_REQUESTS, MetricsHandler
from t2i.openapi import OpenAPIHandler
from t2i.scheduler.clients import LIST_LIMIT, LIST_MAX, Clients, decode_cursor, list_jobs, parse_statuses
from t2i.scheduler.fastpath import SHUTTING_DOWN
from t2i.scheduler.forward import JobRouter, Reply
from t2i.scheduler.mirror import Mirror
from t2i.scheduler.placement import Placement
from t2i.scheduler.registry import Registry
from t2i.web import PROMPT_ID, APIError, FileHandler, JSONBodyHandler, JSONHandler, NotFoundHandler

_POLLS = POLL_REQUESTS.labels(server="scheduler")  # resolved once: /status is the hot path


class SchedulerHandler(JSONHandler):
    """Base: the shared objects come in through the URL spec."""

    def initialize(self, registry: Registry, mirror: Mirror, placement: Placement, router: JobRouter,
                   clients: Clients, **kwargs: Any) -> None:
        self.registry = registry
        self.mirror = mirror
        self.placement = placement
        self.router = router
        self.clients = clients

    def client(self) -> str:
        """The caller's client name (401 for a wrong key, or none where a key is required)."""
        return self.clients.identify(self)

    def write_reply(self, reply: Reply) -> None:
        for name, value in reply.headers.items():
            self.set_header(name, value)
        self.write_json(reply.body, reply.status)


class SchedulerBodyHandler(JSONBodyHandler, SchedulerHandler):
    """A scheduler route with a (capped, streamed) request body."""

    def initialize(self, registry: Registry, mirror: Mirror, placement: Placement, router: JobRouter,
                   clients: Clients, max_body_bytes: int | None = None, **kwargs: Any) -> None:
        JSONBodyHandler.initialize(self, max_body_bytes=max_body_bytes)
        SchedulerHandler.initialize(self, registry, mirror, placement, router, clients)


class GenerateHandler(SchedulerBodyHandler):
    async def post(self) -> None:
        """Validate the request and place it on the least-loaded ready worker for the caller's client
        (Idempotency-Key honoured; 429 when the client holds max_jobs unfinished jobs)."""
        client = self.client()
        body = self.get_json_body()
        # The worker gets the bytes the client sent (json.dumps of a body of input images would hold the
        # loop again for as long as its json.loads did).
        self.write_reply(await self.router.generate(body, self.request.headers.get(IDEMPOTENCY_HEADER), client,
                                                    body_bytes=self.request.body))


class StatusHandler(SchedulerHandler):
    async def get(self, prompt_id: str) -> None:
        """The job's state: from the mirror when fresh (no await), else from its worker; long-poll."""
        _POLLS.inc()
        entry = self.mirror.fresh(prompt_id)
        wait, since = self._wait_args()
        if entry is not None and (wait <= 0 or since is None or entry.version > since):
            self.finish(entry.encoded())
            return
        if entry is not None:
            if not await self.wait_unless_gone(self.mirror.wait(prompt_id, since, wait)):
                return
            if self.router.closing:
                raise APIError(503, SHUTTING_DOWN, headers={"Retry-After": "1"})
            entry = self.mirror.fresh(prompt_id)
            if entry is not None:
                self.finish(entry.encoded())
                return
            wait = 0  # the copy went stale while waiting: ask the worker for the state now
        self.write_reply(await self.router.status(prompt_id, wait, since))

    def _wait_args(self) -> tuple[float, int | None]:
        wait = self.get_number_argument("wait", float, 0.0)
        since = self.get_number_argument("since", int, None)
        return min(wait, MAX_WAIT), since



class ResultHandler(SchedulerHandler):
    async def get(self, prompt_id: str) -> None:
        """200 with the image URLs (or the error) when finished, 202 while not; ``?wait=S`` holds
        the request until the job ends, ``?redirect=image`` answers a completed job with a 303.
        ``Accept: image/*``: a 307 to the same request at the job's worker, which answers with the image
        itself (the worker has it first; this scheduler holds no images)."""
        wait = min(self.get_number_argument("wait", float, 0.0), MAX_WAIT)
        if self.image_asked() and self.redirect_to_worker(prompt_id):
            return
        deadline = time.monotonic() + wait
        entry = self.mirror.fresh(prompt_id)
        while entry is not None and not entry.final and (left := deadline - time.monotonic()) > 0:
            if not await self.wait_unless_gone(self.mirror.wait(prompt_id, entry.version, left)):
                return
            entry = self.mirror.fresh(prompt_id)
        if entry is not None:
            self.write_result(entry.status)
            return
        reply = await self.router.result(prompt_id)
        if reply.status in (200, 202):
            self.write_result(reply.body)  # the owner's answer, redirected when asked
        else:
            self.write_reply(reply)

    def redirect_to_worker(self, prompt_id: str) -> bool:
        """307 to the job's worker (True), unless the job ended without an image, or its worker is unknown
        or unreachable now (False: then the JSON answer, as without ``Accept``)."""
        entry = self.mirror.get(prompt_id)
        if entry is not None and entry.final and entry.state != COMPLETED:
            return False
        worker_url = self.router.owner_url(prompt_id)
        if worker_url is None:
            return False
        query = self.request.query
        self.set_header("Vary", "Accept")
        self.redirect(f"{worker_url}/result/{quote(prompt_id, safe='')}" + (f"?{query}" if query else ""),
                      status=307)
        return True


class CancelHandler(SchedulerBodyHandler):
    async def post(self, prompt_id: str) -> None:
        """Cancel one of the caller's jobs on its worker (409 when it already ended; another's is 404)."""
        client = self.client()
        self.check_body_size()
        self.write_reply(await self.router.cancel(prompt_id, client))


class CancelAllHandler(SchedulerBodyHandler):
    async def post(self) -> None:
        """Cancel every unfinished job of the caller's: how many, which, and those that could not be."""
        client = self.client()
        self.check_body_size()
        self.write_json(await self.router.cancel_all(client))


class JobsHandler(SchedulerHandler):
    def get(self) -> None:
        """The caller's jobs from the mirror, newest first: ``limit``, ``status`` filter, ``before`` cursor."""
        client = self.client()
        limit = self.get_number_argument("limit", int, LIST_LIMIT)
        if not 1 <= limit <= LIST_MAX:
            raise APIError(400, f"`limit` must be 1 to {LIST_MAX}.", field="limit")
        try:
            statuses = parse_statuses(self.get_query_argument("status", None))
        except ValueError as exc:
            raise APIError(400, f"`status` takes a comma list of pending, running, completed, failed and "
                                f"cancelled (not {exc}).", field="status") from None
        before = self.get_query_argument("before", None)
        try:
            cursor = decode_cursor(before) if before is not None else None
        except ValueError:
            raise APIError(400, "`before` must be the `next` of a previous answer.", field="before") from None
        entries, next_cursor = list_jobs(self.mirror, client, limit, statuses, cursor)
        head = json.dumps({"client": client}, separators=(",", ":"))[:-1]
        self.finish(b"".join([head.encode(), b',"jobs":[', b",".join(entry.encoded() for entry in entries),
                              b'],"next":', json.dumps(next_cursor).encode(), b"}"]))


class WorkersHandler(SchedulerHandler):
    async def get(self) -> None:
        """The pool as last loaded: health, load, feed, readiness and breakers, and the last reload error."""
        workers: list[dict[str, Any]] = []
        async for chunk in self.placement.describe_in_slices():  # a thousand workers: the loop breathes
            workers += chunk
        self.write_json({"workers": workers, "config": self.registry.config.to_json()})


class HealthHandler(SchedulerHandler):
    def initialize(self, simulated: bool = False, poll_interval: float = 1.5, **kwargs: Any) -> None:
        super().initialize(**kwargs)
        self.simulated = simulated
        self.poll_interval = poll_interval

    def get(self) -> None:
        """200 when at least one worker can take jobs, else 503; each worker in short."""
        workers = self.placement.summary()
        ok = any(w["ok"] for w in workers)
        # The page polls /status at the interval ops configured (scheduler.yaml poll_interval).
        body: dict[str, Any] = {"ok": ok, "workers": workers, "poll_interval": self.poll_interval,
                                # whether the page must ask for an API key
                                "auth": {"required": not self.clients.allow_anonymous,
                                         "anonymous": self.clients.allow_anonymous}}
        if self.simulated:
            body["simulated"] = True  # the demo: the page shows a "simulated backend" banner
        self.write_json(body, 200 if ok else 503)


class WorkflowsHandler(SchedulerHandler):
    def get(self) -> None:
        """The workflows the pool serves (the workers' catalogues merged), each with whether some
        worker is ready for it and why not, for the page's form."""
        catalogue = self.placement.catalogue()
        if catalogue is None:
            raise APIError(503, "No worker has reported its workflows yet.", headers={"Retry-After": "2"})
        self.write_json(catalogue)


class StaticHandler(FileHandler):
    """The page: files under ``static_dir`` only; its errors are JSON like every other answer."""


default_handlers = [
    (r"/generate", GenerateHandler),
    (rf"/status/{PROMPT_ID}", StatusHandler),
    (rf"/result/{PROMPT_ID}", ResultHandler),
    (rf"/cancel/{PROMPT_ID}", CancelHandler),
    (r"/cancel", CancelAllHandler),
    (r"/jobs", JobsHandler),
    (r"/workers", WorkersHandler),
    (r"/health", HealthHandler),
    (r"/workflows", WorkflowsHandler),
]

__all__ = ["default_handlers", "MetricsHandler", "NotFoundHandler", "OpenAPIHandler", "StaticHandler"]
