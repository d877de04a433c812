"""A live copy of every worker's jobs, fed by the workers' ``GET /jobs`` change feeds.

One follower coroutine per worker lists its jobs (``since=0``), then long-polls
for changes (``since=<seq>&wait=25``). The mirror answers ``/status`` from
memory while a job's feed is up (or the job is finished), wakes long-polls of
``/status?wait=`` when a job changes, and counts each worker's unfinished jobs
for routing. Nothing here is the truth: it is rebuilt from the workers after a
restart, and a second scheduler builds the same copy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Iterable
from urllib.parse import urlencode

from t2i.httpclient import UpstreamUnavailable, fetch_json
from t2i.jobstate import COMPLETED, FAILED, FINISHED, UNFINISHED
from t2i.scheduler.clients import ClientIndex
from t2i.scheduler.feedreader import read_feed
from t2i.waiters import Waiters, done_within

log = logging.getLogger(__name__)

ENDINGS = frozenset({COMPLETED, FAILED})   # outcomes that say whether a worker can run a workflow


FEED_WAIT = 25.0            # seconds a feed request waits for changes on the worker
FEED_CONNECT_TIMEOUT = 2.0
FEED_SLACK = 10.0           # request_timeout = wait + slack
STREAM_TYPE = "application/x-ndjson"   # a streamed feed (GET /jobs?stream=1)
# The most a feed answer may hold unread: a plain page, or one streamed line (a job is about 1 KB). Tornado's
# client refused bodies over 100 MB; the feed reader keeps the same bound on what piles up.
MAX_UNREAD_BYTES = 100 * 1024 * 1024
FEED_PAGE = 500             # jobs per feed answer: a worker holding 20,000 is listed in 40 small pages
BACKOFF_MIN, BACKOFF_MAX = 0.2, 5.0
RECENT_LIMIT = 10000        # jobs this scheduler submitted that the mirror has not seen yet
RECENT_LOAD_TTL = 30.0      # ... counted as load on their worker for at most this long
OUTCOMES_LIMIT = 10000      # job endings seen live, until placement reads them
SHARE_GRACE = 60.0          # a feed down this briefly (a health check timed out) still counts its jobs as held
GONE_LIMIT = 100_000        # ids workers removed (pruned, refused), remembered to ask their worker (410)


_SHARED_STATES = {state: state for state in UNFINISHED | FINISHED}


class Entry:
    """One mirrored job: its worker, its status object as JSON bytes (``/status`` answers them as they are)
    and the few fields routing reads. The object itself is decoded only when asked for (``status``):
    20,000 mirrored jobs are 20,000 byte strings, not 20,000 dicts of a dozen and more objects each."""

    __slots__ = ("worker", "_json", "version", "state", "steps", "steps_done")

    def __init__(self, worker: str, status: dict[str, Any], encoded: bytes | None = None):
        self.worker = worker
        self._json = encoded if encoded is not None else json.dumps(status, separators=(",", ":")).encode()
        version = status.get("version")
        self.version = version if type(version) is int else 0
        state = status.get("status")
        self.state = _SHARED_STATES.get(state, state) if type(state) is str else state  # one copy of each word
        # Sampler steps asked for and run (placement weighs unfinished jobs by what is left).
        progress = status.get("progress")
        progress = progress if isinstance(progress, dict) else {}
        steps = status.get("steps") or progress.get("max")
        self.steps = steps if type(steps) is int else None
        done = progress.get("value")
        self.steps_done = done if type(done) is int else 0

    @property
    def final(self) -> bool:
        return self.state in FINISHED

    @property
    def status(self) -> dict[str, Any]:
        """The status object (decoded anew at each call: a reader may change its copy)."""
        return json.loads(self._json)

    def encoded(self) -> bytes:
        return self._json


class StreamEnd(Exception):
    """Stop reading a streamed feed (raised by a line): ``error`` (None: list the worker's jobs again)."""

    def __init__(self, error: str | None):
        super().__init__(error)
        self.error = error


class FeedStream:
    """What one streamed ``GET /jobs?stream=1`` answer delivers, fed by t2i.scheduler.feedreader as it arrives."""

    __slots__ = ("mirror", "feed", "code", "ndjson", "rest", "batch", "plain", "unread", "streamed", "ended")

    def __init__(self, mirror: "Mirror", feed: "Feed"):
        self.mirror = mirror
        self.feed = feed
        self.code: int | None = None
        self.ndjson = False        # the worker streams (else: a plain page, or an error)
        self.rest = b""            # a line cut between two chunks
        self.batch: list[tuple[dict[str, Any], bytes]] = []   # job lines until their mark
        self.plain: list[bytes] = []
        self.unread = 0            # bytes in plain
        self.streamed = False      # a mark was applied
        # Done (with StreamEnd's error) when the follower is done with it: what still comes is ignored.
        self.ended: asyncio.Future = asyncio.get_running_loop().create_future()

    def head(self, code: int, content_type: str) -> None:
        self.code = code
        self.ndjson = code == 200 and content_type.lower().startswith(STREAM_TYPE)

    def data(self, chunk: bytes) -> None:
        if self.ended.done():
            return
        if not self.ndjson:
            self.plain.append(chunk)
            self.unread += len(chunk)
            if self.unread > MAX_UNREAD_BYTES:
                self._stop(f"GET /jobs answered more than {MAX_UNREAD_BYTES // 2 ** 20} MB")
            return
        lines = (self.rest + chunk if self.rest else chunk).split(b"\n")
        self.rest = lines.pop()
        try:
            for line in lines:
                if line:
                    self.mirror._take_line(self.feed, self, line)
        except StreamEnd as end:
            self._stop(end.error)
            return
        if len(self.rest) > MAX_UNREAD_BYTES:
            self._stop(f"GET /jobs streamed a line of more than {MAX_UNREAD_BYTES // 2 ** 20} MB")

    def _stop(self, error: str | None) -> None:
        """Read no more of it: ``error`` is the follower's (None: list the worker's jobs again)."""
        self.ended.set_result(error)


class Listing:
    """A full listing of a worker's jobs being read page by page (``since`` fixed, ``after`` moving)."""

    __slots__ = ("since", "epoch", "first_seq", "after", "keep")

    def __init__(self, since: int, epoch: Any, first_seq: int) -> None:
        self.since = since
        self.epoch = epoch
        self.first_seq = first_seq   # where the changes go on from once the listing is done
        self.after = 0
        self.keep: set[str] = set()


class Feed:
    """The follower of one worker's ``GET /jobs`` feed."""

    def __init__(self, name: str, url: Callable[[], str]):
        self.name = name
        self.url = url
        self.up = False
        self.epoch: str | None = None
        self.seq = 0
        self.listing: Listing | None = None
        self.more = False               # the last page of changes said there are more: ask at once
        self.last_error: str | None = None
        self.last_ok: float | None = None
        self.down_at: float | None = None  # when it last went from up to down
        self.task: asyncio.Task | None = None
        self.wake = asyncio.Event()
        self.tried = asyncio.Event()    # set once the first listing was tried (start-up waits on it)

    def to_json(self) -> dict[str, Any]:
        state = "up" if self.up else ("stopped" if self.task is None or self.task.done() else "down")
        return {"state": state, "epoch": self.epoch, "seq": self.seq, "last_error": self.last_error,
                "last_ok": self.last_ok}


class Mirror:
    """prompt_id -> (worker, status object), per-worker feeds, and long-poll waits."""

    def __init__(self, *, client=None, auth_token: str | None = None, feed_wait: float = FEED_WAIT,
                 page_size: int | None = None, stream: bool = True, clock: Callable[[], float] = time.time):
        self.client = client
        self.auth_token = auth_token
        self.feed_wait = feed_wait
        self.page_size = page_size or FEED_PAGE
        self.stream = stream  # once listed, follow each feed as a stream (GET /jobs?stream=1)
        self.clock = clock
        self._jobs: dict[str, Entry] = {}
        # worker -> its job ids (a dict as an ordered set: a third of a set's bytes at 20,000 ids)
        self._ids: dict[str, dict[str, None]] = {}
        self._unfinished: dict[str, dict[str, str]] = {}    # worker -> id -> pending|running
        self._feeds: dict[str, Feed] = {}
        self._waiters = Waiters()
        # Jobs this scheduler submitted that no feed has shown yet: id -> worker, and per worker
        # id -> (submit time, sampler steps) (for load counting, which forgets them after RECENT_LOAD_TTL).
        self._recent: OrderedDict[str, str] = OrderedDict()
        self._recent_by_worker: dict[str, OrderedDict[str, tuple[float, int]]] = {}
        # Jobs seen ending (completed or failed) as it happened, not in a listing of old jobs:
        # (worker, workflow, status), read by placement's breakers with take_outcomes().
        self._outcomes: deque[tuple[str, Any, str]] = deque(maxlen=OUTCOMES_LIMIT)
        # Jobs a feed said were removed: id -> worker, newest last (that worker answers 410 for them).
        self._gone: OrderedDict[str, str] = OrderedDict()
        self.clients = ClientIndex()  # jobs by client: the fair share, GET /jobs, POST /cancel

    # --- reading (no awaits: the /status fast path) ---------------------------

    def __len__(self) -> int:
        return len(self._jobs)

    def get(self, prompt_id: str) -> Entry | None:
        return self._jobs.get(prompt_id)

    def fresh(self, prompt_id: str) -> Entry | None:
        """The mirrored job when it can be answered from memory: its feed is up, or it is finished."""
        entry = self._jobs.get(prompt_id)
        if entry is None:
            return None
        if entry.final:
            return entry
        feed = self._feeds.get(entry.worker)
        return entry if feed is not None and feed.up else None

    def owner(self, prompt_id: str) -> str | None:
        """The worker holding a job: the mirror's, the one this scheduler just sent it to, or the
        one whose feed said it removed it."""
        entry = self._jobs.get(prompt_id)
        if entry is not None:
            return entry.worker
        return self._recent.get(prompt_id) or self._gone.get(prompt_id)

    def feeds_down(self, workers: Iterable[str]) -> list[str]:
        """Of ``workers``, those whose feed is not up: their jobs may be missing from the mirror."""
        return [name for name in workers if not self.feed_up(name)]

    def counts(self, worker: str) -> tuple[int, int]:
        """(pending, running) of a worker's jobs in the mirror."""
        pending = running = 0
        for status in self._unfinished.get(worker, {}).values():
            if status == "running":
                running += 1
            else:
                pending += 1
        return pending, running

    def unfinished(self, worker: str) -> int:
        return len(self._unfinished.get(worker, ()))

    def steps_ahead(self, worker: str, unknown: int) -> int:
        """Sampler steps a worker still has to run for its unfinished jobs (``unknown`` for a job
        whose steps are not known, e.g. a raw workflow)."""
        total = 0
        for prompt_id in self._unfinished.get(worker, {}):
            entry = self._jobs.get(prompt_id)
            if entry is None:
                total += unknown
                continue
            total += max((entry.steps or unknown) - entry.steps_done, 0)
        return total

    def recent_unseen(self, worker: str) -> int:
        """Jobs this scheduler sent to ``worker`` lately that its feed has not shown yet."""
        recent = self._recent_by_worker.get(worker)
        if not recent:
            return 0
        cutoff = self.clock() - RECENT_LOAD_TTL
        while recent and next(iter(recent.values()))[0] < cutoff:
            recent.popitem(last=False)
        return len(recent)

    def recent_unseen_steps(self, worker: str) -> int:
        """The sampler steps of those jobs (as placed): a burst is weighed by its real work."""
        if not self.recent_unseen(worker):
            return 0
        return sum(steps for _, steps in self._recent_by_worker[worker].values())

    def feed(self, worker: str) -> Feed | None:
        return self._feeds.get(worker)

    def feed_up(self, worker: str) -> bool:
        feed = self._feeds.get(worker)
        return feed is not None and feed.up

    def holds_jobs(self, worker: str) -> bool:
        """Whether the mirrored unfinished jobs of ``worker`` still count against their clients' fair
        share: while its feed is up, and for SHARE_GRACE after it went down — a blip (a health check
        timed out on a busy box) must not let a client past its cap, while a worker that stays down
        does not lock its clients out (its jobs come back with it: the worker keeps them)."""
        feed = self._feeds.get(worker)
        if feed is None:
            return False
        return feed.up or feed.down_at is not None and self.clock() - feed.down_at < SHARE_GRACE

    def jobs_of(self, worker: str) -> int:
        return len(self._ids.get(worker, ()))

    def take_outcomes(self) -> list[tuple[str, Any, str]]:
        """The job endings seen since the last call, oldest first: (worker, workflow, status)."""
        outcomes = list(self._outcomes)
        self._outcomes.clear()
        return outcomes

    # --- changing -------------------------------------------------------------

    def note_submitted(self, prompt_id: str, worker: str, steps: int) -> None:
        if prompt_id in self._jobs:
            return
        self._recent[prompt_id] = worker
        self._recent_by_worker.setdefault(worker, OrderedDict())[prompt_id] = (self.clock(), steps)
        while len(self._recent) > RECENT_LIMIT:
            old_id, old_worker = self._recent.popitem(last=False)
            self._recent_by_worker.get(old_worker, {}).pop(old_id, None)

    def _unrecent(self, prompt_id: str) -> None:
        worker = self._recent.pop(prompt_id, None)
        if worker is not None:
            self._recent_by_worker.get(worker, {}).pop(prompt_id, None)

    def apply(self, worker: str, page: dict[str, Any]) -> None:
        """Apply one whole ``GET /jobs`` answer of ``worker`` (a full listing in one page, or changes)."""
        jobs = self._apply_jobs(worker, page)
        if page.get("full"):
            self.keep_only(worker, {job["prompt_id"] for job in jobs})

    def _apply_jobs(self, worker: str, page: dict[str, Any]) -> list[dict[str, Any]]:
        """The page's jobs and removals into the mirror; its valid jobs."""
        jobs = [job for job in page.get("jobs") or () if isinstance(job, dict)
                and isinstance(job.get("prompt_id"), str)]
        listing = bool(page.get("full"))
        for job in jobs:
            self._put(worker, job, listing)
        self._remove_named(worker, page.get("removed"))
        return jobs

    def _remove_named(self, worker: str, removed: Any) -> None:
        """The ids a feed answer says the worker removed (pruned, refused): gone from the mirror."""
        if removed:
            self._remove(worker, [pid for pid in removed if isinstance(pid, str)])

    def keep_only(self, worker: str, keep: set[str]) -> None:
        """A full listing ended: the worker's jobs it did not name are gone."""
        self._remove(worker, [pid for pid in self._ids.get(worker, ()) if pid not in keep])

    def _put(self, worker: str, status: dict[str, Any], listing: bool = False, encoded: bytes | None = None) -> None:
        """A job's new state from ``worker``'s feed; ``encoded``: the status object's JSON as received
        (else encoded here). The dict is read here and not kept."""
        prompt_id = status["prompt_id"]
        old = self._jobs.get(prompt_id)
        if old is not None and old.worker != worker:
            self._forget(prompt_id, old.worker)
            old = None
        entry = Entry(worker, status, encoded)
        if old is not None and old.version == entry.version and old._json == entry._json:
            return
        state = entry.state
        if state in ENDINGS and (old is None or not old.final):
            # An ending seen as it happened: a change, a job we knew unfinished, or one we placed
            # (a listing's old jobs would count the past again after every scheduler restart).
            if not listing or old is not None or prompt_id in self._recent:
                self._outcomes.append((worker, status.get("workflow"), state))
        self._jobs[prompt_id] = entry
        client = status.get("client")
        # Most changes are progress within one state: the indexes by worker and by client only change
        # with the state (or a job new here, or one whose client changed), so they are left alone then.
        if old is None or old.state != state or client != self.clients.client_of(prompt_id):
            if self._gone:
                self._gone.pop(prompt_id, None)
            self._ids.setdefault(worker, {})[prompt_id] = None
            unfinished = self._unfinished.setdefault(worker, {})
            if state in UNFINISHED:
                unfinished[prompt_id] = state
            else:
                unfinished.pop(prompt_id, None)
            if self._recent:
                self._unrecent(prompt_id)
            if type(client) is str:
                status["client"] = sys.intern(client)  # one copy of each client's name, not one per job
            self.clients.put(prompt_id, worker, status)
        self._wake(prompt_id)

    def _remove(self, worker: str, prompt_ids: Iterable[str], gone: bool = True) -> None:
        for prompt_id in prompt_ids:
            entry = self._jobs.get(prompt_id)
            if entry is not None and entry.worker == worker:
                del self._jobs[prompt_id]
                self._forget(prompt_id, worker)
                self._wake(prompt_id)
            elif entry is not None:
                continue  # another worker holds it now
            if gone:
                self._gone[prompt_id] = worker
                self._gone.move_to_end(prompt_id)
                if self._recent.get(prompt_id) == worker:
                    self._unrecent(prompt_id)
        while len(self._gone) > GONE_LIMIT:
            self._gone.popitem(last=False)

    def _forget(self, prompt_id: str, worker: str) -> None:
        self._ids.get(worker, {}).pop(prompt_id, None)
        self._unfinished.get(worker, {}).pop(prompt_id, None)
        self.clients.forget(prompt_id)

    def drop_worker(self, worker: str) -> None:
        """Forget a worker's jobs (it was removed and drained, or replaced)."""
        self._remove(worker, list(self._ids.get(worker, ())), gone=False)
        for prompt_id in [pid for pid, name in self._gone.items() if name == worker]:
            del self._gone[prompt_id]
        self._ids.pop(worker, None)
        self._unfinished.pop(worker, None)
        for prompt_id in list(self._recent_by_worker.pop(worker, ())):
            self._recent.pop(prompt_id, None)

    # --- long-poll waits ----------------------------------------------------

    async def wait(self, prompt_id: str, since: int, timeout: float) -> None:
        """Return when the job's version passes ``since``, it leaves the mirror or goes stale,
        or after ``timeout``."""
        entry = self.fresh(prompt_id)
        if entry is None or entry.version > since or timeout <= 0:
            return
        await self._waiters.wait(prompt_id, timeout)

    def park(self, prompt_id: str, wake: Callable[[], None]) -> None:
        """Call ``wake`` once when the job changes, leaves the mirror or goes stale (a parked
        long-poll that is not a coroutine: t2i.scheduler.fastpath); ``unpark`` when it ends otherwise."""
        self._waiters.add(prompt_id, wake)

    def unpark(self, prompt_id: str, wake: Callable[[], None]) -> None:
        self._waiters.discard(prompt_id, wake)

    def _wake(self, prompt_id: str) -> None:
        self._waiters.wake(prompt_id)

    def wake_all(self, worker: str | None = None) -> None:
        for prompt_id in self._waiters:
            entry = self._jobs.get(prompt_id)
            if worker is None or entry is None or entry.worker == worker:
                self._wake(prompt_id)

    # --- feed followers -----------------------------------------------------

    def follow(self, worker: str, url: Callable[[], str], delay: float = 0) -> Feed:
        """Start following a worker's feed, after ``delay`` seconds (no-op when already followed)."""
        feed = self._feeds.get(worker)
        if feed is None or feed.task is None or feed.task.done():
            feed = Feed(worker, url)
            self._feeds[worker] = feed
            feed.task = asyncio.ensure_future(self._follow(feed, delay))
        return feed

    def unfollow(self, worker: str) -> None:
        """Stop following a worker and forget its jobs (at once: it may be followed again next)."""
        feed = self._feeds.pop(worker, None)
        if feed is not None:
            feed.up = False
            if feed.task is not None:
                feed.task.cancel()
        self.drop_worker(worker)

    async def stop(self) -> None:
        feeds = list(self._feeds.values())
        await asyncio.gather(*(self._cancel(feed) for feed in feeds))
        for feed in feeds:
            feed.up = False
        self.wake_all()

    @staticmethod
    async def _cancel(feed: Feed) -> None:
        feed.up = False
        if feed.task is not None and not feed.task.done():
            feed.task.cancel()
            try:
                await feed.task
            except asyncio.CancelledError:
                pass
            except Exception:  # the loop catches its own errors; anything else is a bug, logged
                log.exception("feed follower of %s failed", feed.name)

    def suspect(self, worker: str, error: str) -> None:
        """The worker looks down (health check or a refused call): its entries are not fresh
        until the feed answers again."""
        feed = self._feeds.get(worker)
        if feed is not None and feed.up:
            self._went_down(feed)
            feed.last_error = error
            self.wake_all(worker)

    def poke(self, worker: str) -> None:
        """The worker answers again: retry its feed now instead of after the backoff."""
        feed = self._feeds.get(worker)
        if feed is not None and not feed.up:
            feed.wake.set()

    async def _follow(self, feed: Feed, delay: float = 0) -> None:
        """List, then long-poll for changes; on errors mark the feed down and back off (jittered)."""
        if delay > 0:
            await asyncio.sleep(delay)
        backoff = BACKOFF_MIN
        while True:
            try:
                error = await self._poll_once(feed)
            except Exception as exc:  # a bug or a very odd page: keep following, loudly
                log.exception("job feed of worker %s: unexpected error", feed.name)
                error = f"unexpected error: {exc}"
            if error is not None or feed.up:
                feed.tried.set()
            if error is None:
                backoff = BACKOFF_MIN
                continue
            self._feed_down(feed, error)
            feed.wake.clear()
            await done_within(feed.wake.wait(), backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _poll_once(self, feed: Feed) -> str | None:
        """One ``GET /jobs`` (one page) applied to the mirror; the error when it failed.

        Answers come in pages of at most ``page_size`` jobs, so neither side builds, sends or
        applies a huge one. A full listing is read with the same ``since`` and ``after=cursor``
        until ``more`` is false; then the changes go on from the first page's ``seq``, so nothing
        that changed while paging is missed (what comes twice is applied twice, harmlessly).
        """
        listing = feed.listing
        if self.stream and listing is None and feed.epoch is not None and feed.up and not feed.more:
            return await self._stream_once(feed)
        if listing is not None:
            since, wait = listing.since, 0
            query = {"since": since, "after": listing.after, "limit": self.page_size}
        else:
            since = feed.seq if feed.epoch is not None else 0
            # Once listed, always long-poll, since=0 included: a worker with no job yet holds the
            # request too (asking it again at once would spin, thousands of times a second).
            # Each wait a little shorter than the last at random: a thousand feeds started together
            # soon come back at different moments instead of all at once every feed_wait seconds.
            wait = round(self.feed_wait * random.uniform(0.8, 1.0), 1) if feed.up and not feed.more else 0
            query = {"since": since, "wait": wait, "limit": self.page_size}
        try:
            response = await fetch_json(
                f"{feed.url()}/jobs?{urlencode(query)}", token=self.auth_token, client=self.client,
                connect_timeout=FEED_CONNECT_TIMEOUT, request_timeout=wait + FEED_SLACK)
        except UpstreamUnavailable as exc:
            return str(exc)
        return self._take_page(feed, response.status, response.body)

    def _take_page(self, feed: Feed, status: int, page: Any) -> str | None:
        """A ``GET /jobs`` answer (one page) into the mirror; the error when it is not a page."""
        listing = feed.listing
        if status != 200:
            return f"GET /jobs answered {status}"
        if not isinstance(page, dict) or not isinstance(page.get("seq"), int):
            return "GET /jobs answered without a feed page"
        epoch, full, cursor = page.get("epoch"), bool(page.get("full")), page.get("cursor")
        if listing is not None and (epoch != listing.epoch or not full):
            log.info("worker %s changed while its jobs were listed; listing them again", feed.name)
            feed.listing, feed.epoch = None, None
            return None
        if listing is None and feed.epoch is not None and epoch != feed.epoch and not full:
            log.info("worker %s restarted (new feed epoch); listing its jobs again", feed.name)
            feed.epoch = None
            return None
        if full and listing is None:
            # The next pages ask with since=0: a full listing whatever the worker's seq is now.
            listing = feed.listing = Listing(0, epoch, page["seq"])
            if feed.up:  # listed again: its jobs are not known to be complete until the last page
                self._went_down(feed)
                self.wake_all(feed.name)
        jobs = self._apply_jobs(feed.name, page)
        if listing is not None:
            listing.keep.update(job["prompt_id"] for job in jobs)
            if page.get("more") and isinstance(cursor, int) and cursor > listing.after:
                listing.after = cursor
                return None
            self.keep_only(feed.name, listing.keep)
            feed.listing = None
            feed.epoch, feed.seq, feed.more = epoch, listing.first_seq, False
        else:
            feed.more = bool(page.get("more")) and isinstance(cursor, int) and cursor > feed.seq
            feed.seq = cursor if feed.more else page["seq"]
        self._came_up(feed)
        return None

    async def _stream_once(self, feed: Feed) -> str | None:
        """One streamed ``GET /jobs?stream=1``: every change applied as it comes, for ``feed_wait``
        seconds; the error when it failed. A worker that does not stream answers a plain page (held
        up to ``wait``), taken as :meth:`_poll_once` takes it: the long-polls go on."""
        wait = round(self.feed_wait * random.uniform(0.8, 1.0), 1)  # spread, as the long-polls'
        # With its epoch: a worker that restarted says so at once (a full mark) and ends the answer.
        query = {"since": feed.seq, "wait": wait, "limit": self.page_size, "stream": 1, "epoch": feed.epoch}
        headers = {"Accept": f"{STREAM_TYPE}, application/json"}
        if self.auth_token:
            headers["Authorization"] = f"Bearer {self.auth_token}"
        reader = FeedStream(self, feed)
        # read_feed closes the connection however it ends (cancelled too: unfollow, stop): nothing more arrives.
        error = await read_feed(f"{feed.url()}/jobs?{urlencode(query)}", headers, reader,
                                connect_timeout=FEED_CONNECT_TIMEOUT, request_timeout=wait + FEED_SLACK,
                                until=reader.ended)
        if reader.ended.done():
            return reader.ended.result()
        if error is not None:
            return error
        if reader.streamed:
            return None  # ended after a mark, as the worker does when wait has passed
        try:
            page = json.loads(b"".join(reader.plain)) if reader.plain else None
        except ValueError:
            page = None
        return self._take_page(feed, reader.code, page)

    def _take_line(self, feed: Feed, reader: "FeedStream", line: bytes) -> None:
        """One line of a streamed feed: a job's status object (kept until its batch's mark), or the
        mark that applies the batch. Raises StreamEnd to stop reading."""
        try:
            item = json.loads(line)
        except ValueError:
            raise StreamEnd("GET /jobs streamed a line that is not JSON") from None
        if not isinstance(item, dict):
            raise StreamEnd("GET /jobs streamed a line that is not an object")
        if "prompt_id" in item:
            if isinstance(item["prompt_id"], str):
                reader.batch.append((item, line))
            return
        seq = item.get("seq")
        if not isinstance(seq, int):
            raise StreamEnd("GET /jobs streamed a line that is neither a job nor a mark")
        if item.get("epoch") != feed.epoch or item.get("full"):
            log.info("worker %s restarted or forgot the changes since %d; listing its jobs again",
                     feed.name, feed.seq)
            feed.epoch = None
            raise StreamEnd(None)
        for status, encoded in reader.batch:
            self._put(feed.name, status, False, encoded)
        reader.batch.clear()
        self._remove_named(feed.name, item.get("removed"))
        feed.seq = seq
        reader.streamed = True
        self._came_up(feed)

    def _came_up(self, feed: Feed) -> None:
        """A feed answer was applied: the worker's entries are fresh (again)."""
        if not feed.up:
            log.info("following the jobs of worker %s%s (%d jobs)", feed.name,
                     " again" if feed.last_ok is not None else "", self.jobs_of(feed.name))
        feed.up, feed.last_error, feed.last_ok = True, None, self.clock()

    def _went_down(self, feed: Feed) -> None:
        """Its entries are not fresh until the feed answers again; when that began (holds_jobs)."""
        if feed.up:
            feed.up, feed.down_at = False, self.clock()

    def _feed_down(self, feed: Feed, error: str) -> None:
        if feed.up or feed.last_error is None:
            log.warning("job feed of worker %s is down: %s", feed.name, error)
        self._went_down(feed)
        feed.listing = None  # a listing cut short is read again from its start
        feed.last_error = error
        self.wake_all(feed.name)
