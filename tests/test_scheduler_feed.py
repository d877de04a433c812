"""The mirror follows a worker's ``GET /jobs`` feed in pages: a big listing in small answers, and
nothing missed of what changes while it is read."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable

import pytest
from tornado import web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from support.cluster import CountingRoute, WorkerCluster, start_scheduler
from support.timing import until
from t2i.scheduler.mirror import Mirror


class FakeFeed:
    """A worker's job feed as t2i workers serve it (``since``, ``wait``, ``limit``, ``after``), with
    a hook the test runs after each answer."""

    def __init__(self) -> None:
        self.seq = 1000
        self.epoch = "e1"
        self.jobs: dict[str, dict[str, Any]] = {}
        self.removed: dict[str, int] = {}
        self.queries: list[dict[str, str]] = []
        self.after_answer: Callable[[dict[str, Any]], None] = lambda page: None
        self.changed = asyncio.Event()

    def put(self, prompt_id: str, status: str = "completed") -> None:
        self.seq += 1
        self.jobs[prompt_id] = {"prompt_id": prompt_id, "status": status, "version": self.seq, "workflow": "txt2img"}
        self.removed.pop(prompt_id, None)
        self.changed.set()

    def remove(self, prompt_id: str) -> None:
        self.seq += 1
        del self.jobs[prompt_id]
        self.removed[prompt_id] = self.seq
        self.changed.set()

    def page(self, since: int, limit: int | None, after: int) -> dict[str, Any]:
        full = since <= 0 or since > self.seq
        jobs = [j for j in self.jobs.values() if full or j["version"] > since]
        removed = [] if full else [p for p, seq in self.removed.items() if seq > since]
        page: dict[str, Any] = {"epoch": self.epoch, "seq": self.seq, "full": full}
        if limit is not None:
            jobs = sorted((j for j in jobs if j["version"] > after), key=lambda j: j["version"])
            more = len(jobs) > limit
            jobs = jobs[:limit]
            page.update(more=more, cursor=jobs[-1]["version"] if more else None)
            if more and not full:
                removed = [p for p in removed if self.removed[p] <= jobs[-1]["version"]]
        page.update(jobs=[dict(j) for j in jobs], removed=removed)
        return page

    def app(self) -> web.Application:
        feed = self

        class Jobs(web.RequestHandler):
            async def get(self):
                query = {k: self.get_argument(k) for k in self.request.arguments}
                feed.queries.append(query)
                since = int(query.get("since", 0))
                wait = float(query.get("wait", 0))
                if wait > 0 and since == feed.seq:
                    feed.changed.clear()
                    try:
                        await asyncio.wait_for(feed.changed.wait(), wait)
                    except asyncio.TimeoutError:
                        pass
                limit = int(query["limit"]) if "limit" in query else None
                page = feed.page(since, limit, int(query.get("after", 0)))
                self.set_header("Content-Type", "application/json")
                self.finish(json.dumps(page))
                feed.after_answer(page)

        return web.Application([(r"/jobs", Jobs)])


class served:
    """``async with served(FakeFeed()) as feed:`` the feed on a loopback port (``feed.url``)."""

    def __init__(self, feed: FakeFeed):
        self.feed = feed

    async def __aenter__(self) -> FakeFeed:
        sockets = bind_sockets(0, "127.0.0.1")
        self.server = HTTPServer(self.feed.app())
        self.server.add_sockets(sockets)
        self.feed.url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
        return self.feed

    async def __aexit__(self, *exc: Any) -> None:
        self.server.stop()
        await self.server.close_all_connections()


@pytest.mark.gen_test(timeout=20)
async def test_a_big_listing_comes_in_pages_and_changes_made_meanwhile_are_not_missed():
    async with served(FakeFeed()) as fake_feed:
        await _big_listing(fake_feed)


async def _big_listing(fake_feed: FakeFeed) -> None:
    for i in range(1234):
        fake_feed.put(f"job-{i:04d}")
    pages = []

    def meanwhile(page):
        pages.append(page)
        if len(pages) == 3:  # while the listing is read: a listed job changes, one goes, one comes
            fake_feed.put("job-0000", "failed")
            fake_feed.remove("job-0001")
            fake_feed.put("job-new", "pending")

    fake_feed.after_answer = meanwhile
    mirror = Mirror(page_size=100, feed_wait=5)
    feed = mirror.follow("w", lambda: fake_feed.url)
    try:
        await until(lambda: feed.up, what="listed")
        listing = [q for q in fake_feed.queries if int(q["since"]) == 0]
        assert len(listing) == 13 and all(q["limit"] == "100" for q in listing)  # 1,234 jobs: 13 pages
        assert [int(q["after"]) for q in listing[1:]] == [p["cursor"] for p in pages[:12]]
        assert all(len(p["jobs"]) <= 100 for p in pages)
        # Once listed, the changes go on from the first page's seq: what changed meanwhile arrives.
        await until(lambda: mirror.get("job-0001") is None, what="the removal made while listing")
        assert mirror.get("job-0000").status["status"] == "failed" and mirror.get("job-new") is not None
        assert mirror.jobs_of("w") == 1234
        # A burst of changes comes in pages too, one after the other without waiting.
        before = len(fake_feed.queries)
        for i in range(250):
            fake_feed.put(f"burst-{i}", "pending")
        await until(lambda: mirror.get("burst-249") is not None, what="the burst")
        burst = fake_feed.queries[before:]
        assert all(q["limit"] == "100" for q in burst) and mirror.counts("w") == (251, 0)
        assert sum(1 for q in burst if q.get("wait") == "0") >= 1  # more: asked again at once
    finally:
        await mirror.stop()


@pytest.mark.gen_test(timeout=20)
async def test_a_worker_restarting_while_it_is_listed_is_listed_again():
    async with served(FakeFeed()) as fake_feed:
        await _restart_while_listed(fake_feed)


async def _restart_while_listed(fake_feed: FakeFeed) -> None:
    for i in range(30):
        fake_feed.put(f"old-{i}")
    pages = []

    def restart_after_the_first_page(page):
        pages.append(page)
        if len(pages) == 1:
            fake_feed.epoch = "e2"
            fake_feed.jobs = {k: v for k, v in list(fake_feed.jobs.items())[:5]}

    fake_feed.after_answer = restart_after_the_first_page
    mirror = Mirror(page_size=10, feed_wait=5)
    feed = mirror.follow("w", lambda: fake_feed.url)
    try:
        await until(lambda: feed.up, what="listed")
        assert feed.epoch == "e2" and mirror.jobs_of("w") == 5
    finally:
        await mirror.stop()


@pytest.mark.gen_test(timeout=40)
async def test_the_scheduler_pages_a_real_workers_listing(tmp_path, monkeypatch):
    from t2i.scheduler import mirror as mirror_module
    from t2i.worker import handlers as worker_handlers

    monkeypatch.setattr(mirror_module, "FEED_PAGE", 4)
    async with WorkerCluster(tmp_path / "w", name="gpu-a") as w:
        ids = [await w.submit({"prompt": f"fox {i}", "steps": 1}) for i in range(14)]
        for pid in ids:
            await w.wait(pid)
        feeds = CountingRoute(monkeypatch, worker_handlers.JobsHandler, "get")
        scheduler = await start_scheduler(tmp_path / "s", [w.worker])
        try:
            await until(lambda: scheduler.mirror.feed_up("gpu-a"), what="listed")
            assert all(scheduler.mirror.fresh(pid) for pid in ids)
            listing = [uri for uri in feeds.uris if "since=0" in uri]
            assert len(listing) >= 4 and all("limit=4" in uri for uri in listing), feeds.uris
        finally:
            await scheduler.stop()
