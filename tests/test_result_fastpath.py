"""``GET /result/{id}[?wait=S]`` answered before the Application (t2i.scheduler.fastpath): byte for byte
ResultHandler's answers (200 with the result, 202 with the status), a parked wait that sleeps through the
job's changes until it ends or the wait is over, and passed on to the handler when the copy goes stale or
the request is not one it reads plainly."""

from __future__ import annotations

import asyncio

import pytest

from support.cluster import CountingRoute, SchedulerCluster, call
from support.timing import until
from t2i.scheduler import handlers as scheduler_handlers
from test_status_fastpath import HANDLER, ended_job, frozen_job, headers_of, parked_then_stale, state_of


@pytest.mark.gen_test(timeout=40)
async def test_a_finished_jobs_result_is_answered_as_the_handler_answers_it(tmp_path, monkeypatch):
    async with SchedulerCluster(tmp_path, n=1) as c:
        prompt_id = await ended_job(c)
        handled = CountingRoute(monkeypatch, scheduler_handlers.ResultHandler, "get")
        for query in ("", "?wait=30", "?wait=0"):
            url = f"{c.scheduler.url}/result/{prompt_id}{query}"
            fast = await call("GET", url)
            assert len(handled) == 0, query
            slow = await call("GET", url, headers=HANDLER)   # a conditional request: the handler's
            assert len(handled) == 1, query
            handled.uris.clear()
            assert fast.code == slow.code == 200 and fast.body == slow.body, query
            assert fast.json["status"] == "completed" and fast.json["image_url"], query
            assert headers_of(fast) == headers_of(slow), query
        # Its Etag is the handler's: sent back, the handler's 304.
        assert (await call("GET", url, headers={"If-None-Match": fast.headers["Etag"]})).code == 304
        # What it does not read plainly reaches the handler, whose answers stand.
        for query, code in (("?wait=x", 400), ("?redirect=image", 303), ("?redirect=page", 400),
                            ("?since=1", 200), ("?wait=1&wait=0", 200)):
            before = len(handled)
            assert (await call("GET", f"{c.scheduler.url}/result/{prompt_id}{query}")).code == code, query
            assert len(handled) == before + 1, query
        before = len(handled)
        reply = await call("GET", f"{c.scheduler.url}/result/{prompt_id}", headers={"Accept": "image/*"})
        assert reply.code == 307 and len(handled) == before + 1   # the handler's: to the worker, for the image
        assert (await call("GET", f"{c.scheduler.url}/result/no-such-job")).code == 404


@pytest.mark.gen_test(timeout=60)
async def test_a_parked_result_sleeps_through_changes_until_the_job_ends(tmp_path, monkeypatch):
    async with SchedulerCluster(tmp_path, n=1) as c:
        prompt_id, version = await frozen_job(c)
        handled = CountingRoute(monkeypatch, scheduler_handlers.ResultHandler, "get")
        url = f"{c.scheduler.url}/result/{prompt_id}"
        # Not finished, no wait: 202 with the job's status, as the handler answers it.
        fast, slow = await call("GET", url), await call("GET", url, headers=HANDLER)
        assert fast.code == slow.code == 202 and fast.body == slow.body and fast.json["version"] == version
        assert headers_of(fast) == headers_of(slow) and "Etag" not in fast.headers
        # A wait that ends before the job: the status then, as the handler's.
        fast, slow = await call("GET", url + "?wait=0.2"), await call("GET", url + "?wait=0.2", headers=HANDLER)
        assert fast.code == slow.code == 202 and fast.body == slow.body
        assert len(c.scheduler.mirror._waiters) == 0
        # A long wait: answered once the job ends, not at its progress changes on the way.
        handled.uris.clear()
        fast = asyncio.ensure_future(call("GET", url + "?wait=30", timeout=40))
        slow = asyncio.ensure_future(call("GET", url + "?wait=30", headers=HANDLER, timeout=40))
        await until(lambda: len(handled) == 1 and len(c.scheduler.mirror._waiters) == 1
                    and len(c.scheduler.mirror._waiters._futures[prompt_id]) == 2, what="both waiting")
        for sim in c.sims:
            sim.stall = False
        fast, slow = await fast, await slow
        assert fast.code == slow.code == 200 and fast.json["status"] == "completed"
        assert fast.body == slow.body and headers_of(fast) == headers_of(slow)
        assert len(handled) == 1 and len(c.scheduler.mirror._waiters) == 0


@pytest.mark.gen_test(timeout=60)
async def test_a_parked_result_whose_copy_goes_stale_asks_the_worker(tmp_path, monkeypatch):
    async with SchedulerCluster(tmp_path, n=1) as c:
        reply, prompt_id = await parked_then_stale(c, monkeypatch, scheduler_handlers.ResultHandler,
                                                   lambda prompt_id, version: f"/result/{prompt_id}?wait=60")
        assert reply.code == 202
        await until(lambda: state_of(c, prompt_id) is not None, what="the feed back")
