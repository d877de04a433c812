"""JobStore: versions, the change feed's contract, and long-poll waits."""

import asyncio

import pytest

from support.timing import FakeClock
from t2i.worker.jobs import COMPLETED, STARTED, SUBMITTING, Job, JobStore


def make_store(n=0, clock=None, **kwargs):
    store = JobStore(clock=clock or FakeClock(1000.0), **kwargs)
    jobs = [store.add(Job(f"job-{i}", created_at=store.clock())) for i in range(n)]
    return store, jobs


def test_versions_grow_with_every_change_and_not_without_one():
    store, (job,) = make_store(1)
    first = job.version
    running = store.update(job, phase=STARTED)
    assert running is not None and running.version > first
    assert store.get("job-0") is running
    assert job.phase == SUBMITTING and job.version == first  # the old copy is left as it was
    before = running.version
    assert store.update(running, phase=STARTED) is None  # no change, no new version
    assert store.get("job-0") is running and running.version == before


def test_versions_grow_across_a_restart():
    clock = FakeClock(1000.0)
    old, (job,) = make_store(1, clock=clock)
    old.update(job, phase=STARTED)
    clock.advance(1)
    new, (job,) = make_store(1, clock=clock)  # a new process: a new store, the clock moved on
    assert new.epoch != old.epoch
    assert new.seq > old.seq and job.version > old.get("job-0").version


def test_feed_lists_changes_after_a_cursor_and_removals():
    store, jobs = make_store(3)
    full, listed, removed = store.changes_since(0)
    assert full and {j.prompt_id for j in listed} == {"job-0", "job-1", "job-2"} and removed == []
    cursor = store.seq
    running = store.update(jobs[1], phase=STARTED)
    store.remove(["job-2"])
    full, listed, removed = store.changes_since(cursor)
    assert not full
    assert [j.prompt_id for j in listed] == ["job-1"] and listed[0] is running
    assert removed == ["job-2"]
    assert store.changes_since(store.seq) == (False, [], [])


def test_feed_falls_back_to_a_full_list_when_the_cursor_is_too_old_or_ahead():
    store, jobs = make_store(5, tombstone_limit=2)
    cursor = store.seq
    store.remove(["job-0", "job-1", "job-2"])  # job-0's tombstone is forgotten
    full, listed, _ = store.changes_since(cursor)
    assert full and {j.prompt_id for j in listed} == {"job-3", "job-4"}
    # A cursor from before a restart (ahead of this store) also gets the full list.
    assert store.changes_since(store.seq + 100)[0] is True


def test_finished_jobs_are_listed_in_finish_order_for_pruning():
    store, jobs = make_store(3)
    store.clock.now = 1010
    done = store.update(jobs[2], phase=COMPLETED)
    store.clock.now = 1020
    store.update(jobs[0], phase=COMPLETED)
    assert done.finished_at == 1010 and store.get("job-0").finished_at == 1020
    assert list(store.finished_before(1015)) == ["job-2"]
    assert list(store.finished_before(2000)) == ["job-2", "job-0"]


def test_unfinished_jobs_follow_every_change_in_the_order_they_were_added():
    store, jobs = make_store(4)
    assert [job.prompt_id for job in store.unfinished()] == ["job-0", "job-1", "job-2", "job-3"]
    running = store.update(jobs[1], phase=STARTED)
    assert store.unfinished()[1] is running  # the current copy, in its place
    store.update(jobs[2], phase=COMPLETED)
    store.remove(["job-3"])
    assert [job.prompt_id for job in store.unfinished()] == ["job-0", "job-1"]
    store.put(store.get("job-2").evolve(phase=SUBMITTING))  # finished, then unfinished again: its old place
    assert [job.prompt_id for job in store.unfinished()] == ["job-0", "job-1", "job-2"]
    store.add(Job("job-4", created_at=store.clock()))
    assert [job.prompt_id for job in store.unfinished()] == ["job-0", "job-1", "job-2", "job-4"]
    assert store.unfinished() == [job for job in store.all() if not job.finished]


def test_status_json_hides_the_image_once_expired():
    store, (job,) = make_store(1)
    job = store.update(job, phase=COMPLETED, images=("job-0_0.png",))
    state = job.to_json("http://w:1")
    assert state["image_url"] == "http://w:1/images/job-0_0.png"
    job = store.update(job, image_expired=True)
    state = job.to_json("http://w:1")
    assert state["image_url"] is None and state["image_expired"] is True


@pytest.mark.gen_test(timeout=5)
async def test_wait_job_returns_on_change_and_times_out_otherwise():
    store, (job,) = make_store(1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await store.wait_job("job-0", job.version, 0.05)
    assert loop.time() - started >= 0.04
    waiter = asyncio.ensure_future(store.wait_job("job-0", job.version, 5))
    await asyncio.sleep(0.01)
    store.update(job, phase=STARTED)
    await asyncio.wait_for(waiter, 1)
    # An already newer version returns at once.
    await asyncio.wait_for(store.wait_job("job-0", 0, 5), 0.1)


@pytest.mark.gen_test(timeout=5)
async def test_wait_ending_wakes_on_the_end_or_removal_not_on_progress():
    store, (job, other) = make_store(2)
    ending = asyncio.ensure_future(store.wait_ending("job-0", 5))
    removal = asyncio.ensure_future(store.wait_ending("job-1", 5))
    await asyncio.sleep(0)  # both waiting
    running = store.update(job, phase=STARTED)
    store.update(running, progress_value=1, progress_max=3)
    for _ in range(5):  # a woken waiter would be done after a few turns
        await asyncio.sleep(0)
    assert not ending.done() and not removal.done()
    store.update(store.get("job-0"), phase=COMPLETED)
    store.remove(["job-1"])
    await asyncio.wait_for(asyncio.gather(ending, removal), 1)
    # Already ended, or unknown: at once.
    await asyncio.wait_for(store.wait_ending("job-0", 5), 0.1)
    await asyncio.wait_for(store.wait_ending("job-1", 5), 0.1)


@pytest.mark.gen_test(timeout=5)
async def test_wait_feed_wakes_on_any_change():
    store, (job,) = make_store(1)
    waiter = asyncio.ensure_future(store.wait_feed(store.seq, 5))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    store.remove(["job-0"])
    await asyncio.wait_for(waiter, 1)
