"""The worker's journal: one SQLite row per job, so a restart loses nothing it had accepted.

Rows are written on lifecycle transitions (``JOURNAL`` effects), never on progress
messages. The event loop only queues a snapshot of the job; one writer thread
encodes and commits whatever has queued up in one transaction (group commit), so a
burst of transitions costs one commit; rows nobody waits for wait up to COALESCE_SECONDS
for company. :meth:`Journal.flush` waits until everything queued so far is on disk (and
ends that wait): ``POST /generate`` answers 200 only after its job's row is.

WAL mode with ``synchronous=NORMAL``: a commit survives the process being killed
(SIGKILL included); a power cut of the whole machine may lose the last few commits.

A journal that cannot be read at start-up (corrupt, not SQLite, a newer schema) is
moved aside as ``journal.sqlite3.corrupt-<UTC time>`` and the worker starts empty:
a bad file must never turn into a crash loop.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from t2i.comfyui import ImageRef
from t2i.waiters import done_within
from t2i.worker.jobs import FINISHED, Job

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FILENAME = "journal.sqlite3"
# Rows nobody waits for (flush) are committed up to this long after they are queued, so the transitions
# of jobs in flight together share a commit: a commit costs ~100 us of CPU (the writer thread's wake-ups
# and SQLite's transaction) whatever it holds, a row ~13 us more, and a job makes 5 or 6 rows. A flush
# cuts the wait short. A worker killed meanwhile loses them as it loses a commit in flight (see above).
COALESCE_SECONDS = 0.01

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    prompt_id TEXT PRIMARY KEY,
    phase TEXT NOT NULL,
    accepted INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    client_id TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    error TEXT,
    images TEXT NOT NULL,          -- JSON list of stored image names
    outputs TEXT NOT NULL,         -- JSON list of ComfyUI output refs named by `executed`
    seed TEXT,                     -- text: ComfyUI seeds go up to 2**64-1, past SQLite's INTEGER
    workflow TEXT,
    params TEXT,                   -- JSON: the request's parameters
    graph TEXT,                    -- JSON: the built ComfyUI workflow, until the job ends
    progress_max INTEGER,
    client TEXT,                   -- who asked (client identity)
    idempotency_key TEXT,
    webhook TEXT,                  -- JSON: webhook delivery state
    ending TEXT,                   -- JSON [phase, error]: a stop (cancel) in flight
    request_hash TEXT              -- fingerprint of the request body (Idempotency-Key checks)
);
CREATE TABLE IF NOT EXISTS tombstones (
    prompt_id TEXT PRIMARY KEY,
    removed_at REAL NOT NULL
);
"""

COLUMNS = ("prompt_id", "phase", "accepted", "attempt", "client_id", "created_at", "started_at", "finished_at", "error",
           "images", "outputs", "seed", "workflow", "params", "graph", "progress_max", "client",
           "idempotency_key", "webhook", "ending", "request_hash")
UPSERT = (f"INSERT OR REPLACE INTO jobs ({', '.join(COLUMNS)}) "
          f"VALUES ({', '.join('?' for _ in COLUMNS)})")


class JournalError(Exception):
    """A write could not be committed (disk full, read-only, I/O error); ``str()`` is a sentence."""


def _row_of(job: Job) -> tuple:
    """The fields of a job the journal keeps (the graph is JSON-encoded later, in the writer thread)."""
    return (job.prompt_id, job.phase, int(job.accepted), job.attempt, job.client_id, job.created_at, job.started_at,
            job.finished_at, job.error, job.images, job.outputs, job.seed, job.workflow, job.params,
            None if job.phase in FINISHED else job.graph, job.progress_max, job.client, job.idempotency_key,
            job.webhook, job.ending, job.request_hash)


GRAPH = COLUMNS.index("graph")


def _encode(row: tuple) -> tuple:
    """The row as SQLite takes it, but for the graph (``Journal._graph_json`` encodes that once per job)."""
    values = dict(zip(COLUMNS, row))
    values["images"] = json.dumps(list(values["images"]))
    values["seed"] = None if values["seed"] is None else str(values["seed"])
    values["outputs"] = json.dumps([[ref.filename, ref.subfolder, ref.type] for ref in values["outputs"]])
    for key in ("params", "webhook", "ending"):
        if values[key] is not None:
            values[key] = json.dumps(values[key], separators=(",", ":"))
    return tuple(values[name] for name in COLUMNS)


def _job_of(row: sqlite3.Row) -> Job:
    def loads(value: str | None) -> Any:
        return json.loads(value) if value is not None else None

    seed = None if row["seed"] is None else int(row["seed"])
    job = Job(row["prompt_id"], row["created_at"], workflow=row["workflow"], seed=seed,
              client_id=row["client_id"], phase=row["phase"], graph=loads(row["graph"]), params=loads(row["params"]))
    job.attempt = row["attempt"]
    job.accepted = bool(row["accepted"])
    job.started_at = row["started_at"]
    job.finished_at = row["finished_at"]
    job.error = row["error"]
    job.images = tuple(json.loads(row["images"]))
    job.outputs = tuple(ImageRef(*ref) for ref in json.loads(row["outputs"]))
    job.progress_max = row["progress_max"]
    if job.phase in FINISHED and job.progress_max:
        job.progress_value = job.progress_max
    job.client = row["client"]
    job.idempotency_key = row["idempotency_key"]
    job.webhook = loads(row["webhook"])
    ending = loads(row["ending"])
    job.ending = tuple(ending) if ending else None
    job.request_hash = row["request_hash"]
    return job


class Journal:
    """SQLite journal of one worker's jobs. All SQLite calls run on one writer thread."""

    def __init__(self, directory: Path | str, tombstone_limit: int = 20000):
        self.path = Path(directory) / FILENAME
        self.tombstone_limit = tombstone_limit
        self.writes = 0  # rows written, for metrics and the bench
        self.commits = 0
        self._thread: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self._pending: dict[str, tuple | None] = {}  # prompt_id -> row to write, or None: delete
        self._held: dict[str, tuple | None] = {}  # prompt_id -> its newest row kept back (see hold)
        self._queued = 0      # writes queued so far (a counter, for flush)
        self._committed = 0   # writes committed so far
        self._writer: asyncio.Task | None = None
        self._hurry: asyncio.Future | None = None  # set by flush: the writer stops coalescing
        self.coalesce = COALESCE_SECONDS
        self._waiters: list[tuple[int, asyncio.Future]] = []
        self._graphs: dict[str, tuple[Any, str]] = {}  # the writer thread's: see _graph_json
        self.last_error: str | None = None
        self._closed = False

    # --- start-up -----------------------------------------------------------------

    async def open(self) -> tuple[list[Job], list[str]]:
        """Open (or create) the journal; the jobs and tombstones it holds, oldest first."""
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="t2i-journal")
        self._closed = False
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._open)

    def _open(self) -> tuple[list[Job], list[str]]:
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "the folder is not writable", str(directory))
        try:
            return self._connect_and_read()
        except sqlite3.OperationalError as exc:
            # Locked by another worker, read-only, I/O error: the file may be fine, the set-up is not.
            self._close_db()
            raise OSError(f"{self.path}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            self._close_db()
            aside = self._move_aside()
            log.error("the journal %s cannot be read (%s); moved it to %s and starting with no jobs",
                      self.path, exc, aside)
            return self._connect_and_read()

    def _connect_and_read(self) -> tuple[list[Job], list[str]]:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db = db
        db.row_factory = sqlite3.Row
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"schema version {version} is newer than this t2i's {SCHEMA_VERSION}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"integrity check: {check}")
        db.executescript(SCHEMA)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        # Bad bytes in a text column raise UnicodeDecodeError (a ValueError) for that row only.
        db.text_factory = lambda data: data.decode("utf-8")
        jobs = []
        for prompt_id, in db.execute("SELECT prompt_id FROM jobs ORDER BY created_at").fetchall():
            try:
                jobs.append(_job_of(db.execute("SELECT * FROM jobs WHERE prompt_id = ?", (prompt_id,)).fetchone()))
            except (ValueError, TypeError, KeyError, sqlite3.DataError) as exc:
                # One damaged row must not cost the others: log it, keep the rest.
                log.error("journal %s: job %s cannot be read back (%s); skipping it", self.path, prompt_id, exc)
        tombstones = [row[0] for row in db.execute("SELECT prompt_id FROM tombstones ORDER BY removed_at")]
        return jobs, tombstones

    def _move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():  # two bad files within a second: keep both
            n += 1
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(str(self.path) + suffix)
            if source.exists():
                os.replace(source, Path(str(aside) + suffix))
        return aside

    # --- writing --------------------------------------------------------------------

    def save(self, job: Job) -> None:
        """Queue the job's row; written by the next commit."""
        self._queue(job.prompt_id, _row_of(job))

    def forget(self, prompt_ids: list[str]) -> None:
        """Queue the removal of jobs (retention, or never accepted); their tombstones are kept."""
        for prompt_id in prompt_ids:
            self._queue(prompt_id, None)

    async def forget_now(self, prompt_ids: list[str]) -> None:
        """:meth:`forget`, then wait until it is on disk (JournalError if it cannot be)."""
        self.forget(prompt_ids)
        await self.flush()

    def hold(self, prompt_id: str) -> None:
        """Keep the job's rows back until :meth:`release`: it is about to say ``completed`` while its
        images are not yet on disk for good. A worker killed meanwhile finds its older row (collecting)
        and copies the images out of ComfyUI again."""
        self._held.setdefault(prompt_id, None)

    def release(self, prompt_id: str) -> None:
        """Its images are durable: queue the newest row held back (if any)."""
        row = self._held.pop(prompt_id, None)
        if row is not None:
            self._queue(prompt_id, row)

    def _queue(self, prompt_id: str, row: tuple | None) -> None:
        if prompt_id in self._held:
            if row is not None:
                self._held[prompt_id] = row
                return
            del self._held[prompt_id]  # removed: nothing of it is to be written
        self._pending[prompt_id] = row
        self._queued += 1
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_loop())

    async def flush(self) -> None:
        """Return once everything queued before this call is committed; JournalError if it cannot be."""
        target = self._queued
        if self._committed >= target:
            return
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_loop())  # a failed commit: try again now
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((target, future))
        if self._hurry is not None and not self._hurry.done():
            self._hurry.set_result(None)
        await future

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            if not self._waiters and self.coalesce > 0 and not self._closed:
                await self._coalesce(loop)
            batch, self._pending = self._pending, {}
            upto = self._queued
            try:
                await loop.run_in_executor(self._thread, self._commit, batch)
            except Exception as exc:  # disk full, read-only: keep the rows, tell the waiters
                self.last_error = f"the job journal {self.path} cannot be written: {exc}"
                log.error("%s", self.last_error)
                for prompt_id, row in batch.items():
                    self._pending.setdefault(prompt_id, row)
                self._fail_waiters(JournalError(self.last_error))
                return  # the next save starts the writer again
            self.last_error = None
            self._committed = upto
            self._wake_waiters()

    async def _coalesce(self, loop: asyncio.AbstractEventLoop) -> None:
        """Let more rows queue up for the next commit: ``coalesce`` seconds, or until a flush."""
        self._hurry = loop.create_future()
        try:
            await done_within(self._hurry, self.coalesce)
        finally:
            self._hurry = None

    def _commit(self, batch: dict[str, tuple | None]) -> None:
        db = self._db
        if db is None:
            raise JournalError("the journal is closed")
        upserts = []
        for row in batch.values():
            if row is None:
                continue
            try:
                encoded = _encode(row)
                upserts.append(encoded[:GRAPH] + (self._graph_json(row[0], row[GRAPH]),) + encoded[GRAPH + 1:])
            except (TypeError, ValueError) as exc:  # a bug, not the disk: the other rows still go in
                log.error("job %s: cannot be journaled: %s", row[0], exc)
        removed = [(prompt_id, time.time()) for prompt_id, row in batch.items() if row is None]
        for prompt_id, _ in removed:
            self._graphs.pop(prompt_id, None)
        db.execute("BEGIN IMMEDIATE")
        try:
            if upserts:
                db.executemany(UPSERT, upserts)
            if removed:
                db.executemany("DELETE FROM jobs WHERE prompt_id = ?", [(pid,) for pid, _ in removed])
                db.executemany("INSERT OR REPLACE INTO tombstones VALUES (?, ?)", removed)
                db.execute("DELETE FROM tombstones WHERE prompt_id IN (SELECT prompt_id FROM tombstones "
                           "ORDER BY removed_at DESC LIMIT -1 OFFSET ?)", (self.tombstone_limit,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # on SQLITE_FULL SQLite has rolled back already
                db.execute("ROLLBACK")
            raise
        self.writes += len(batch)
        self.commits += 1

    def _graph_json(self, prompt_id: str, graph: Any) -> str | None:
        """A job's graph as JSON, cached on the writer thread: it never changes, and it would be encoded
        again at every transition of the job."""
        if graph is None:
            self._graphs.pop(prompt_id, None)
            return None
        cached = self._graphs.get(prompt_id)
        if cached is None or cached[0] is not graph:
            cached = self._graphs[prompt_id] = (graph, json.dumps(graph, separators=(",", ":")))
        return cached[1]

    def _wake_waiters(self) -> None:
        still = []
        for target, future in self._waiters:
            if self._committed >= target:
                if not future.done():
                    future.set_result(None)
            else:
                still.append((target, future))
        self._waiters = still

    def _fail_waiters(self, exc: Exception) -> None:
        waiters, self._waiters = self._waiters, []
        for _, future in waiters:
            if not future.done():
                future.set_exception(exc)

    # --- shutdown -------------------------------------------------------------------

    async def close(self) -> None:
        """Commit what is queued, then close the database and the writer thread (once; again: nothing)."""
        if self._closed or self._thread is None:
            return
        self._closed = True
        try:
            if self._pending or (self._writer is not None and not self._writer.done()):
                await self.flush()
        except JournalError as exc:
            log.error("closing the journal with unwritten changes: %s", exc)
        await asyncio.get_running_loop().run_in_executor(self._thread, self._close_db)
        self._thread.shutdown(wait=True)

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
