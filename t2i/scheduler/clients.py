"""The scheduler's clients: who is asking, and what each client holds.

:class:`Clients` tells a request's client from its ``Authorization: Bearer <key>`` (scheduler.yaml
``clients.keys``, or ``clients.keys_file`` reloaded on edit and SIGHUP), or names an anonymous one
after its address (``anon:<address>``) where ``allow_anonymous`` lets it. Keys are looked up by their
digest and confirmed with ``hmac.compare_digest``; a key is never logged or shown, only its client's
name, which jobs (``T2I-Client`` to the worker, ``client`` in ``/status``), logs and metrics carry.

:class:`ClientIndex` is the mirror's index of jobs by client (the mirror calls ``put``/``forget``):
unfinished jobs for the fair share (``max_jobs`` each, counted from the workers' feeds, so every
replica enforces the same limit, plus jobs this replica placed that no feed has shown yet), and
every job for ``GET /jobs``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from tornado import web

from t2i.config import ClientsConfig, ConfigError, load_keys_file
from t2i.jobstate import UNFINISHED
from t2i.metrics import CONFIG_RELOADS
from t2i.web import APIError, bearer_token

log = logging.getLogger(__name__)

HEADER = "T2I-Client"           # the client's name, scheduler -> worker on POST /generate
ANONYMOUS = "anon:"             # anonymous clients are "anon:<address>"
RECENT_TTL = 30.0               # a job placed here counts for its client this long before a feed shows it
RECENT_LIMIT = 10000
RETRY_AFTER_CAP = "2"           # 429: a client's job ends, or a page asks again, in about this long
LIST_LIMIT, LIST_MAX = 50, 500  # GET /jobs ?limit= default and maximum
STATUSES = ("pending", "running", "completed", "failed", "cancelled")


def metric_label(client: str) -> str:
    """The ``client`` label of metrics: the name, or ``anonymous`` for all anonymous clients (an address
    each would make the series unbounded)."""
    return "anonymous" if client.startswith(ANONYMOUS) else client


class ClientIndex:
    """Jobs by client, kept by the mirror from the ``client`` of each job's status."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._client_of: dict[str, str] = {}                    # prompt_id -> client
        self._jobs: dict[str, dict[str, float]] = {}            # client -> prompt_id -> created_at
        self._unfinished: dict[str, dict[str, str]] = {}        # client -> prompt_id -> worker
        # Placed by this scheduler, not yet in the mirror: client -> prompt_id -> placed at (monotonic).
        self._recent: dict[str, OrderedDict[str, float]] = {}
        self._recent_client: OrderedDict[str, str] = OrderedDict()
        self._placing: dict[str, int] = {}                      # client -> POST /generate on its way

    # --- fed by the mirror --------------------------------------------------------

    def put(self, prompt_id: str, worker: str, status: dict[str, Any]) -> None:
        """A job's new state, from ``worker``'s feed."""
        client = status.get("client")
        if self._client_of.get(prompt_id) not in (None, client):
            self.forget(prompt_id)
        self._unrecent(prompt_id)
        if not isinstance(client, str) or not client:
            return  # submitted to the worker directly (or by a scheduler before clients): nobody's
        self._client_of[prompt_id] = client
        created = status.get("created_at")
        self._jobs.setdefault(client, {})[prompt_id] = created if isinstance(created, (int, float)) else 0.0
        if status.get("status") in UNFINISHED:
            self._unfinished.setdefault(client, {})[prompt_id] = worker
        else:
            self._drop_unfinished(client, prompt_id)

    def forget(self, prompt_id: str) -> None:
        """The job left the mirror (removed by its worker, or its worker dropped)."""
        client = self._client_of.pop(prompt_id, None)
        if client is None:
            return
        jobs = self._jobs.get(client)
        if jobs is not None:
            jobs.pop(prompt_id, None)
            if not jobs:
                del self._jobs[client]
        self._drop_unfinished(client, prompt_id)

    def _drop_unfinished(self, client: str, prompt_id: str) -> None:
        unfinished = self._unfinished.get(client)
        if unfinished is not None and unfinished.pop(prompt_id, None) is not None and not unfinished:
            del self._unfinished[client]

    # --- fed by the router --------------------------------------------------------

    def placed(self, prompt_id: str, client: str) -> None:
        """This scheduler placed a job for ``client``: it counts until a feed shows it (or RECENT_TTL)."""
        if prompt_id in self._client_of or not client:
            return
        self._recent.setdefault(client, OrderedDict())[prompt_id] = self.clock()
        self._recent_client[prompt_id] = client
        while len(self._recent_client) > RECENT_LIMIT:
            self._unrecent(next(iter(self._recent_client)))

    def _unrecent(self, prompt_id: str) -> None:
        client = self._recent_client.pop(prompt_id, None)
        if client is not None:
            recent = self._recent.get(client)
            if recent is not None:
                recent.pop(prompt_id, None)
                if not recent:
                    del self._recent[client]

    @contextmanager
    def placing(self, client: str) -> Iterator[None]:
        """While a job of ``client`` is being placed, it counts (a burst of parallel requests is capped too)."""
        self._placing[client] = self._placing.get(client, 0) + 1
        try:
            yield
        finally:
            left = self._placing[client] - 1
            if left:
                self._placing[client] = left
            else:
                del self._placing[client]

    # --- reading ------------------------------------------------------------------

    def client_of(self, prompt_id: str) -> str | None:
        return self._client_of.get(prompt_id) or self._recent_client.get(prompt_id)

    def recent(self, client: str) -> list[str]:
        """Jobs this scheduler placed for ``client`` lately that no feed has shown yet."""
        recent = self._recent.get(client)
        if not recent:
            return []
        cutoff = self.clock() - RECENT_TTL
        while recent and next(iter(recent.values())) < cutoff:
            self._unrecent(next(iter(recent)))
        return list(recent)

    def unfinished(self, client: str) -> dict[str, str]:
        """The client's unfinished jobs in the mirror: prompt_id -> worker."""
        return dict(self._unfinished.get(client, ()))

    def held(self, client: str, live: Callable[[str], bool] = lambda worker: True) -> int:
        """Unfinished jobs ``client`` holds: in the mirror on workers ``live`` says still hold them (see
        Mirror.holds_jobs: a worker that stays down does not lock its clients out), placed here lately,
        and being placed now."""
        mirrored = sum(1 for worker in self._unfinished.get(client, {}).values() if live(worker))
        return mirrored + len(self.recent(client)) + self._placing.get(client, 0)

    def jobs(self, client: str) -> dict[str, float]:
        """The client's jobs in the mirror: prompt_id -> created_at."""
        return self._jobs.get(client, {})

    def clients(self) -> list[str]:
        return list(set(self._unfinished) | set(self._recent) | set(self._placing))


class Clients:
    """Who a request comes from, and whether that client may place another job."""

    def __init__(self, config: ClientsConfig, index: ClientIndex):
        self.allow_anonymous = config.allow_anonymous
        self.max_jobs = config.max_jobs
        self.keys_file = config.keys_file
        self.index = index
        self.error: str | None = None   # the last keys-file reload error, if any
        self._by_digest: dict[bytes, tuple[str, bytes]] = {}
        self._signature: tuple[int, int] | None = None
        self._digest: str | None = None
        self._use(config.keys)
        if self.keys_file is not None:
            self._remember_file()

    # --- keys ---------------------------------------------------------------------

    def _use(self, keys: dict[str, str]) -> None:
        self._by_digest = {hashlib.sha256(key.encode()).digest(): (name, key.encode()) for name, key in keys.items()}

    @property
    def names(self) -> list[str]:
        return sorted(name for name, _ in self._by_digest.values())

    def identify(self, handler: web.RequestHandler) -> str:
        """The request's client name; 401 for a wrong key, or for none where anonymous clients are not allowed."""
        token = bearer_token(handler)
        if token:
            presented = token.encode()
            # Found by its digest (no timing to learn a key from), confirmed in constant time.
            found = self._by_digest.get(hashlib.sha256(presented).digest())
            if found is not None and hmac.compare_digest(found[1], presented):
                return found[0]
            raise APIError(401, "This API key is not valid: check the key, or ask for a new one.",
                           headers={"WWW-Authenticate": "Bearer"})
        if not self.allow_anonymous:
            raise APIError(401, "This scheduler needs an API key: send `Authorization: Bearer <key>`.",
                           headers={"WWW-Authenticate": "Bearer"})
        return ANONYMOUS + (handler.request.remote_ip or "unknown")

    def _remember_file(self) -> None:
        assert self.keys_file is not None
        st = os.stat(self.keys_file)
        self._signature = (st.st_mtime_ns, st.st_size)
        self._digest = hashlib.sha256(self.keys_file.read_bytes()).hexdigest()

    def reload_if_changed(self, force: bool = False) -> bool | None:
        """Apply an edited keys_file (like workers.yaml: mtime, size and content; ``force`` on SIGHUP).
        True: applied, False: refused (the last good keys stay), None: unchanged or no file."""
        path = self.keys_file
        if path is None:
            return None
        try:
            st = os.stat(path)
            signature = (st.st_mtime_ns, st.st_size)
            if signature == self._signature and not force:
                return None
            data = path.read_bytes()
        except OSError as exc:
            return self._refuse(ConfigError(path, f"cannot read: {exc.strerror or exc}"), "unreadable")
        self._signature = signature
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._digest:
            return None
        try:
            keys = load_keys_file(path)
        except ConfigError as exc:
            return self._refuse(exc, digest)
        self._digest = digest
        self._use(keys)
        self.error = None
        CONFIG_RELOADS.labels(result="ok").inc()
        log.info("%s reloaded: %d client keys (%s)", path, len(keys), ", ".join(sorted(keys)) or "none")
        return True

    def _refuse(self, exc: ConfigError, digest: str) -> bool | None:
        if digest == self._digest:
            return None  # reported already
        self._digest = digest
        if digest == "unreadable":
            self._signature = None
        self.error = str(exc)
        CONFIG_RELOADS.labels(result="failed").inc()
        log.error("client keys not reloaded, keeping the last good keys: %s", exc)
        return False

    # --- the fair share -----------------------------------------------------------

    def check_room(self, client: str, live: Callable[[str], bool]) -> None:
        """429 when ``client`` holds ``max_jobs`` unfinished jobs already."""
        held = self.index.held(client, live)
        if held >= self.max_jobs:
            raise APIError(429, f"You have {held} unfinished jobs, as many as one client may hold "
                                f"({self.max_jobs}); submit again when one of them ends.",
                           headers={"Retry-After": RETRY_AFTER_CAP}, max_jobs=self.max_jobs, unfinished=held)


# --- GET /jobs --------------------------------------------------------------------

def encode_cursor(created_at: float, prompt_id: str) -> str:
    raw = json.dumps([created_at, prompt_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """(created_at, prompt_id) of a ``before`` cursor; ValueError when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, prompt_id = json.loads(raw)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise ValueError(cursor) from None
    if not isinstance(created_at, (int, float)) or isinstance(created_at, bool) or not isinstance(prompt_id, str):
        raise ValueError(cursor)
    return float(created_at), prompt_id


def parse_statuses(value: str | None) -> frozenset[str] | None:
    """``?status=pending,running`` -> the set; ValueError naming an unknown one."""
    if value is None:
        return None
    wanted = frozenset(part.strip() for part in value.split(",") if part.strip())
    unknown = sorted(wanted - set(STATUSES))
    if unknown or not wanted:
        raise ValueError(", ".join(unknown) or "(none)")
    return wanted


def list_jobs(mirror: Any, client: str, limit: int = LIST_LIMIT, statuses: frozenset[str] | None = None,
              before: tuple[float, str] | None = None) -> tuple[list[Any], str | None]:
    """The client's jobs in the mirror, newest first (created_at, then id): at most ``limit`` mirror
    entries after the ``before`` cursor, and the cursor of the next page (None on the last)."""
    order = sorted(((created, prompt_id) for prompt_id, created in mirror.clients.jobs(client).items()),
                   reverse=True)
    page: list[Any] = []
    last: tuple[float, str] | None = None
    for key in order:
        if before is not None and key >= before:
            continue
        entry = mirror.get(key[1])
        if entry is None or statuses is not None and entry.state not in statuses:
            continue
        if len(page) == limit:
            return page, encode_cursor(*last)
        page.append(entry)
        last = key
    return page, None


__all__ = ["ANONYMOUS", "HEADER", "ClientIndex", "Clients", "decode_cursor", "encode_cursor", "list_jobs",
           "metric_label", "parse_statuses"]
