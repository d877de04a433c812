"""``GET /status/{id}`` answered before the Application (t2i.scheduler.fastpath): the same answers as
StatusHandler's, parked long-polls woken by a change, at shutdown, and passed on when their copy goes
stale; everything it does not read plainly still reaches the handler."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from support.cluster import CountingRoute, SchedulerCluster, call
from support.timing import until
from t2i.scheduler import handlers as scheduler_handlers

HANDLER = {"If-None-Match": '"not-this-one"'}   # a conditional poll: the fast path passes it on


def headers_of(reply, *leave_out: str) -> list[tuple[str, str]]:
    """The answer's headers but its Date and Connection (the connection's own, hop by hop)."""
    return [(name, value) for name, value in reply.headers.get_all() if name not in ("Date", "Connection", *leave_out)]


def state_of(c: SchedulerCluster, prompt_id: str) -> str | None:
    entry = c.scheduler.mirror.fresh(prompt_id)
    return entry.state if entry is not None else None


async def ended_job(c: SchedulerCluster) -> str:
    prompt_id = (await call("POST", f"{c.scheduler.url}/generate", {"prompt": "a fox", "steps": 1})).json["prompt_id"]
    await until(lambda: state_of(c, prompt_id) in ("completed", "failed"), what="the job's end in the mirror")
    return prompt_id


async def frozen_job(c: SchedulerCluster) -> tuple[str, int]:
    """A running job that does not change until the double's stall ends: (id, version)."""
    for sim in c.sims:
        sim.stall = True
    prompt_id = (await call("POST", f"{c.scheduler.url}/generate", {"prompt": "a fox", "steps": 4})).json["prompt_id"]
    await until(lambda: state_of(c, prompt_id) == "running", what="running")
    await asyncio.sleep(0.1)  # the step in flight has sent its last progress
    return prompt_id, c.scheduler.mirror.get(prompt_id).version


@pytest.mark.gen_test(timeout=40)
async def test_a_poll_is_answered_as_the_handler_answers_it(tmp_path, monkeypatch):
    async with SchedulerCluster(tmp_path, n=1) as c:
        prompt_id = await ended_job(c)
        handled = CountingRoute(monkeypatch, scheduler_handlers.StatusHandler, "get")
        url = f"{c.scheduler.url}/status/{prompt_id}"
        fast = await call("GET", url)
        assert len(handled) == 0
        slow = await call("GET", url, headers=HANDLER)
        assert len(handled) == 1
        assert fast.code == slow.code == 200 and fast.body == slow.body == c.scheduler.mirror.get(prompt_id).encoded()
        assert headers_of(fast) == headers_of(slow)
        # Its Etag is the handler's: a poll that sends it back gets the handler's 304.
        assert (await call("GET", url, headers={"If-None-Match": fast.headers["Etag"]})).code == 304
        # An immediate long-poll (the version is past `since`) is answered here too, the same way.
        assert (await call("GET", f"{url}?wait=5&since=0")).body == fast.body and len(handled) == 2
        # What it does not read plainly reaches the handler, whose answers stand.
        for query, code in (("?wait=x", 400), ("?since=-1", 400), ("?since=1.5", 400), ("?wait=1&wait=0", 200),
                            ("?redirect=image", 200), ("?wait=nan&since=0", 400)):
            before = len(handled)
            assert (await call("GET", url + query)).code == code, query
            assert len(handled) == before + 1, query
        assert (await call("GET", f"{c.scheduler.url}/status/no-such-job")).code == 404
        assert (await call("GET", f"{c.scheduler.url}/status/{prompt_id[:4]}%41")).code == 404


@pytest.mark.gen_test(timeout=60)
async def test_parked_long_polls_are_answered_on_a_change_and_at_shutdown(tmp_path, monkeypatch):
    async with SchedulerCluster(tmp_path, n=1) as c:
        prompt_id, version = await frozen_job(c)
        url = f"{c.scheduler.url}/status/{prompt_id}?wait=30&since={version}"
        fast = asyncio.ensure_future(call("GET", url, timeout=40))
        slow = asyncio.ensure_future(call("GET", url, headers=HANDLER, timeout=40))
        await until(lambda: len(c.scheduler.mirror._waiters) == 1 and not fast.done() and not slow.done(),
                    what="both parked")
        for sim in c.sims:
            sim.stall = False
        fast, slow = await fast, await slow
        assert fast.code == slow.code == 200 and fast.json["version"] > version and slow.json["version"] > version
        assert headers_of(fast, "Etag", "Content-Length") == headers_of(slow, "Etag", "Content-Length")
        await until(lambda: state_of(c, prompt_id) == "completed", what="the first job's end")

        prompt_id, version = await frozen_job(c)
        parked = asyncio.ensure_future(call("GET", f"{c.scheduler.url}/status/{prompt_id}?wait=30&since={version}",
                                            timeout=40))
        await until(lambda: len(c.scheduler.mirror._waiters) == 1, what="parked")
        await c.scheduler.stop()
        reply = await parked  # answered as StatusHandler answers then (t2i.web.JSONHandler.write_error)
        assert reply.code == 503 and reply.json == {"error": "The scheduler is shutting down; ask again."}
        assert [name for name, _ in headers_of(reply)] == ["Server", "Content-Type", "Cache-Control", "Retry-After",
                                                           "Content-Length"]
        assert reply.headers["Retry-After"] == "1" and reply.headers["Cache-Control"] == "no-store"


async def parked_then_stale(c: SchedulerCluster, monkeypatch, handler: type, path_of) -> tuple[Any, str]:
    """Park the request ``path_of(prompt_id, version)`` names (a wait on a frozen job) in the fast path, then
    make the mirror's copy stale: it is passed on to ``handler`` at once, with no wait left, which asks the
    worker (the job still running, at its version). The answer and the job's id; the double runs again."""
    prompt_id, version = await frozen_job(c)
    handled = CountingRoute(monkeypatch, handler, "get")
    parked = asyncio.ensure_future(call("GET", c.scheduler.url + path_of(prompt_id, version), timeout=40))
    await until(lambda: len(c.scheduler.mirror._waiters) == 1, what="parked")
    assert len(handled) == 0
    c.scheduler.mirror.suspect("gpu-0", "the test says so")  # the copy is stale now
    reply = await parked  # not after 60 s: at once, from the worker
    assert reply.json["status"] == "running" and reply.json["version"] == version
    assert len(handled) == 1 and "wait" not in handled.uris[0]
    assert len(c.scheduler.mirror._waiters) == 0
    for sim in c.sims:
        sim.stall = False
    return reply, prompt_id


@pytest.mark.gen_test(timeout=60)
async def test_a_parked_long_poll_whose_copy_goes_stale_asks_the_worker(tmp_path, monkeypatch):
    async with SchedulerCluster(tmp_path, n=1) as c:
        reply, _ = await parked_then_stale(c, monkeypatch, scheduler_handlers.StatusHandler,
                                           lambda prompt_id, version: f"/status/{prompt_id}?wait=60&since={version}")
        assert reply.code == 200
