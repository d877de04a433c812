"""Job lookups without fan-out: with every feed live the mirror is the truth, so an id it does not
know is answered 404 at once; only workers whose feed is down are asked."""

from __future__ import annotations

import pytest

from support.cluster import CountingRoute, SchedulerCluster, call, wait_status
from support.timing import until


def job_routes(monkeypatch):
    from t2i.worker import handlers as worker_handlers

    return [CountingRoute(monkeypatch, worker_handlers.StatusHandler, "get"),
            CountingRoute(monkeypatch, worker_handlers.ResultHandler, "get"),
            CountingRoute(monkeypatch, worker_handlers.CancelHandler, "post")]


def asked(routes, worker=None) -> int:
    return sum(route.at(worker) if worker is not None else len(route) for route in routes)


@pytest.mark.gen_test(timeout=30)
async def test_an_unknown_id_with_every_feed_live_is_404_without_asking_any_worker(tmp_path, monkeypatch):
    async with SchedulerCluster(tmp_path, n=3) as c:
        base = c.scheduler.url
        await until(lambda: all(c.scheduler.mirror.feed_up(f"gpu-{i}") for i in range(3)), what="feeds up")
        # A job placed and followed: answered from the mirror, no worker asked either.
        pid = (await call("POST", base + "/generate", {"prompt": "a fox", "steps": 2})).json["prompt_id"]
        await wait_status(base, pid)
        routes = job_routes(monkeypatch)
        for _ in range(3):
            for method, path in (("GET", "/status/nope"), ("GET", "/status/nope?wait=1&since=3"),
                                 ("GET", "/result/nope"), ("POST", "/cancel/nope")):
                reply = await call(method, base + path)
                assert reply.code == 404 and reply.json["error"], (path, reply)
        assert (await call("GET", f"{base}/status/{pid}")).json["status"] == "completed"
        assert (await call("GET", f"{base}/result/{pid}")).code == 200
        assert asked(routes) == 0
        # One worker's feed down: only that worker may hold jobs the mirror has not seen.
        await c.workers[2].stop()
        await until(lambda: not c.scheduler.mirror.feed_up("gpu-2"), what="gpu-2's feed down")
        reply = await call("GET", base + "/status/nope")
        assert reply.code == 503 and reply.headers["Retry-After"], reply  # gpu-2 might know it
        assert asked(routes, c.workers[0]) == asked(routes, c.workers[1]) == 0
        await c.restart_worker(2)
        await until(lambda: c.scheduler.mirror.feed_up("gpu-2"), what="gpu-2's feed up again")
        assert (await call("GET", base + "/status/nope")).code == 404
        assert asked(routes, c.workers[0]) == asked(routes, c.workers[1]) == 0


@pytest.mark.gen_test(timeout=30)
async def test_a_worker_whose_feed_is_down_is_asked_and_its_answer_passed_on(tmp_path, monkeypatch):
    async with SchedulerCluster(tmp_path, n=2) as c:
        pid = (await call("POST", c.workers[1].url + "/generate", {"prompt": "a fox", "steps": 2})).json["prompt_id"]
        await wait_status(c.workers[1].url, pid)
        c.scheduler.mirror.unfollow("gpu-1")  # as if its feed were down: its jobs are not in the mirror
        routes = job_routes(monkeypatch)
        reply = await call("GET", f"{c.scheduler.url}/status/{pid}")
        assert reply.code == 200 and reply.json["status"] == "completed"
        assert asked(routes, c.workers[1]) == 1 and asked(routes, c.workers[0]) == 0
