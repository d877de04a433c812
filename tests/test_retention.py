"""Retention (t2i.worker.retention.Pruner): prune_once() driven with a movable clock."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import uuid
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from support.timing import T0, FakeClock
from t2i.config import RetentionConfig
from t2i.worker import retention
from t2i.worker.images import ImageStore
from t2i.worker.jobs import COLLECTING, COMPLETED, FAILED, PENDING, RUNNING, STARTED, Job, JobStore
from t2i.worker.journal import Journal, JournalError
from t2i.worker.retention import Pruner


_worker_names = iter(range(1_000_000))


def make(tmp_path: Path, clock: FakeClock, comfy_output_dir: Path | None = None, **limits):
    settings = dict(interval=60, task_ttl=3600, image_max_age=86400, image_max_count=1000, image_max_bytes=None)
    settings.update(limits)
    store = JobStore(clock=clock)
    images = ImageStore(tmp_path / "images", clock=clock)
    images.ensure_directory()
    name = f"test-retention-{next(_worker_names)}"
    pruner = Pruner(store, images, RetentionConfig(**settings), comfy_output_dir, name, clock=clock)
    return store, images, pruner


async def finished_job(store: JobStore, images: ImageStore | None = None, phase: str = COMPLETED,
                       data: bytes = b"x" * 100) -> Job:
    """A job that finishes now (the store's clock), with one saved image when ``images`` is given;
    returns the job as the store now holds it."""
    job = store.add(Job(str(uuid.uuid4()), created_at=store.clock()))
    names: tuple[str, ...] = ()
    if images is not None:
        names = (await images.save(ImageStore.filename_for(job.prompt_id, 0), data),)
    return store.update(job, phase=phase, images=names)


def pruned(worker: str, kind: str) -> float:
    return REGISTRY.get_sample_value("t2i_pruned_total", {"worker": worker, "kind": kind}) or 0.0


# --- task states ---------------------------------------------------------------

@pytest.mark.gen_test
async def test_task_ttl_boundaries(tmp_path):
    clock = FakeClock()
    store, images, pruner = make(tmp_path, clock, task_ttl=3600)
    job = await finished_job(store)
    since = store.seq

    clock.advance(3599.999)
    report = await pruner.prune_once()
    assert report["tasks_removed"] == 0
    assert store.get(job.prompt_id) is job

    clock.advance(0.002)  # 3600.001 s after it finished
    report = await pruner.prune_once()
    assert report["tasks_removed"] == 1
    assert store.get(job.prompt_id) is None
    assert store.was_removed(job.prompt_id)
    full, changed, removed = store.changes_since(since)
    assert not full and removed == [job.prompt_id]
    assert pruned(pruner.worker_name, "tasks") == 1


@pytest.mark.gen_test
async def test_unfinished_jobs_are_never_pruned(tmp_path):
    clock = FakeClock()
    store, images, pruner = make(tmp_path, clock, task_ttl=0)
    pending = store.add(Job(str(uuid.uuid4()), created_at=clock()))
    running = store.add(Job(str(uuid.uuid4()), created_at=clock()))
    store.update(running, phase=STARTED, started_at=clock())
    failed = await finished_job(store, phase=FAILED)

    clock.advance(10 * 86400)
    report = await pruner.prune_once()
    assert report["tasks_removed"] == 1
    assert store.get(pending.prompt_id).status == PENDING
    assert store.get(running.prompt_id).status == RUNNING
    assert store.get(failed.prompt_id) is None


@pytest.mark.gen_test
async def test_a_task_state_is_removed_from_the_journal_before_anyone_sees_it_gone(tmp_path):
    """A pruned job answers 410 only once its removal is on disk: a worker killed right after the
    410 restarts without the job (it came back completed, now and then, when the journal's delete
    waited for company)."""
    clock = FakeClock()
    journal = Journal(tmp_path / "state")
    await journal.open()
    store = JobStore(clock=clock, on_remove=journal.forget)
    images = ImageStore(tmp_path / "images", clock=clock)
    pruner = Pruner(store, images, RetentionConfig(task_ttl=0), None, f"test-retention-{next(_worker_names)}",
                    clock=clock, record_removal=journal.forget_now)
    job = await finished_job(store)
    journal.save(job)
    await journal.flush()
    seen: list[tuple[bool, list[str]]] = []

    async def recording(prompt_ids):
        seen.append((store.get(job.prompt_id) is not None, prompt_ids))
        await journal.forget_now(prompt_ids)

    pruner.record_removal = recording
    clock.advance(1)
    assert (await pruner.prune_once())["tasks_removed"] == 1
    assert seen == [(True, [job.prompt_id])] and store.get(job.prompt_id) is None
    await journal.close()
    again = Journal(tmp_path / "state")
    jobs, tombstones = await again.open()  # what a restarted worker reads
    assert jobs == [] and tombstones == [job.prompt_id]
    await again.close()


@pytest.mark.gen_test
async def test_a_task_state_whose_removal_cannot_be_journaled_stays(tmp_path):
    clock = FakeClock()
    store, images, pruner = make(tmp_path, clock, task_ttl=0)
    job = await finished_job(store)

    async def failing(prompt_ids):
        raise JournalError("the job journal cannot be written: disk full")

    pruner.record_removal = failing
    clock.advance(1)
    report = await pruner.prune_once()
    assert report["tasks_removed"] == 0 and "disk full" in report["errors"][0]
    assert store.get(job.prompt_id) is not None  # still answers: nothing was promised gone


@pytest.mark.gen_test
async def test_many_tasks_removed_in_batches_oldest_first(tmp_path):
    clock = FakeClock()
    store, images, pruner = make(tmp_path, clock, task_ttl=100)
    jobs = []
    for _ in range(2 * retention.TASK_BATCH + 7):
        jobs.append(await finished_job(store))
        clock.advance(0.01)
    # Finished at T0 .. T0+10.07; cut off at T0+5: the older half goes.
    clock.now = T0 + 105
    report = await pruner.prune_once()
    kept = [job for job in jobs if store.get(job.prompt_id) is not None]
    assert report["tasks_removed"] == len(jobs) - len(kept)
    assert all(job.finished_at >= T0 + 5 for job in kept)
    assert all(job.finished_at < T0 + 5 for job in jobs if job not in kept)


@pytest.mark.gen_test
async def test_task_state_removal_leaves_its_image(tmp_path):
    clock = FakeClock()
    store, images, pruner = make(tmp_path, clock, task_ttl=60)
    job = await finished_job(store, images)
    name = job.images[0]
    clock.advance(61)
    report = await pruner.prune_once()
    assert report["tasks_removed"] == 1 and report["images_removed"] == 0
    assert name in images.index
    assert (images.directory / name).exists()

    # Later the image rules take it; no job to mark any more.
    clock.advance(86400)
    report = await pruner.prune_once()
    assert report["images_removed"] == 1 and report["errors"] == []
    assert not (images.directory / name).exists()


# --- images --------------------------------------------------------------------

@pytest.mark.gen_test
async def test_image_max_age(tmp_path):
    clock = FakeClock()
    store, images, pruner = make(tmp_path, clock, task_ttl=10**9, image_max_age=1000)
    old = await finished_job(store, images)
    clock.advance(500)
    young = await finished_job(store, images)

    clock.advance(500)  # old is exactly 1000 s old: kept
    assert (await pruner.prune_once())["images_removed"] == 0
    clock.advance(0.001)
    report = await pruner.prune_once()
    assert report["images_removed"] == 1
    assert report["bytes_removed"] == 100
    assert list(images.index) == [young.images[0]]
    assert not (images.directory / old.images[0]).exists()
    assert (images.directory / young.images[0]).exists()


@pytest.mark.gen_test
async def test_image_max_count_oldest_first(tmp_path):
    clock = FakeClock()
    store, images, pruner = make(tmp_path, clock, task_ttl=10**9, image_max_count=3)
    jobs = []
    for _ in range(5):
        jobs.append(await finished_job(store, images))
        clock.advance(1)
    report = await pruner.prune_once()
    assert report["images_removed"] == 2 and report["bytes_removed"] == 200
    assert list(images.index) == [job.images[0] for job in jobs[2:]]
    for job in jobs[:2]:
        assert not (images.directory / job.images[0]).exists()
        assert store.get(job.prompt_id).image_expired
    for job in jobs[2:]:
        assert (images.directory / job.images[0]).exists()
        assert store.get(job.prompt_id) is job and not job.image_expired
    assert pruned(pruner.worker_name, "images") == 2
    assert REGISTRY.get_sample_value("t2i_pruned_bytes_total", {"worker": pruner.worker_name}) == 200


@pytest.mark.gen_test
async def test_image_max_bytes_oldest_first(tmp_path):
    clock = FakeClock()
    store, images, pruner = make(tmp_path, clock, task_ttl=10**9, image_max_bytes=250)
    sizes = [100, 50, 100, 100]
    jobs = []
    for size in sizes:
        jobs.append(await finished_job(store, images, data=b"y" * size))
        clock.advance(1)
    # 350 bytes: dropping the oldest (100) leaves 250, within the limit.
    report = await pruner.prune_once()
    assert report["images_removed"] == 1 and report["bytes_removed"] == 100
    assert images.total_bytes == 250
    assert list(images.index) == [job.images[0] for job in jobs[1:]]
    # A limit of exactly the total removes nothing more.
    assert (await pruner.prune_once())["images_removed"] == 0


@pytest.mark.gen_test
async def test_out_of_order_index_is_pruned_by_mtime(tmp_path):
    clock = FakeClock()
    store, images, pruner = make(tmp_path, clock, task_ttl=10**9, image_max_count=2)
    jobs = [await finished_job(store, images) for _ in range(3)]
    # Pretend the index was built out of age order: the last entry is the oldest.
    names = [job.images[0] for job in jobs]
    images.index[names[0]] = (100, T0 + 2)
    images.index[names[1]] = (100, T0 + 3)
    images.index[names[2]] = (100, T0 + 1)
    report = await pruner.prune_once()
    assert report["images_removed"] == 1
    assert names[2] not in images.index and store.get(jobs[2].prompt_id).image_expired


@pytest.mark.gen_test
async def test_image_expiry_marks_held_job(tmp_path):
    clock = FakeClock()
    store, images, pruner = make(tmp_path, clock, task_ttl=10**9, image_max_age=100)
    job = await finished_job(store, images)
    version = job.version
    seq = store.seq
    assert store.get(job.prompt_id).to_json("http://w")["image_url"].endswith(job.images[0])

    clock.advance(101)
    await pruner.prune_once()
    state = store.get(job.prompt_id).to_json("http://w")
    assert state["status"] == COMPLETED
    assert state["image_expired"] is True
    assert state["image_url"] is None and state["image_urls"] == []
    expired = store.get(job.prompt_id)
    assert expired.version > version
    full, changed, removed = store.changes_since(seq)
    assert not full and changed == [expired] and removed == []

    # Nothing left to do: the next pass changes nothing.
    version = expired.version
    await pruner.prune_once()
    assert store.get(job.prompt_id) is expired and expired.version == version


@pytest.mark.gen_test
async def test_image_of_a_job_not_yet_showing_it_does_not_expire_the_job(tmp_path):
    clock = FakeClock()
    store, images, pruner = make(tmp_path, clock, task_ttl=10**9, image_max_count=0)
    job = store.add(Job(str(uuid.uuid4()), created_at=clock()))
    job = store.update(job, phase=STARTED)
    await images.save(ImageStore.filename_for(job.prompt_id, 0), b"p")  # saved, job not yet updated
    version = job.version
    report = await pruner.prune_once()
    assert report["images_removed"] == 1
    assert store.get(job.prompt_id) is job and not job.image_expired and job.version == version


@pytest.mark.gen_test
async def test_files_from_a_previous_run(tmp_path):
    clock = FakeClock()
    store, images, pruner = make(tmp_path, clock, task_ttl=10**9, image_max_age=86400, image_max_count=3)
    ages = {str(uuid.uuid4()): age for age in (3 * 86400, 2 * 86400, 3600, 1800, 60)}
    for prompt_id, age in ages.items():
        path = images.directory / ImageStore.filename_for(prompt_id, 0)
        path.write_bytes(b"z" * 10)
        os.utime(path, (clock() - age, clock() - age))
    (images.directory / "notes.txt").write_text("not an image")
    (images.directory / ".tmp-k1ll3d_w.part").write_bytes(b"half an image")  # a write cut short by a kill
    assert await images.take_stock() == 5
    assert not (images.directory / ".tmp-k1ll3d_w.part").exists()  # removed at start-up

    report = await pruner.prune_once()
    # Two are older than a day; of the three left, the count limit keeps them all.
    assert report["images_removed"] == 2 and report["bytes_removed"] == 20
    young = sorted(ImageStore.filename_for(p, 0) for p, age in ages.items() if age < 86400)
    assert sorted(images.index) == young
    assert sorted(p.name for p in images.directory.iterdir()) == sorted(young + ["notes.txt"])

    # They age like the rest.
    clock.advance(86400 - 3600 + 1)
    report = await pruner.prune_once()
    assert report["images_removed"] == 1
    assert len(images.index) == 2


@pytest.mark.gen_test
async def test_file_deleted_by_hand_meanwhile(tmp_path):
    clock = FakeClock()
    store, images, pruner = make(tmp_path, clock, task_ttl=10**9, image_max_age=100)
    job = await finished_job(store, images)
    (images.directory / job.images[0]).unlink()
    clock.advance(101)
    report = await pruner.prune_once()
    assert report["errors"] == []
    assert report["images_removed"] == 1 and report["bytes_removed"] == 0
    assert images.index == {}
    assert store.get(job.prompt_id).image_expired


@pytest.mark.gen_test
async def test_read_only_images_folder(tmp_path, monkeypatch, caplog):
    clock = FakeClock()
    store, images, pruner = make(tmp_path, clock, task_ttl=10**9, image_max_age=100)
    jobs = [await finished_job(store, images) for _ in range(5)]
    clock.advance(101)
    images.directory.chmod(0o500)
    if os.geteuid() == 0:
        # root ignores directory permissions, so chmod alone does not make unlink fail:
        # fail it the way a read-only folder does for everyone else.
        real_unlink = os.unlink
        directory = str(images.directory)

        def read_only_unlink(path, *args, **kwargs):
            if os.path.dirname(os.fspath(path)) == directory:
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real_unlink(path, *args, **kwargs)

        monkeypatch.setattr(os, "unlink", read_only_unlink)
    try:
        with caplog.at_level(logging.INFO, logger="t2i.worker.retention"):
            report = await pruner.prune_once()
    finally:
        images.directory.chmod(0o700)
        monkeypatch.undo()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]  # one line, not one per file
    assert len(report["errors"]) == 1 and "5 of 5" in report["errors"][0]
    assert report["images_removed"] == 0
    assert len(images.index) == 5  # kept, so the next pass retries them
    assert not any(store.get(job.prompt_id).image_expired for job in jobs)
    assert pruner.last_report is report

    # Writable again: the next pass removes them.
    report = await pruner.prune_once()
    assert report["errors"] == [] and report["images_removed"] == 5
    assert all(store.get(job.prompt_id).image_expired for job in jobs)


@pytest.mark.gen_test
async def test_unlinks_are_batched_off_the_loop(tmp_path, monkeypatch):
    clock = FakeClock()
    store, images, pruner = make(tmp_path, clock, task_ttl=10**9, image_max_count=0)
    for _ in range(450):
        await finished_job(store, images, data=b"q")
    calls = []
    real = retention._unlink_batch

    def spy(directory, names):
        calls.append((threading.get_ident(), len(names)))
        return real(directory, names)

    loop_thread = threading.get_ident()
    monkeypatch.setattr(retention, "_unlink_batch", spy)
    report = await pruner.prune_once()
    assert report["images_removed"] == 450
    assert [n for _, n in calls] == [200, 200, 50]
    assert all(thread != loop_thread for thread, _ in calls)


# --- ComfyUI's output folder -------------------------------------------------

@pytest.mark.gen_test
async def test_comfyui_output_files(tmp_path):
    clock = FakeClock()
    comfy = tmp_path / "comfy-output"
    comfy.mkdir()
    store, images, pruner = make(tmp_path, clock, comfy, task_ttl=10**9, image_max_age=86400)
    done = await finished_job(store, images)
    running = store.add(Job(str(uuid.uuid4()), created_at=clock()))
    store.update(running, phase=STARTED)
    collecting = store.add(Job(str(uuid.uuid4()), created_at=clock()))
    store.update(collecting, phase=COLLECTING)
    unknown = str(uuid.uuid4())

    def put(name: str, age: float) -> Path:
        path = comfy / name
        path.write_bytes(b"c")
        os.utime(path, (clock() - age, clock() - age))
        return path

    gone = [
        put(f"t2i_{done.prompt_id}_00001_.png", 61),        # finished, copied, past the grace
        put(f"t2i_{unknown}_00001_.jpg", 61),               # job no longer held
    ]
    kept = [
        put(f"t2i_{done.prompt_id}_00002_.png", 30),        # within the grace
        put(f"t2i_{running.prompt_id}_00001_.png", 3600),   # job still running
        # A held, unfinished job's file is not collected yet: never removed, even older than
        # image_max_age (a job the journal brought back after a restart may be days old).
        put(f"t2i_{running.prompt_id}_00002_.webp", 2 * 86400),
        put(f"t2i_{collecting.prompt_id}_00001_.png", 2 * 86400),   # being copied into images/ right now
        # Not t2i's: never touched, however old.
        put("ComfyUI_00001_.png", 10 * 86400),
        put("t2i_00001_.png", 10 * 86400),
        put(f"t2i_{unknown}_00001_.png.txt", 10 * 86400),
        put(f"t2i_{unknown}_0001_.png", 10 * 86400),
        put(f"t2i_{unknown.upper()}_00001_.png", 10 * 86400),
        put(f"t2i_{uuid.uuid1()}_00001_.png", 10 * 86400),   # not a uuid4
        put(f"x_t2i_{unknown}_00001_.png", 10 * 86400),
    ]
    sub = comfy / f"t2i_{unknown}_00003_.png"    # a directory with a matching name
    sub.mkdir()
    link_target = put("target.png", 10 * 86400)
    link = comfy / f"t2i_{unknown}_00004_.png"   # a symlink with a matching name
    link.symlink_to(link_target)
    os.utime(link, (clock() - 10 * 86400,) * 2, follow_symlinks=False)
    (comfy / "nested").mkdir()
    nested = put(f"nested/t2i_{unknown}_00005_.png", 10 * 86400)

    report = await pruner.prune_once()
    assert report["comfyui_files_removed"] == 2, report
    assert report["errors"] == []
    for path in gone:
        assert not path.exists(), path.name
    for path in kept + [link_target, nested]:
        assert path.exists(), path.name
    assert sub.is_dir() and link.is_symlink()
    assert pruned(pruner.worker_name, "comfyui_files") == 2
    # The job's own image is untouched by this.
    assert (images.directory / done.images[0]).exists()


@pytest.mark.gen_test
async def test_missing_comfyui_output_dir_is_quiet(tmp_path):
    clock = FakeClock()
    store, images, pruner = make(tmp_path, clock, tmp_path / "nowhere")
    report = await pruner.prune_once()
    assert report["errors"] == [] and report["comfyui_files_removed"] == 0


# --- passes ------------------------------------------------------------------

@pytest.mark.gen_test
async def test_report_shape_and_last_report(tmp_path):
    clock = FakeClock()
    store, images, pruner = make(tmp_path, clock)
    assert pruner.last_report is None
    report = await pruner.prune_once()
    assert set(report) == {"at", "duration", "tasks_removed", "images_removed", "bytes_removed",
                           "comfyui_files_removed", "comfyui_inputs_removed", "errors"}
    assert report["at"] == T0 and report["duration"] >= 0
    assert pruner.last_report is report


@pytest.mark.gen_test
async def test_tick_is_skipped_while_a_pass_runs(tmp_path, caplog):
    clock = FakeClock()
    store, images, pruner = make(tmp_path, clock, image_max_count=0)
    for _ in range(3):
        await finished_job(store, images)
    release = asyncio.Event()
    real_prune_images = pruner._prune_images

    async def slow_prune_images(report, slicer):
        await release.wait()
        await real_prune_images(report, slicer)

    pruner._prune_images = slow_prune_images
    with caplog.at_level(logging.DEBUG, logger="t2i.worker.retention"):
        pruner._tick()
        first = pruner._task
        await asyncio.sleep(0)
        pruner._tick()  # the next tick while the first pass waits
        assert pruner._task is first
        assert any("skipping" in r.getMessage() for r in caplog.records)
        release.set()
        await first
    assert pruner.last_report["images_removed"] == 3


@pytest.mark.gen_test
async def test_start_runs_a_pass_now_and_stop_stops(tmp_path):
    clock = FakeClock()
    store, images, pruner = make(tmp_path, clock, task_ttl=0)
    await finished_job(store)
    clock.advance(1)
    pruner.start()
    try:
        assert pruner._callback is not None and pruner._callback.is_running()
        await pruner._task
        assert pruner.last_report["tasks_removed"] == 1
    finally:
        pruner.stop()
    assert pruner._callback is None


@pytest.mark.gen_test
async def test_a_failing_step_is_reported_and_the_rest_runs(tmp_path, monkeypatch, caplog):
    clock = FakeClock()
    store, images, pruner = make(tmp_path, clock, task_ttl=0, image_max_count=0)
    job = await finished_job(store, images)
    clock.advance(1)

    def broken(cutoff):
        raise RuntimeError("store on fire")

    monkeypatch.setattr(store, "finished_before", broken)
    with caplog.at_level(logging.ERROR, logger="t2i.worker.retention"):
        report = await pruner.prune_once()
    assert report["errors"] == ["prune_tasks: store on fire"]
    assert report["images_removed"] == 1 and store.get(job.prompt_id).image_expired
    assert any(r.exc_info for r in caplog.records)


@pytest.mark.gen_test(timeout=60)
async def test_pass_yields_to_the_loop(tmp_path):
    """A big pass lets other callbacks run often (the bench measures the exact stall)."""
    clock = FakeClock()
    store, images, pruner = make(tmp_path, clock, task_ttl=0, image_max_count=0)
    for _ in range(20000):
        job = store.add(Job(str(uuid.uuid4()), created_at=clock()))
        store.update(job, phase=COMPLETED)
    for _ in range(300):
        await finished_job(store, images, data=b"t")
    clock.advance(1)
    turns = 0
    stop = False

    async def watch():
        nonlocal turns
        while not stop:
            await asyncio.sleep(0.001)
            turns += 1

    watcher = asyncio.ensure_future(watch())
    await asyncio.sleep(0.005)
    report = await pruner.prune_once()
    stop = True
    await watcher
    assert report["tasks_removed"] == 20300 and report["images_removed"] == 300
    # The other task ran again and again during the pass: it was sliced. (How long each slice
    # took is a speed target: bench/prune_bench.py measures it; tests do not time things.)
    assert turns >= 3, turns


# --- through the worker's HTTP API ---------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_pruned_job_and_image_are_gone_over_http(tmp_path):
    from support.cluster import start_worker
    from support.net import free_port
    from tornado.httpclient import AsyncHTTPClient

    # No ComfyUI needed: the job and its image are put where the runner would put them.
    worker = await start_worker(tmp_path, f"http://127.0.0.1:{free_port()}",
                                retention={"interval": 3600, "task_ttl": 0, "image_max_count": 0})
    http = AsyncHTTPClient()

    async def get(path: str):
        return await http.fetch(worker.url + path, raise_error=False, request_timeout=10)

    try:
        assert isinstance(worker.pruner, Pruner)
        job = await finished_job(worker.store, worker.images, data=b"\x89PNG\r\n\x1a\n tiny")
        name = job.images[0]
        assert (await get(f"/status/{job.prompt_id}")).code == 200
        assert (await get(f"/images/{name}")).code == 200

        report = await worker.pruner.prune_once()
        assert report["tasks_removed"] == 1 and report["images_removed"] == 1, report
        assert (await get(f"/status/{job.prompt_id}")).code == 410  # the worker remembers it pruned it
        image = await get(f"/images/{name}")
        assert image.code == 404 and image.headers["Content-Type"].startswith("application/json")
        health = await get("/health")
        assert json.loads(health.body)["prune"] == report
    finally:
        await worker.stop()
