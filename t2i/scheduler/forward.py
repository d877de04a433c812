"""Placing jobs on workers and asking a job's owner when the mirror cannot answer.

:class:`JobRouter` is what the handlers call: ``generate`` picks a worker
(retrying the next one when a worker refuses), the others forward a job
request to the worker that holds the job, or to every known worker when the
owner is unknown. Errors are :class:`t2i.web.APIError`, answered as JSON.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator
from urllib.parse import quote, urlencode

from t2i.httpclient import JSONResponse, UpstreamUnavailable, detached, fetch_json
from t2i.idempotency import HEADER as IDEMPOTENCY_HEADER
from t2i.idempotency import MAX_LENGTH as KEY_MAX_LENGTH
from t2i.idempotency import BadKey, check_key, fingerprint, prompt_id_for
from t2i.jobstate import result_of
from t2i.metrics import CLIENT_ACCEPTED, CLIENT_THROTTLED, SCHEDULER_ROUTED
from t2i.config import ClientsConfig
from t2i.scheduler.clients import HEADER as CLIENT_HEADER
from t2i.scheduler.clients import Clients, metric_label
from t2i.scheduler.mirror import Mirror
from t2i.scheduler.placement import NoWorkerAvailable, Placement
from t2i.scheduler.registry import Registry, WorkerState
from t2i.validation import ValidationError, validate_generate
from t2i.web import APIError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 2.0
GENERATE_TIMEOUT = 15.0     # the worker answers within ~12 s: 2 s for its websocket + 10 s for POST /prompt
JOB_TIMEOUT = 5.0           # status / result / cancel, plus the long-poll wait
ACCEPTING_POLL = 0.25       # a worker still accepting a job whose POST timed out is asked again this often ...
ACCEPTING_WAIT = 15.0       # ... for this long before the client is told to ask again (never a second run)
FORWARDED_WAIT_MAX = 5.0    # seconds a long-poll forwarded to a worker may wait there
RETRY_AFTER_BUSY = "2"      # no worker available: the page may try again soon
RETRY_AFTER_UNREADY = "10"  # no worker ready for the workflow: that takes ops a while
RETRY_AFTER_OWNER = "1"     # owner unreachable: the job is not lost, poll again
RETRY_AFTER_KEY = "1"       # the first request with this Idempotency-Key is still being placed
CANCEL_CONCURRENCY = 16     # POST /cancel (all of a client's jobs): cancels in flight at once

# A worker's answers to POST /generate that are the client's own (a mistake, or a key in use): passed on.
CLIENT_MISTAKES = frozenset({400, 409, 413, 422})

# Metric children per worker and per client label, resolved once each (labels() per job takes a lock and
# builds a tuple; the label sets are bounded: the pool's workers, the configured clients and "anonymous").
_ROUTED: dict[str, Any] = {}
_ACCEPTED: dict[str, Any] = {}


def _routed(worker: str) -> Any:
    child = _ROUTED.get(worker)
    if child is None:
        child = _ROUTED[worker] = SCHEDULER_ROUTED.labels(worker=worker)
    return child


def _accepted(client: str) -> Any:
    label = metric_label(client)
    child = _ACCEPTED.get(label)
    if child is None:
        child = _ACCEPTED[label] = CLIENT_ACCEPTED.labels(label)
    return child


# What a worker may answer per route; anything else means the worker misbehaved (502).
PASS_THROUGH = {
    "status": {200, 404, 409, 410},       # 409: the worker is still accepting that job (POST under way)
    "result": {200, 202, 404, 409, 410},
    "cancel": {200, 404, 409, 410},
}


@dataclass
class Reply:
    """An answer to pass on as it is: status code and JSON body."""

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Refusal:
    """A worker could not take the job (it is marked so); try the next one."""

    reason: str
    rejected: Reply | None = None   # ComfyUI refused the template there: the answer, if every worker does


class JobRouter:
    """generate / status / result / cancel across the pool."""

    def __init__(self, registry: Registry, mirror: Mirror, placement: Placement, *, client=None,
                 auth_token: str | None = None, clients: Clients | None = None):
        self.registry = registry
        self.mirror = mirror
        self.placement = placement
        self.client = client
        self.auth_token = auth_token
        self.clients = clients or Clients(ClientsConfig(), mirror.clients)
        self.closing = False
        self._placing: dict[str, str] = {}   # scoped Idempotency-Key -> body fingerprint, while placed here

    # --- POST /generate -----------------------------------------------------

    async def generate(self, body: Any, key: str | None = None, client: str = "", body_bytes: bytes | None = None) -> Reply:
        """Place a job for ``client``. With an Idempotency-Key, the key's job if there is one (same body),
        else a new one whose id is derived from the key (scoped to the client); without, a new one under a
        key of our own. Either way the worker gets a key, so the job's id is known before it answers (see
        :meth:`_submit`). A client holding ``max_jobs`` unfinished jobs gets 429 (its key's job excepted).
        ``body_bytes``: ``body`` as the client sent it, which is what the worker gets."""
        if key is not None:
            try:
                check_key(key)
            except BadKey as exc:
                raise APIError(400, str(exc), header=IDEMPOTENCY_HEADER) from None
        try:
            validate_generate(body, self.placement.specs())
        except ValidationError as exc:
            raise APIError(400, str(exc), field=exc.field) from None
        if key is None:
            with self._room(client):
                return await self._place(body, f"t2i-{uuid.uuid4().hex}", client=client, body_bytes=body_bytes)
        scoped = worker_key(client, key)
        digest = fingerprint(body)
        placing = self._placing.get(scoped)
        if placing is not None:
            raise self._key_conflict(placing != digest, prompt_id_for(scoped))
        self._placing[scoped] = digest
        try:
            # The key's job, held now (mirrored, or placed here lately), is no new job: no 429 for it.
            prompt_id = prompt_id_for(scoped)
            held = self.mirror.get(prompt_id) is not None or self.mirror.clients.client_of(prompt_id) == client
            with self._room(client, known=held):
                return await self._place(body, scoped, known=True, client=client, body_bytes=body_bytes)
        finally:
            del self._placing[scoped]

    @contextmanager
    def _room(self, client: str, known: bool = False) -> Iterator[None]:
        """The fair share: 429 when ``client`` is at ``max_jobs`` (not for a job it has already: ``known``);
        otherwise the job counts for the client while it is placed."""
        if not client:
            yield
            return
        if not known:
            try:
                self.clients.check_room(client, self.mirror.holds_jobs)
            except APIError:
                CLIENT_THROTTLED.labels(metric_label(client)).inc()
                log.info("client %s is at its max_jobs (%d); 429", client, self.clients.max_jobs)
                raise
        with self.mirror.clients.placing(client):
            yield

    @staticmethod
    def _key_conflict(other_body: bool, prompt_id: str) -> APIError:
        if other_body:
            return APIError(422, f"This {IDEMPOTENCY_HEADER} was used for another request (job {prompt_id}).",
                            prompt_id=prompt_id)
        return APIError(409, f"A request with this {IDEMPOTENCY_HEADER} is still being placed (job {prompt_id}); "
                        "ask again in a moment.", prompt_id=prompt_id, headers={"Retry-After": RETRY_AFTER_KEY})

    async def _place(self, body: Any, key: str, known: bool = False, client: str = "",
                     body_bytes: bytes | None = None) -> Reply:
        """Try the workers in placement's order until one takes the job. ``known``: the key may have a
        job already (a client's key): its holder answers for it, wherever it is."""
        prompt_id = prompt_id_for(key)
        workflow = body.get("workflow")
        tried: list[str] = []
        refusals: list[Refusal] = []
        steps = self.placement.steps_of(body)
        holder = await self.holder(prompt_id) if known else None
        while True:
            holds = holder is not None
            if holder is not None:
                state, holder = holder, None  # the key's job is there: the worker answers for it
            else:
                try:
                    state = self.placement.choose(workflow, exclude=tried, steps=steps)
                except NoWorkerAvailable as exc:
                    raise self._none_took_it(exc, refusals) from None
            tried.append(state.name)
            outcome = await self._submit(state, body, key, prompt_id, steps, holds=holds, client=client, body_bytes=body_bytes)
            if isinstance(outcome, Reply):
                return outcome
            refusals.append(outcome)
            log.warning("worker %s refused job %s (%s); trying the next one", state.name, prompt_id, outcome.reason)

    async def holder(self, prompt_id: str) -> WorkerState | None:
        """The worker that holds a job, from the mirror, or asked of the workers whose feeds are down
        (those known unreachable are not asked); 503 when one that may hold it cannot say."""
        owner = self.mirror.owner(prompt_id)
        state = self.registry.workers.get(owner) if owner else None
        if state is not None:
            return state
        unsure = [self.registry.workers[name] for name in self.mirror.feeds_down(self.registry.workers)
                  if self.registry.workers[name].reachable is not False]
        if not unsure:
            return None
        path = f"/status/{quote(prompt_id, safe='')}"
        outcomes = await asyncio.gather(*(self._ask(s, "status", path, "GET", 0) for s in unsure))
        for state, outcome in zip(unsure, outcomes):
            if isinstance(outcome, Reply) and outcome.status == 200:
                return state
        failed = [s.name for s, o in zip(unsure, outcomes) if not isinstance(o, Reply)]
        if failed:
            raise APIError(503, f"Cannot tell yet whether {', '.join(failed)} already holds the job of this "
                           f"{IDEMPOTENCY_HEADER} (not reachable now); ask again shortly.",
                           headers={"Retry-After": RETRY_AFTER_OWNER})
        return None

    @staticmethod
    def _none_took_it(exc: NoWorkerAvailable, refusals: list[Refusal]) -> Exception:
        """The answer when no (further) worker can take the job."""
        if refusals and not exc.others and all(r.rejected is not None for r in refusals):
            # Every ready worker's ComfyUI rejected the template: pass its words on (502).
            rejected = refusals[-1].rejected
            return APIError(rejected.status, rejected.body.get("error") or "ComfyUI rejected the workflow.",
                            **{k: v for k, v in rejected.body.items() if k != "error"})
        message = str(exc)
        if refusals:
            message = ("No worker could take the job: " + "; ".join(r.reason for r in refusals) + "."
                       + (f" {message}" if exc.others else ""))
        # Every queue full: when placement expects the first place to free up; else the defaults.
        retry = str(exc.retry_after) if exc.retry_after else RETRY_AFTER_BUSY if exc.ready else RETRY_AFTER_UNREADY
        return APIError(503, message, headers={"Retry-After": retry})

    async def _submit(self, state: WorkerState, body: Any, key: str, prompt_id: str, steps: int,
                      holds: bool = False, client: str = "", body_bytes: bytes | None = None) -> Reply | Refusal:
        """The worker's answer to pass on, or why it refused (it is then marked).

        A POST that may have arrived but got no answer (a timeout, a reset) is not simply tried
        elsewhere: the worker is asked for the job first (it holds it from before it submits to
        ComfyUI), and the job goes to another worker only when that worker says it does not hold it.
        ``holds``: the worker is known to hold the key's job; when it cannot be reached, 503.
        ``steps``: the job's sampler steps, counted as the worker's load while the POST is on its way.
        """
        state.in_flight += 1
        state.in_flight_steps += steps
        headers = {IDEMPOTENCY_HEADER: key, **({CLIENT_HEADER: client} if client else {})}
        try:
            response = await fetch_json(state.url + "/generate", "POST", body, token=self.auth_token,
                                        client=self.client, headers=headers, body_bytes=body_bytes,
                                        connect_timeout=CONNECT_TIMEOUT, request_timeout=GENERATE_TIMEOUT)
        except UpstreamUnavailable as exc:
            if holds:
                raise APIError(503, f"Worker {state.name} holds the job of this {IDEMPOTENCY_HEADER} ({prompt_id}) "
                               f"and cannot be reached now ({exc}); ask again shortly.",
                               headers={"Retry-After": RETRY_AFTER_OWNER}, prompt_id=prompt_id) from None
            if exc.unsent:
                reason = f"is unreachable ({exc})"
                state.mark_down(f"POST /generate failed: {exc}", unreachable=True)
                self.mirror.suspect(state.name, reason)
                return Refusal(f"{state.name} {reason}")
            return await self._after_no_answer(state, prompt_id, exc, steps, client)
        finally:
            state.in_flight -= 1
            state.in_flight_steps -= steps
        return self._answer(state, body, response, steps, client)

    async def _after_no_answer(self, state: WorkerState, prompt_id: str, error: Exception, steps: int,
                               client: str = "") -> Reply | Refusal:
        """A POST /generate sent to ``state`` got no answer: does it hold the job?"""
        log.warning("POST /generate of job %s to worker %s got no answer (%s); asking it for the job",
                    prompt_id, state.name, error)
        path = f"/status/{quote(prompt_id, safe='')}"
        outcome = await self._ask(state, "status", path, "GET", 0)
        # 409: the POST is still under way there (its ComfyUI slow to connect, an input image uploading):
        # the job may yet be created, so it is neither placed elsewhere nor given up on at once.
        deadline = asyncio.get_running_loop().time() + ACCEPTING_WAIT
        while isinstance(outcome, Reply) and outcome.status == 409 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(ACCEPTING_POLL)
            outcome = await self._ask(state, "status", path, "GET", 0)
        if isinstance(outcome, Reply) and outcome.status == 200:
            log.info("worker %s holds job %s after all", state.name, prompt_id)
            return self._placed(state, {"prompt_id": prompt_id, "worker": state.name,
                                        "status_url": f"/status/{prompt_id}", "result_url": f"/result/{prompt_id}"},
                                steps, client)
        if isinstance(outcome, Reply) and outcome.status in (404, 410):
            state.mark_down(f"POST /generate got no answer: {error}")
            return Refusal(f"{state.name} did not answer ({error})")
        state.mark_down(f"POST /generate got no answer: {error}")
        raise APIError(503, f"Worker {state.name} did not answer in time and cannot say yet whether it took "
                       f"job {prompt_id}; it is not sent to another worker, so it cannot run twice. Ask again "
                       f"shortly (with the same {IDEMPOTENCY_HEADER}, the same job is answered).",
                       headers={"Retry-After": RETRY_AFTER_OWNER}, prompt_id=prompt_id)

    def _placed(self, state: WorkerState, answer: dict[str, Any], steps: int, client: str = "") -> Reply:
        self.mirror.note_submitted(answer["prompt_id"], state.name, steps)
        _routed(state.name).inc()
        if client and not answer.get("duplicate"):
            self.mirror.clients.placed(answer["prompt_id"], client)
            _accepted(client).inc()
        log.info("placed job %s on worker %s for client %s", answer["prompt_id"], state.name, client or "-")
        return Reply(200, {**answer, "worker": state.name, "worker_url": state.entry.public_url})

    def _answer(self, state: WorkerState, body: Any, response: JSONResponse, steps: int,
                client: str = "") -> Reply | Refusal:
        """Pass a worker's answer on, or turn it into a refusal: a client's mistake (400, 413, 422, a
        raw workflow ComfyUI rejected) is the client's answer; the worker's own trouble is not."""
        answer = response.body
        status = response.status
        if status == 200 and isinstance(answer, dict) and isinstance(answer.get("prompt_id"), str):
            return self._placed(state, answer, steps, client)
        detail = answer.get("error") if isinstance(answer, dict) else None
        raw = isinstance(body.get("workflow"), dict)
        if detail and status in CLIENT_MISTAKES or (detail and status == 502 and raw):
            return Reply(status, answer, _retry_after(response))
        if detail and status == 502:
            why = f"its ComfyUI rejected the workflow: {detail}"
            self.placement.refused(state, body.get("workflow"), why)
            return Refusal(f"{state.name} {why}", rejected=Reply(status, answer))
        if detail and status == 503 and answer.get("queue_full"):
            # Its own queue is full (another scheduler, or clients of its own, filled it before our
            # mirror saw): not down, just not this job.
            return Refusal(f"{state.name} is full ({detail})")
        if detail and status == 503 and answer.get("workflow_not_ready"):
            self.placement.refused(state, body.get("workflow"), detail)
            return Refusal(f"{state.name} is not ready: {detail}")
        reason = f"answered {status}" + (f": {detail}" if detail else "")
        state.mark_down(f"POST /generate {reason}")
        return Refusal(f"{state.name} {reason}")

    # --- status, result, cancel ---------------------------------------------

    async def status(self, prompt_id: str, wait: float = 0, since: int | None = None) -> Reply:
        # A forwarded long-poll holds one of our client's connections for its whole wait; when a
        # worker's feed is down, every browser watching its jobs comes this way. Short waits keep
        # the client free for feeds, health checks and submissions (the page simply asks again).
        wait = min(wait, FORWARDED_WAIT_MAX)
        query = {"wait": f"{wait:g}", "since": since} if wait > 0 and since is not None else None
        return await self.ask_owner("status", prompt_id, query=query, wait=wait)

    def owner_url(self, prompt_id: str) -> str | None:
        """The public URL of the worker holding the job (clients reach workers directly for images:
        ``image_url``), while its feed is up; None when this scheduler does not know it, or cannot
        reach it now (then asking it here says so: 503 with Retry-After, not a refused connection)."""
        owner = self.mirror.owner(prompt_id)
        state = self.registry.workers.get(owner) if owner else None
        if state is None or not self.mirror.feed_up(state.name):
            return None
        return state.entry.public_url

    async def result(self, prompt_id: str) -> Reply:
        entry = self.mirror.fresh(prompt_id)
        if entry is not None:
            return Reply(*result_of(entry.status))
        return await self.ask_owner("result", prompt_id)

    async def cancel(self, prompt_id: str, client: str | None = None) -> Reply:
        """Cancel a job on its worker; with ``client``, only that client's job (another's is 404, as if unknown)."""
        if client is not None and await self.client_of(prompt_id) != client:
            raise APIError(404, f"No job {prompt_id} is known to any worker.")
        try:
            return await self.ask_owner("cancel", prompt_id, method="POST")
        except APIError:
            entry = self.mirror.get(prompt_id)
            if entry is not None and entry.final:
                return Reply(409, {"error": f"Job {prompt_id} has already ended ({entry.state}).",
                                   "status": entry.state})
            raise

    async def client_of(self, prompt_id: str) -> str | None:
        """Whose job this is: from the mirror, or the jobs placed here lately, else asked of its worker
        (404 or 503 raised as for /status when nobody can say)."""
        entry = self.mirror.get(prompt_id)
        if entry is not None:
            return entry.status.get("client")
        client = self.mirror.clients.client_of(prompt_id)
        if client is not None:
            return client
        reply = await self.status(prompt_id)
        return reply.body.get("client") if reply.status == 200 else None

    async def cancel_all(self, client: str) -> dict[str, Any]:
        """Cancel every unfinished job of ``client`` (``POST /cancel``): those cancelled, and those that
        could not be (a worker unreachable, say); jobs that ended meanwhile are neither."""
        ids = list(self.mirror.clients.unfinished(client)) + self.mirror.clients.recent(client)
        ids = list(dict.fromkeys(ids))
        gate = asyncio.Semaphore(CANCEL_CONCURRENCY)

        async def one(prompt_id: str) -> tuple[str, int, str | None]:
            async with gate:
                try:
                    reply = await self.cancel(prompt_id)
                except APIError as exc:
                    return prompt_id, exc.status_code, exc.message
                error = reply.body.get("error") if isinstance(reply.body, dict) else None
                return prompt_id, reply.status, error

        cancelled: list[str] = []
        failed: list[dict[str, str]] = []
        for prompt_id, status, error in await asyncio.gather(*(one(pid) for pid in ids)):
            if status == 200:
                cancelled.append(prompt_id)
            elif status not in (404, 409, 410):  # ended or gone meanwhile: nothing left to cancel
                failed.append({"prompt_id": prompt_id, "error": error or f"Its worker answered {status}."})
        log.info("client %s cancelled %d jobs (%d could not be)", client, len(cancelled), len(failed))
        return {"cancelled": len(cancelled), "prompt_ids": cancelled, "failed": failed}

    async def ask_owner(self, route: str, prompt_id: str, *, method: str = "GET",
                        query: dict[str, Any] | None = None, wait: float = 0) -> Reply:
        """Forward a job request to the job's worker. When the mirror does not know the job, only the
        workers whose feed is down may hold it unseen: those are asked; with every feed live, 404."""
        path = f"/{route}/{quote(prompt_id, safe='')}"
        if query:
            path += "?" + urlencode(query)
        owner = self.mirror.owner(prompt_id)
        state = self.registry.workers.get(owner) if owner else None
        if state is not None:
            outcome = await self._ask(state, route, path, method, wait)
            if isinstance(outcome, Reply):
                return outcome
            raise APIError(outcome[0], outcome[1], headers={"Retry-After": RETRY_AFTER_OWNER},
                           worker=state.name)
        unseen = self.mirror.feeds_down(self.registry.workers)
        if not unseen:
            raise APIError(404, f"No job {prompt_id} is known to any worker.")
        return await self._ask_all(route, prompt_id, path, method, wait,
                                   [self.registry.workers[name] for name in unseen])

    async def _ask(self, state: WorkerState, route: str, path: str, method: str,
                   wait: float) -> Reply | tuple[int, str]:
        """The worker's answer, or (503|502, why) when it cannot give one."""
        try:
            response: JSONResponse = await fetch_json(
                state.url + path, method, token=self.auth_token if method == "POST" else None,
                client=self.client, connect_timeout=CONNECT_TIMEOUT, request_timeout=JOB_TIMEOUT + wait)
        except UpstreamUnavailable as exc:
            return 503, (f"Worker {state.name} cannot be reached now ({exc}); "
                         "the job is not lost, ask again shortly.")
        if response.status in PASS_THROUGH[route] and isinstance(response.body, dict):
            return Reply(response.status, response.body)
        return 502, f"Worker {state.name} gave an unexpected answer to {method} /{route} ({response.status})."

    async def _ask_all(self, route: str, prompt_id: str, path: str, method: str, wait: float,
                       states: list[WorkerState]) -> Reply:
        """These workers at once; the first that knows the job wins."""
        if len(states) == 1:  # no tasks to spawn for a pool of one
            outcomes = [self._ask(states[0], route, path, method, wait)]
        else:
            # The slower answers are left to finish by themselves (bounded by their timeouts):
            # Tornado cannot abort a request, and cancelling its future only logs an error later.
            outcomes = asyncio.as_completed([detached(self._ask(state, route, path, method, wait))
                                             for state in states])
        gone = None
        failures: list[tuple[int, str]] = []
        for next_done in outcomes:
            outcome = await next_done
            if not isinstance(outcome, Reply):
                failures.append(outcome)
            elif outcome.status == 410:
                gone = outcome
            elif outcome.status != 404:
                return outcome
        if gone is not None:
            return gone
        if failures:
            status = 503 if any(code == 503 for code, _ in failures) else 502
            reasons = " ".join(why for _, why in failures)
            raise APIError(status, f"Job {prompt_id} is not on any worker that answered, and "
                           f"{len(failures)} could not be asked: {reasons}",
                           headers={"Retry-After": RETRY_AFTER_OWNER})
        raise APIError(404, f"No job {prompt_id} is known to any worker.")


def _retry_after(response: JSONResponse) -> dict[str, str]:
    value = {k.lower(): v for k, v in response.headers.items()}.get("retry-after")
    return {"Retry-After": value} if value else {}


def worker_key(client: str, key: str) -> str:
    """The Idempotency-Key the workers get for a client's key: scoped to the client's name (one client's
    key never finds another's job), hashed when that would be longer than a key may be."""
    scoped = f"{client}:{key}"
    if len(scoped) <= KEY_MAX_LENGTH:
        return scoped
    return "sha256:" + hashlib.sha256(scoped.encode()).hexdigest()
