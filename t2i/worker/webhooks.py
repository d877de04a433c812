"""Webhooks: a signed POST to the client's URL when its job ends (Standard Webhooks).

Headers ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature: v1,<base64 of
HMAC-SHA256(secret, "<id>.<timestamp>.<body>")>``; the body is
``{"type": "job.completed|job.failed|job.cancelled", "timestamp": …, "data": <the job's
/status>}``. The delivery state lives on the job (``job.webhook``) and goes to the
journal with every change, so a restart resumes pending deliveries. Timeouts, 5xx,
429 and connection errors are retried with :class:`~t2i.backoff.Backoff` up to
``webhooks.max_attempts`` times (hours, by default); another 4xx is final.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from datetime import datetime, timezone
from typing import Any, Callable

from tornado.httpclient import HTTPClientError, HTTPRequest

from t2i.backoff import Backoff
from t2i.config import WorkerConfig
from t2i.httpclient import fetch
from t2i.worker.jobs import Job, JobStore
from t2i.worker.journal import Journal

log = logging.getLogger(__name__)

WAITING, PENDING, DELIVERED, FAILED = "waiting", "pending", "delivered", "failed"
RETRY = Backoff(first=5.0, maximum=2 * 3600.0, factor=4.0, jitter=0.2)  # 5 s, 20 s, 80 s … 2 h


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value for one message."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def new_state(url: str) -> dict[str, Any]:
    """A job's webhook before its job ends."""
    return {"url": url, "state": WAITING, "attempts": 0, "last_error": None, "next_at": None}


def public(state: dict[str, Any] | None) -> dict[str, Any] | None:
    """What ``/status`` shows of it (not the URL: it may carry the client's own token)."""
    if not state:
        return None
    return {"state": state["state"], "attempts": state["attempts"], "last_error": state["last_error"]}


class Webhooks:
    """Sends the webhooks of one worker's jobs."""

    def __init__(self, config: WorkerConfig, store: JobStore, journal: Journal | None,
                 clock: Callable[[], float] = time.time, backoff: Backoff | None = None):
        self.config = config
        self.settings = config.webhooks
        self.store = store
        self.journal = journal
        self.clock = clock
        self.backoff = backoff or RETRY
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._sending: set[asyncio.Task] = set()

    def start(self) -> None:
        """Resume what the journal says is owed: deliveries pending, and jobs that ended unannounced."""
        for job in self.store.all():
            if job.webhook and job.finished and job.webhook["state"] in (WAITING, PENDING):
                self.job_ended(job)

    async def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in list(self._sending):
            task.cancel()
        await asyncio.gather(*self._sending, return_exceptions=True)

    def job_ended(self, job: Job) -> None:
        """The job reached its final state: its webhook is owed now (or when it was due)."""
        state = job.webhook
        if not state or state["state"] in (DELIVERED, FAILED):
            return
        if state["state"] == WAITING:
            state = self._save(job, state="pending", next_at=self.clock())
        self._schedule(job.prompt_id, max(0.0, (state["next_at"] or 0) - self.clock()))

    def _schedule(self, prompt_id: str, delay: float) -> None:
        old = self._timers.pop(prompt_id, None)
        if old is not None:
            old.cancel()
        self._timers[prompt_id] = asyncio.get_running_loop().call_later(delay, self._due, prompt_id)

    def _due(self, prompt_id: str) -> None:
        self._timers.pop(prompt_id, None)
        task = asyncio.ensure_future(self._deliver(prompt_id))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _deliver(self, prompt_id: str) -> None:
        job = self.store.get(prompt_id)
        if job is None or not job.webhook or job.webhook["state"] != PENDING:
            return  # pruned or settled meanwhile
        error = await self._post(job)
        attempts = job.webhook["attempts"] + 1
        if error is None:
            self._save(job, state=DELIVERED, attempts=attempts, last_error=None, next_at=None)
            log.info("job %s: webhook delivered (attempt %d)", prompt_id, attempts)
            return
        retry, message = error
        if not retry or attempts >= self.settings.max_attempts:
            self._save(job, state=FAILED, attempts=attempts, last_error=message, next_at=None)
            log.warning("job %s: webhook failed for good after %d attempt(s): %s", prompt_id, attempts, message)
            return
        delay = self.backoff.delay(attempts)
        self._save(job, attempts=attempts, last_error=message, next_at=self.clock() + delay)
        log.info("job %s: webhook attempt %d failed (%s); next in %.0f s", prompt_id, attempts, message, delay)
        self._schedule(prompt_id, delay)

    async def _post(self, job: Job) -> tuple[bool, str] | None:
        """None when delivered, else (worth retrying, why)."""
        status = job.status
        message_id = f"msg_{job.prompt_id}"
        timestamp = int(self.clock())
        payload = {"type": f"job.{status}",
                   "timestamp": datetime.fromtimestamp(timestamp, timezone.utc).isoformat().replace("+00:00", "Z"),
                   "data": job.to_json(self.config.public_url)}
        body = json.dumps(payload, separators=(",", ":")).encode()
        request = HTTPRequest(job.webhook["url"], "POST", body=body, follow_redirects=False,
                              connect_timeout=self.settings.timeout, request_timeout=self.settings.timeout,
                              headers={"Content-Type": "application/json", "webhook-id": message_id,
                                       "webhook-timestamp": str(timestamp),
                                       "webhook-signature": sign(self.settings.key, message_id, timestamp, body)})
        try:
            response = await fetch(request)
        except (HTTPClientError, OSError) as exc:
            return True, f"cannot reach {request.url}: {exc}"
        code = response.code
        if 200 <= code < 300:
            return None
        if code == 599:
            return True, f"cannot reach {request.url}: {response.error}"
        return code >= 500 or code in (408, 429), f"{request.url} answered HTTP {code}"

    def _save(self, job: Job, **changes: Any) -> dict[str, Any]:
        state = {**job.webhook, **changes}
        new = self.store.update(job.prompt_id, webhook=state)
        if new is not None and self.journal is not None:
            self.journal.save(new)
        return state
