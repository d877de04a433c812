"""The worker's SQLite journal (t2i.worker.journal.Journal), on real files in tmp_path.

No sleeps: every test awaits the journal's own futures (open, flush, close).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import pytest

from t2i.comfyui import ImageRef
from t2i.worker import journal as journal_module
from t2i.worker.jobs import (CANCELLED, COLLECTING, COMPLETED, FAILED, FINISHED, QUEUED, STARTED, SUBMITTING,
                             Job)
from t2i.worker.journal import COLUMNS, FILENAME, SCHEMA_VERSION, Journal, JournalError

T0 = 1_700_000_000.0
LOGGER = "t2i.worker.journal"


@pytest.fixture
def journals():
    """Journals made by a test; any the test did not close (a failure) are shut down afterwards."""
    made: list[Journal] = []

    def make(directory: Path, **kwargs) -> Journal:
        journal = Journal(directory, **kwargs)
        made.append(journal)
        return journal

    yield make
    for journal in made:
        journal._thread.shutdown(wait=True)
        journal._close_db()


async def reopen(make, directory: Path, **kwargs) -> tuple[list[Job], list[str]]:
    """What a fresh Journal on ``directory`` reads back (and closes it again)."""
    journal = make(directory, **kwargs)
    jobs, tombstones = await journal.open()
    await journal.close()
    return jobs, tombstones


def graph_of(n: int) -> dict:
    return {"3": {"class_type": "KSampler", "inputs": {"seed": n, "steps": 20, "model": ["4", 0]}},
            "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": f"t2i/job{n}", "images": ["8", 0]}}}


def make_job(n: int, phase: str, created_at: float) -> Job:
    """A job with every journaled field set to something distinctive."""
    job = Job(f"job-{n}", created_at, workflow="txt2img", seed=1000 + n, client_id=f"ws-{n}", phase=phase,
              graph=graph_of(n), params={"prompt": f"a cat № {n} \u2603", "seed": 1000 + n, "steps": 20,
                                         "width": 512})
    job.attempt = n % 3
    job.started_at = created_at + 1.5 if phase not in (SUBMITTING, QUEUED) else None
    job.finished_at = created_at + 9.25 if phase in FINISHED else None
    job.error = f"ComfyUI said no ({n})" if phase in (FAILED, QUEUED) else None
    job.images = (f"job-{n}_0.png", f"job-{n}_1.png") if phase in (COMPLETED, COLLECTING) else ()
    job.outputs = (ImageRef(f"t2i/job{n}_00001_.png", "t2i", "output"), ImageRef(f"tmp{n}.png", "", "temp"))
    job.progress_max = 20 if phase != SUBMITTING else None
    job.progress_value = 7  # not journaled: only a finished job's comes back (as progress_max)
    job.client = f"client-{n}"
    job.idempotency_key = f"key-{n}" if n % 2 else None
    job.webhook = {"url": f"https://hooks.example/{n}", "attempts": n, "delivered": False} if n % 2 else None
    return job


def journaled(job: Job) -> dict:
    """The fields the journal keeps, as a restored job must have them."""
    values = {name: getattr(job, name) for name in COLUMNS}
    if job.phase in FINISHED:
        values["graph"] = None
    return values


# --- round trip ----------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=10)
async def test_round_trip_keeps_every_field_oldest_first(tmp_path, journals):
    journal = journals(tmp_path)
    assert await journal.open() == ([], [])
    assert (tmp_path / FILENAME).is_file()
    phases = [COMPLETED, SUBMITTING, QUEUED, STARTED, COLLECTING, FAILED, CANCELLED]
    # Saved out of age order: open() must sort by created_at.
    ages = [5, 0, 3, 1, 6, 2, 4]
    jobs = [make_job(n, phase, T0 + age) for n, (phase, age) in enumerate(zip(phases, ages))]
    for job in jobs:
        journal.save(job)
    await journal.flush()
    assert journal.writes == len(jobs)
    await journal.close()

    restored, tombstones = await reopen(journals, tmp_path)
    assert tombstones == []
    expected = sorted(jobs, key=lambda job: job.created_at)
    assert [job.prompt_id for job in restored] == [job.prompt_id for job in expected]
    for got, want in zip(restored, expected):
        assert journaled(got) == journaled(want), want.prompt_id
        assert isinstance(got.images, tuple) and isinstance(got.outputs, tuple)
        assert all(type(ref) is ImageRef for ref in got.outputs)
        assert got.status == want.status
        if want.phase in FINISHED:
            assert got.graph is None  # dropped once the job ended: nothing to resubmit
            assert got.progress_value == got.progress_max == 20
        else:
            assert got.graph == graph_of(int(want.prompt_id.split("-")[1]))
            assert got.progress_value is None
    # The in-memory job was not changed by saving it.
    assert jobs[0].graph is not None


@pytest.mark.gen_test(timeout=10)
async def test_a_later_save_replaces_the_row(tmp_path, journals):
    journal = journals(tmp_path)
    await journal.open()
    job = make_job(1, SUBMITTING, T0)
    journal.save(job)
    await journal.flush()
    for phase in (QUEUED, STARTED, COLLECTING, COMPLETED):
        job = job.evolve(phase=phase, finished_at=T0 + 3 if phase == COMPLETED else None)
        journal.save(job)
        await journal.flush()
    assert journal.commits == 5
    await journal.close()
    (restored,), _ = await reopen(journals, tmp_path)
    assert restored.phase == COMPLETED and restored.graph is None
    assert journaled(restored) == journaled(job)


# --- group commit --------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=10)
async def test_queued_saves_share_one_commit(tmp_path, journals):
    journal = journals(tmp_path)
    await journal.open()
    for n in range(200):  # no await in between: all of them wait for the writer together
        journal.save(make_job(n, (SUBMITTING, QUEUED, COMPLETED)[n % 3], T0 + n))
    await journal.flush()
    assert journal.commits == 1  # much smaller than 200
    assert journal.writes == 200
    await journal.flush()  # nothing queued: returns without a commit
    assert journal.commits == 1
    await journal.close()
    restored, _ = await reopen(journals, tmp_path)
    assert [job.prompt_id for job in restored] == [f"job-{n}" for n in range(200)]


@pytest.mark.gen_test(timeout=10)
async def test_saves_during_a_commit_go_into_the_next_one(tmp_path, journals):
    journal = journals(tmp_path)
    journal.coalesce = 0  # the first commit begins at once (no wait for more rows)
    await journal.open()
    journal.save(make_job(0, SUBMITTING, T0))
    first = asyncio.ensure_future(journal.flush())
    await asyncio.sleep(0)  # the writer takes the first batch
    for n in range(1, 50):
        journal.save(make_job(n, SUBMITTING, T0 + n))
    await asyncio.gather(first, journal.flush())
    assert journal.commits == 2
    await journal.close()
    restored, _ = await reopen(journals, tmp_path)
    assert len(restored) == 50


# --- forget and tombstones -----------------------------------------------------------------

@pytest.mark.gen_test(timeout=10)
async def test_rows_nobody_waits_for_share_a_commit_until_a_flush(tmp_path, journals):
    journal = journals(tmp_path)
    journal.coalesce = 600  # longer than the test may run: only the flush can end the wait
    await journal.open()
    for n in range(5):  # transitions in separate turns of the loop, as a job's messages come
        journal.save(make_job(n, SUBMITTING, T0 + n))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    assert journal.commits == 0
    journal.save(make_job(0, QUEUED, T0))
    await journal.flush()  # cuts the wait short
    assert journal.commits == 1 and journal.writes == 5
    journal.save(make_job(5, SUBMITTING, T0 + 5))
    await journal.close()  # commits what is queued, without waiting out the window
    assert journal.commits == 2
    restored, _ = await reopen(journals, tmp_path)
    assert [(job.prompt_id, job.phase) for job in restored] == [
        ("job-0", QUEUED), *((f"job-{n}", SUBMITTING) for n in range(1, 6))]


@pytest.mark.gen_test(timeout=10)
async def test_forget_deletes_rows_and_keeps_tombstones(tmp_path, journals):
    journal = journals(tmp_path)
    await journal.open()
    for n in range(6):
        journal.save(make_job(n, COMPLETED, T0 + n))
    await journal.flush()
    journal.forget(["job-1", "job-4"])
    await journal.flush()
    journal.forget(["job-0"])
    await journal.flush()
    await journal.close()

    restored, tombstones = await reopen(journals, tmp_path)
    assert [job.prompt_id for job in restored] == ["job-2", "job-3", "job-5"]
    assert sorted(tombstones[:2]) == ["job-1", "job-4"] and tombstones[2] == "job-0"  # oldest first
    with closing(sqlite3.connect(tmp_path / FILENAME)) as db:
        assert db.execute("SELECT count(*) FROM jobs WHERE prompt_id IN ('job-0', 'job-1', 'job-4')"
                          ).fetchone()[0] == 0


@pytest.mark.gen_test(timeout=10)
async def test_tombstones_are_capped_oldest_dropped(tmp_path, journals):
    journal = journals(tmp_path, tombstone_limit=3)
    await journal.open()
    for n in range(8):
        journal.save(make_job(n, COMPLETED, T0 + n))
    await journal.flush()
    for batch in (["job-0", "job-1"], ["job-2", "job-3"], ["job-4"], ["job-5"]):
        journal.forget(batch)
        await journal.flush()
    await journal.close()

    restored, tombstones = await reopen(journals, tmp_path, tombstone_limit=3)
    assert [job.prompt_id for job in restored] == ["job-6", "job-7"]
    assert len(tombstones) == 3
    assert tombstones[1:] == ["job-4", "job-5"]
    assert tombstones[0] in ("job-2", "job-3")  # same batch as the one dropped: either may stay
    with closing(sqlite3.connect(tmp_path / FILENAME)) as db:
        assert db.execute("SELECT count(*) FROM tombstones").fetchone()[0] == 3


@pytest.mark.gen_test(timeout=10)
async def test_save_after_forget_in_one_batch_keeps_the_job(tmp_path, journals):
    journal = journals(tmp_path)
    await journal.open()
    journal.save(make_job(1, COMPLETED, T0))
    journal.save(make_job(2, COMPLETED, T0 + 1))
    await journal.flush()
    journal.forget(["job-1"])
    journal.save(make_job(2, FAILED, T0 + 1))
    journal.forget(["job-2"])  # last word wins within a batch
    journal.save(make_job(3, QUEUED, T0 + 2))
    await journal.flush()
    await journal.close()
    restored, tombstones = await reopen(journals, tmp_path)
    assert [job.prompt_id for job in restored] == ["job-3"]
    assert sorted(tombstones) == ["job-1", "job-2"]


# --- unreadable journals are moved aside -----------------------------------------------------

def asides(directory: Path) -> list[Path]:
    """Journals moved aside (not their -wal and -shm files, moved along when SQLite had made them)."""
    return sorted(path for path in directory.glob(f"{FILENAME}.corrupt-*") if path.name.endswith("Z"))


async def write_real_journal(make, directory: Path, n: int = 300) -> bytes:
    """A journal of ``n`` jobs, closed (checkpointed into the main file); its bytes."""
    journal = make(directory)
    await journal.open()
    for i in range(n):
        job = make_job(i, COMPLETED, T0 + i)
        job.params = {"prompt": f"marker-{i:04d}-" + "x" * 200}
        journal.save(job)
    await journal.flush()
    await journal.close()
    assert not (directory / f"{FILENAME}-wal").exists()
    return (directory / FILENAME).read_bytes()


async def assert_moved_aside_and_usable(make, directory: Path, bad: bytes, caplog) -> None:
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        journal = make(directory)
        jobs, tombstones = await journal.open()
    assert (jobs, tombstones) == ([], [])
    errors = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.ERROR]
    assert len(errors) == 1, caplog.text
    (aside,) = asides(directory)
    assert aside.read_bytes() == bad
    assert str(directory / FILENAME) in errors[0].getMessage() and aside.name in errors[0].getMessage()
    stamp = aside.name.rsplit("corrupt-", 1)[1]
    assert len(stamp) == len("20240101T000000Z") and stamp[8] == "T" and stamp.endswith("Z")
    # The new journal works.
    journal.save(make_job(1, QUEUED, T0))
    await journal.flush()
    await journal.close()
    restored, _ = await reopen(make, directory)
    assert [job.prompt_id for job in restored] == ["job-1"]
    assert aside.read_bytes() == bad  # left alone


@pytest.mark.gen_test(timeout=10)
async def test_garbage_file_is_moved_aside(tmp_path, journals, caplog):
    garbage = os.urandom(3000) + b"this is not SQLite" * 100
    (tmp_path / FILENAME).write_bytes(garbage)
    await assert_moved_aside_and_usable(journals, tmp_path, garbage, caplog)


@pytest.mark.gen_test(timeout=10)
async def test_truncated_database_is_moved_aside(tmp_path, journals, caplog):
    data = await write_real_journal(journals, tmp_path)
    bad = data[:len(data) // 2]
    (tmp_path / FILENAME).write_bytes(bad)
    await assert_moved_aside_and_usable(journals, tmp_path, bad, caplog)


@pytest.mark.gen_test(timeout=10)
async def test_database_with_a_garbled_page_is_moved_aside(tmp_path, journals, caplog):
    data = await write_real_journal(journals, tmp_path)
    page = int.from_bytes(data[16:18], "big")
    bad = data[:3 * page] + b"\xff" * page + data[4 * page:]  # page 4, a b-tree page, overwritten
    (tmp_path / FILENAME).write_bytes(bad)
    await assert_moved_aside_and_usable(journals, tmp_path, bad, caplog)


async def assert_one_row_skipped(make, directory: Path, skipped: str, held: int, caplog) -> None:
    """A damaged row costs only itself: logged and skipped, the file kept, the other jobs loaded."""
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        journal = make(directory)
        jobs, _ = await journal.open()
    assert len(jobs) == held - 1 and skipped not in {job.prompt_id for job in jobs}
    errors = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.ERROR]
    assert len(errors) == 1 and skipped in errors[0] and "skipping it" in errors[0], errors
    assert asides(directory) == []
    await journal.close()


@pytest.mark.gen_test(timeout=10)
async def test_a_row_with_bytes_that_are_not_utf8_is_skipped_alone(tmp_path, journals, caplog):
    data = await write_real_journal(journals, tmp_path)
    at = data.index(b"marker-0117-") + 12
    assert data.count(b"marker-0117-") == 1
    bad = data[:at] + b"\xff\xfe\xfd\xfc" + data[at + 4:]  # inside a record: the b-tree is intact
    (tmp_path / FILENAME).write_bytes(bad)
    await assert_one_row_skipped(journals, tmp_path, "job-117", 300, caplog)


@pytest.mark.gen_test(timeout=10)
async def test_a_row_of_bad_json_is_skipped_alone(tmp_path, journals, caplog):
    await write_real_journal(journals, tmp_path, n=3)
    with closing(sqlite3.connect(tmp_path / FILENAME)) as db, db:
        db.execute("UPDATE jobs SET images = '[\"job-1_0.png\", tru' WHERE prompt_id = 'job-1'")
    await assert_one_row_skipped(journals, tmp_path, "job-1", 3, caplog)


@pytest.mark.gen_test(timeout=10)
async def test_newer_schema_is_moved_aside(tmp_path, journals, caplog):
    await write_real_journal(journals, tmp_path, n=2)
    db = sqlite3.connect(tmp_path / FILENAME)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        journal = journals(tmp_path)
        assert await journal.open() == ([], [])
    assert "newer" in caplog.text
    (aside,) = asides(tmp_path)
    # Moved intact: a newer t2i can still read it.
    db = sqlite3.connect(aside)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 2
    db.close()
    journal.save(make_job(7, STARTED, T0))
    await journal.flush()
    await journal.close()
    restored, _ = await reopen(journals, tmp_path)
    assert [job.prompt_id for job in restored] == ["job-7"]
    db = sqlite3.connect(tmp_path / FILENAME)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


# --- an unusable directory is an error, not a corrupt journal ---------------------------------

@pytest.mark.gen_test(timeout=10)
async def test_directory_under_a_regular_file_raises_oserror(tmp_path, journals):
    (tmp_path / "afile").write_text("not a folder")
    journal = journals(tmp_path / "afile" / "state")
    with pytest.raises(OSError):
        await journal.open()
    assert (tmp_path / "afile").read_text() == "not a folder"
    assert asides(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
@pytest.mark.gen_test(timeout=10)
async def test_read_only_directory_raises_oserror(tmp_path, journals):
    state = tmp_path / "state"
    await write_real_journal(journals, state, n=2)
    before = (state / FILENAME).read_bytes()
    state.chmod(0o500)
    try:
        journal = journals(state)
        with pytest.raises(OSError):
            await journal.open()
    finally:
        state.chmod(0o700)
    assert asides(state) == []
    assert (state / FILENAME).read_bytes() == before


@pytest.mark.gen_test(timeout=10)
async def test_journal_path_that_is_a_folder_raises_oserror(tmp_path, journals):
    (tmp_path / FILENAME).mkdir()
    journal = journals(tmp_path)
    with pytest.raises(OSError):
        await journal.open()
    assert asides(tmp_path) == [] and (tmp_path / FILENAME).is_dir()


# --- a commit that fails ------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=10)
async def test_failed_commit_raises_journal_error_and_keeps_the_rows(tmp_path, journals, monkeypatch, caplog):
    journal = journals(tmp_path)
    await journal.open()
    journal.save(make_job(0, COMPLETED, T0))
    await journal.flush()
    original = Journal._commit
    calls = []

    def full_once(self, batch):
        calls.append(dict(batch))
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Journal, "_commit", full_once)
    for n in range(1, 4):
        journal.save(make_job(n, SUBMITTING, T0 + n))
    journal.forget(["job-0"])
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        with pytest.raises(JournalError) as failure:
            await journal.flush()
    sentence = str(failure.value)
    assert str(journal.path) in sentence and "database or disk is full" in sentence
    assert sentence == journal.last_error
    assert sentence in caplog.text
    assert len(calls) == 1 and set(calls[0]) == {"job-0", "job-1", "job-2", "job-3"}
    assert journal.commits == 1

    monkeypatch.setattr(Journal, "_commit", original)
    journal.save(make_job(2, QUEUED, T0 + 2))  # a newer row for one of the kept ones wins
    await journal.flush()
    assert journal.last_error is None
    assert journal.commits == 2
    await journal.close()
    restored, tombstones = await reopen(journals, tmp_path)
    assert [(job.prompt_id, job.phase) for job in restored] == [
        ("job-1", SUBMITTING), ("job-2", QUEUED), ("job-3", SUBMITTING)]
    assert tombstones == ["job-0"]


@pytest.mark.gen_test(timeout=10)
async def test_flush_retries_a_failed_commit_without_a_new_save(tmp_path, journals, monkeypatch):
    journal = journals(tmp_path)
    await journal.open()
    original = Journal._commit
    monkeypatch.setattr(Journal, "_commit", lambda self, batch: (_ for _ in ()).throw(
        sqlite3.OperationalError("disk I/O error")))
    journal.save(make_job(1, SUBMITTING, T0))
    with pytest.raises(JournalError):
        await journal.flush()
    monkeypatch.setattr(Journal, "_commit", original)
    await journal.flush()  # no save in between: flush itself starts the writer again
    await journal.close()
    restored, _ = await reopen(journals, tmp_path)
    assert [job.prompt_id for job in restored] == ["job-1"]


@pytest.mark.gen_test(timeout=10)
async def test_really_full_database_names_the_cause(tmp_path, journals):
    journal = journals(tmp_path)
    await journal.open()
    loop = asyncio.get_running_loop()

    def cap(pages: int | None) -> None:
        db = journal._db
        if pages is None:
            pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count={pages}")

    await loop.run_in_executor(journal._thread, cap, None)  # no room for one more page
    for n in range(50):
        job = make_job(n, SUBMITTING, T0 + n)
        job.params = {"prompt": "x" * 3000}
        journal.save(job)
    with pytest.raises(JournalError) as failure:
        await journal.flush()
    await loop.run_in_executor(journal._thread, cap, 1_000_000)
    await journal.flush()  # the rows were kept
    await journal.close()
    restored, _ = await reopen(journals, tmp_path)
    assert len(restored) == 50
    assert "database or disk is full" in str(failure.value)


@pytest.mark.gen_test(timeout=10)
async def test_a_seed_comfyui_accepts_round_trips(tmp_path, journals):
    journal = journals(tmp_path)
    await journal.open()
    job = make_job(1, QUEUED, T0)
    job.seed = 2**64 - 1
    journal.save(job)
    journal.save(make_job(2, QUEUED, T0 + 1))
    await journal.flush()
    await journal.close()
    restored, _ = await reopen(journals, tmp_path)
    assert [job.seed for job in restored] == [2**64 - 1, 1002]


# --- the event loop never runs SQLite -------------------------------------------------------------

@pytest.mark.gen_test(timeout=10)
async def test_sqlite_runs_on_the_writer_thread(tmp_path, journals, monkeypatch):
    test_thread = threading.get_ident()
    seen: dict[str, set[int]] = {"commit": set(), "encode": set(), "open": set()}
    original_commit, original_encode = Journal._commit, journal_module._encode
    original_read = Journal._connect_and_read

    def commit(self, batch):
        seen["commit"].add(threading.get_ident())
        return original_commit(self, batch)

    def encode(row):
        seen["encode"].add(threading.get_ident())
        return original_encode(row)

    def read(self):
        seen["open"].add(threading.get_ident())
        return original_read(self)

    monkeypatch.setattr(Journal, "_commit", commit)
    monkeypatch.setattr(journal_module, "_encode", encode)
    monkeypatch.setattr(Journal, "_connect_and_read", read)
    journal = journals(tmp_path)
    await journal.open()
    for n in range(20):
        journal.save(make_job(n, SUBMITTING, T0 + n))
        if n % 5 == 0:
            await journal.flush()
    journal.forget(["job-3"])
    await journal.flush()
    await journal.close()
    assert threading.get_ident() == test_thread  # the loop runs on the test's thread
    assert all(seen.values()), seen
    threads = set().union(*seen.values())
    assert len(threads) == 1 and test_thread not in threads, seen
