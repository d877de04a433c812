"""The streamed change feed (``GET /jobs?stream=1``): the worker sends each change as it happens on one
long answer, the scheduler's mirror follows it, falls back to long-polls for a worker that answers plain
pages, and lists again after a worker restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest
from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from support.cluster import CountingRoute, SchedulerCluster, WorkerCluster, call, start_scheduler
from support.timing import until
from t2i.scheduler.mirror import Mirror
from t2i.worker import handlers as worker_handlers
from test_scheduler_feed import FakeFeed, served


class Stream:
    """One ``GET /jobs?stream=1`` read line by line as it arrives (``lines``: decoded, ``raw``: bytes)."""

    def __init__(self, url: str):
        self.url = url
        self.rest = b""
        self.raw: list[bytes] = []
        self.lines: list[dict] = []
        self.headers: list[str] = []

    def _data(self, chunk: bytes) -> None:
        lines = (self.rest + chunk).split(b"\n")
        self.rest = lines.pop()
        self.raw += lines
        self.lines += [json.loads(line) for line in lines]

    def start(self):
        request = HTTPRequest(self.url, request_timeout=30, streaming_callback=self._data,
                              header_callback=self.headers.append)
        return AsyncHTTPClient().fetch(request, raise_error=False)

    def marks(self) -> list[dict]:
        return [line for line in self.lines if "prompt_id" not in line]


@pytest.mark.gen_test(timeout=30)
async def test_a_worker_streams_each_change_then_a_mark(tmp_path):
    async with WorkerCluster(tmp_path, name="gpu-a") as w:
        seq = w.worker.store.seq
        stream = Stream(f"{w.url}/jobs?since={seq}&wait=3&stream=1")
        done = stream.start()
        await until(lambda: stream.marks(), what="the first mark, sent at once")
        assert stream.marks()[0] == {"epoch": w.worker.store.epoch, "seq": seq, "full": False, "jobs": [],
                                    "removed": []}
        assert any(h.lower().startswith("content-type: application/x-ndjson") for h in stream.headers)
        prompt_id = await w.submit({"prompt": "a streamed fox", "steps": 3})
        await w.wait(prompt_id)
        await until(lambda: any(line.get("status") == "completed" for line in stream.lines), what="completed")
        jobs = [line for line in stream.lines if line.get("prompt_id") == prompt_id]
        # The new job at once and its ending, in order, each line the job's /status object, each batch closed
        # by a mark (what came between may have been held and superseded: test_progress_is_held_...).
        versions = [job["version"] for job in jobs]
        assert versions == sorted(versions) and jobs[0]["status"] == "pending" and jobs[-1]["status"] == "completed"
        last_line = stream.raw[max(i for i, line in enumerate(stream.lines) if line.get("prompt_id") == prompt_id)]
        assert last_line == (await call("GET", f"{w.url}/status/{prompt_id}")).body
        assert "prompt_id" not in stream.lines[-1] and stream.lines[-1]["seq"] == w.worker.store.seq
        response = await done  # ends by itself after wait
        assert response.code == 200


def batches(stream: Stream, prompt_id: str) -> list[list[str]]:
    """The job's statuses in each batch of the stream (the lines between two marks), batches without it left out."""
    found, batch = [], []
    for line in stream.lines:
        if "prompt_id" not in line:
            found += [batch] if batch else []
            batch = []
        elif line["prompt_id"] == prompt_id:
            batch.append(line["status"])
    return found


@pytest.mark.gen_test(timeout=30)
async def test_progress_is_held_back_and_a_new_job_and_its_ending_go_at_once(tmp_path):
    async with WorkerCluster(tmp_path, name="gpu-a") as w:
        w.worker.store.feed_hold = 600  # longer than the test: only something urgent ends a hold
        stream = Stream(f"{w.url}/jobs?since={w.worker.store.seq}&wait=30&stream=1")
        stream.start()
        await until(lambda: stream.marks(), what="the first mark")
        prompt_id = await w.submit({"prompt": "a held fox", "steps": 3})
        await until(lambda: batches(stream, prompt_id), what="the new job, sent at once")
        await w.wait(prompt_id)
        await until(lambda: any(line.get("status") == "completed" for line in stream.lines), what="the ending, at once")
        # Its start and three steps were held, then superseded by the ending: one line for each urgent change.
        assert batches(stream, prompt_id) == [["pending"], ["completed"]]


@pytest.mark.gen_test(timeout=30)
async def test_a_held_change_still_comes_within_the_hold(tmp_path):
    async with WorkerCluster(tmp_path, sim={"step_time": 0.05}, name="gpu-a") as w:
        w.worker.store.feed_hold = 0.05
        stream = Stream(f"{w.url}/jobs?since={w.worker.store.seq}&wait=30&stream=1")
        stream.start()
        prompt_id = await w.submit({"prompt": "a slow held fox", "steps": 150})
        await until(lambda: any(line.get("prompt_id") == prompt_id and (line.get("progress") or {}).get("value")
                                for line in stream.lines), what="its progress, with nothing urgent after it")
        assert (await call("POST", f"{w.url}/cancel/{prompt_id}", {})).code == 200
        await until(lambda: "cancelled" in sum(batches(stream, prompt_id), []), what="the cancel, at once")


@pytest.mark.gen_test(timeout=30)
async def test_a_stream_from_a_forgotten_seq_says_full_and_ends(tmp_path):
    async with WorkerCluster(tmp_path, name="gpu-a") as w:
        stream = Stream(f"{w.url}/jobs?since=0&wait=30&stream=1")
        response = await stream.start()
        assert response.code == 200
        assert stream.lines == [{"epoch": w.worker.store.epoch, "seq": w.worker.store.seq, "full": True,
                                 "jobs": [], "removed": []}]
        # A follower of an earlier run of the worker (another epoch) is told at once, whatever its since.
        stream = Stream(f"{w.url}/jobs?since={w.worker.store.seq}&wait=30&stream=1&epoch=an-earlier-run")
        assert (await stream.start()).code == 200 and [line["full"] for line in stream.lines] == [True]
        bad = await call("GET", f"{w.url}/jobs?stream=2")
        assert bad.code == 400 and bad.json["field"] == "stream"


@pytest.mark.gen_test(timeout=40)
async def test_the_mirror_follows_a_stream_with_one_request_for_many_changes(tmp_path, monkeypatch):
    feeds = CountingRoute(monkeypatch, worker_handlers.JobsHandler, "get")
    async with WorkerCluster(tmp_path / "w", name="gpu-a") as w:
        scheduler = await start_scheduler(tmp_path / "s", [w.worker])
        try:
            await until(lambda: any("stream=1" in uri for uri in feeds.uris), what="a stream")
            before = len(feeds)
            ids = [await w.submit({"prompt": f"fox {i}", "steps": 2}) for i in range(4)]
            for prompt_id in ids:
                await w.wait(prompt_id)
            await until(lambda: all(state_of(scheduler.mirror, pid) == "completed" for pid in ids),
                        what="the endings in the mirror")
            # Four jobs, each changing five or more times, reached the mirror over the stream already open.
            assert len(feeds) - before <= 1, feeds.uris[before:]
            for prompt_id in ids:  # the mirror answers the worker's very bytes
                mirrored = await call("GET", f"{scheduler.url}/status/{prompt_id}")
                assert mirrored.body == (await call("GET", f"{w.url}/status/{prompt_id}")).body
            assert scheduler.mirror.counts("gpu-a") == (0, 0)
        finally:
            await scheduler.stop()


@pytest.mark.gen_test(timeout=20)
async def test_a_worker_that_does_not_stream_is_long_polled():
    async with served(FakeFeed()) as fake_feed:  # answers plain pages, whatever `stream` says
        fake_feed.put("job-1", "pending")
        mirror = Mirror(feed_wait=5)
        feed = mirror.follow("w", lambda: fake_feed.url)
        try:
            await until(lambda: feed.up, what="listed")
            await until(lambda: any(q.get("stream") == "1" for q in fake_feed.queries), what="a stream asked for")
            fake_feed.put("job-1", "completed")
            fake_feed.put("job-2", "pending")
            await until(lambda: mirror.get("job-2") is not None, what="a change after the listing")
            assert mirror.get("job-1").state == "completed" and mirror.counts("w") == (1, 0)
            assert feed.up
        finally:
            await mirror.stop()


class StreamingFeed(FakeFeed):
    """FakeFeed that also streams (``stream=1``) as t2i workers do: changed jobs, then a mark; again on
    each change until ``wait`` has passed."""

    def app(self) -> web.Application:
        feed = self
        plain = super().app().wildcard_router.rules[0].target

        class Jobs(plain):
            async def get(self):
                if self.get_argument("stream", "0") != "1":
                    return await super().get()
                feed.queries.append({k: self.get_argument(k) for k in self.request.arguments})
                since, deadline = int(self.get_argument("since")), time.monotonic() + float(self.get_argument("wait"))
                self.set_header("Content-Type", "application/x-ndjson")
                while time.monotonic() < deadline:
                    page = feed.page(since, None, 0)
                    lines = [] if page["full"] else [json.dumps(job) for job in page["jobs"]]
                    lines.append(json.dumps({**page, "jobs": []}))
                    self.write("".join(line + "\n" for line in lines))
                    await self.flush()
                    if page["full"]:
                        break
                    since = page["seq"]
                    feed.changed.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(feed.changed.wait(), deadline - time.monotonic())
                self.finish()

        return web.Application([(r"/jobs", Jobs)])


@pytest.mark.gen_test(timeout=20)
async def test_a_stream_whose_mark_names_a_new_epoch_is_listed_again():
    async with served(StreamingFeed()) as fake_feed:
        fake_feed.put("job-1", "pending")
        mirror = Mirror(feed_wait=5)
        feed = mirror.follow("w", lambda: fake_feed.url)
        try:
            await until(lambda: any(q.get("stream") == "1" for q in fake_feed.queries), what="streaming")
            fake_feed.put("job-2", "running")
            await until(lambda: state_of(mirror, "job-2") == "running", what="a streamed change")
            listings = sum(1 for q in fake_feed.queries if q["since"] == "0")
            fake_feed.epoch = "e2"   # the worker restarted (its jobs read back from its journal)
            fake_feed.put("job-3", "pending")
            await until(lambda: feed.epoch == "e2" and state_of(mirror, "job-3") == "pending", what="listed again")
            assert sum(1 for q in fake_feed.queries if q["since"] == "0") == listings + 1
            assert state_of(mirror, "job-1") == "pending" and feed.up
        finally:
            await mirror.stop()


@pytest.mark.gen_test(timeout=60)
async def test_a_restarted_worker_is_listed_again_and_streamed(tmp_path, monkeypatch):
    feeds = CountingRoute(monkeypatch, worker_handlers.JobsHandler, "get")
    async with SchedulerCluster(tmp_path, n=1) as c:
        mirror = c.scheduler.mirror
        old_id = (await call("POST", f"{c.scheduler.url}/generate", {"prompt": "before", "steps": 1})).json["prompt_id"]
        await until(lambda: state_of(mirror, old_id) == "completed", what="the first job")
        old_epoch = mirror.feed("gpu-0").epoch
        await c.workers[0].stop()
        worker = await c.restart_worker(0)
        await until(lambda: mirror.feed("gpu-0").epoch == worker.store.epoch, timeout=20, what="listed again")
        since_restart = len(feeds)
        new_id = (await call("POST", f"{worker.url}/generate", {"prompt": "after", "steps": 1})).json["prompt_id"]
        await until(lambda: state_of(mirror, new_id) == "completed", what="a job of the restarted worker")
        assert worker.store.epoch != old_epoch and state_of(mirror, old_id) == "completed"  # from its journal
        assert any("stream=1" in uri for uri in feeds.uris[since_restart - 1:]), feeds.uris


def state_of(mirror: Mirror, prompt_id: str) -> str | None:
    entry = mirror.get(prompt_id)
    return entry.state if entry is not None else None
