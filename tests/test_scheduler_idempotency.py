"""Submits that never run twice: the Idempotency-Key at the scheduler, and POSTs that got no answer.

A pool of real workers in front of ComfyUI doubles; a gate held by the test stops a double's
``POST /prompt`` (or a worker's handler) until the test opens it, so "the worker answers after the
scheduler gave up" is an order of events, not a race of sleeps.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import pytest

from support.cluster import CountingRoute, SchedulerCluster, wait_status
from support.timing import until
from t2i.httpclient import JSONResponse, fetch_json
from t2i.idempotency import prompt_id_for
from t2i.openapi import check_response

KEY = "order-4711"
SCOPED = "anon:127.0.0.1:" + KEY  # the key as the workers get it: scoped to the client (anonymous, by address)
BODY = {"prompt": "a red fox", "steps": 4}


async def generate(scheduler, body: dict[str, Any] | None = None, key: str | None = None,
                   timeout: float = 20) -> JSONResponse:
    headers = {"Idempotency-Key": key} if key is not None else None
    response = await fetch_json(scheduler.url + "/generate", "POST", body or BODY, headers=headers,
                                connect_timeout=2, request_timeout=timeout)
    problems = check_response("POST", "/generate", response.status, response.body)
    assert not problems, problems
    return response


def runs(cluster: SchedulerCluster, prompt_id: str) -> int:
    """How many times the job went to any ComfyUI."""
    return sum(1 for sim in cluster.sims for submitted in sim.submitted if submitted[0] == prompt_id)


class Gate:
    """Holds ``handler_class.method`` (of a ComfyUI double or a worker) until :meth:`open`; only for
    requests to the given ports (all when none). ``arrived`` counts the requests held."""

    def __init__(self, monkeypatch, handler_class, method: str, ports=(), then_call_through: bool = True):
        self.event = asyncio.Event()
        self.arrived: list[str] = []
        original = getattr(handler_class, method)
        gate = self

        async def held(self, *args, **kwargs):
            port = int(self.request.host.rsplit(":", 1)[1])
            if not ports or port in ports:
                gate.arrived.append(self.request.uri)
                await gate.event.wait()
                if not then_call_through:
                    self.set_status(503)
                    self.finish({"error": "held by the test"})
                    return None
            result = original(self, *args, **kwargs)
            return await result if asyncio.iscoroutine(result) else result

        monkeypatch.setattr(handler_class, method, held)

    def open(self) -> None:
        self.event.set()


def sim_prompts(monkeypatch, **kw) -> Gate:
    from t2i.comfy_sim.handlers import PromptHandler

    return Gate(monkeypatch, PromptHandler, "post", **kw)


# --- Idempotency-Key ---------------------------------------------------------------------

@pytest.mark.gen_test(timeout=40)
async def test_the_same_key_and_body_is_the_same_job_and_another_body_is_422(tmp_path):
    async with SchedulerCluster(tmp_path) as c:
        first = await generate(c.scheduler, key=KEY)
        assert first.status == 200, first.body
        pid = first.body["prompt_id"]
        assert pid == prompt_id_for(SCOPED)  # derived from the key: any replica finds it
        again = await generate(c.scheduler, {"steps": 4, "prompt": "a red fox"}, key=KEY)  # key order is no matter
        assert again.status == 200 and again.body["prompt_id"] == pid and again.body["duplicate"] is True
        assert again.body["worker"] == first.body["worker"]
        await wait_status(c.scheduler.url, pid)
        assert (await generate(c.scheduler, key=KEY)).body["prompt_id"] == pid  # once mirrored, too
        other = await generate(c.scheduler, {**BODY, "seed": 7}, key=KEY)
        assert other.status == 422 and "Idempotency-Key" in other.body["error"], other.body
        assert runs(c, pid) == 1
        # Without a key, the same body twice is two jobs.
        a, b = await generate(c.scheduler), await generate(c.scheduler)
        assert a.body["prompt_id"] != b.body["prompt_id"]


@pytest.mark.gen_test(timeout=40)
async def test_a_duplicate_while_the_first_is_placed_is_409_and_another_body_422(tmp_path, monkeypatch):
    async with SchedulerCluster(tmp_path) as c:
        gate = sim_prompts(monkeypatch)
        first = asyncio.ensure_future(generate(c.scheduler, key=KEY))
        await until(lambda: gate.arrived, what="the first request waits in ComfyUI")
        busy = await generate(c.scheduler, key=KEY)
        assert busy.status == 409 and int(busy.headers["Retry-After"]) >= 1, busy.body
        assert busy.body["prompt_id"] == prompt_id_for(SCOPED)
        other = await generate(c.scheduler, {**BODY, "prompt": "a blue fox"}, key=KEY)
        assert other.status == 422, other.body
        gate.open()
        placed = await first
        assert placed.status == 200 and placed.body["prompt_id"] == busy.body["prompt_id"]
        assert len(gate.arrived) == 1 and runs(c, placed.body["prompt_id"]) == 1


@pytest.mark.gen_test(timeout=40)
async def test_a_key_is_honoured_by_a_restarted_scheduler_and_by_replicas(tmp_path):
    async with SchedulerCluster(tmp_path) as c:
        pid = (await generate(c.scheduler, key=KEY)).body["prompt_id"]
        await c.scheduler.stop()
        c.schedulers.pop(0)
        second = await c.add_scheduler()
        third = await c.add_scheduler()
        for scheduler in (second, third, second):
            again = await generate(scheduler, key=KEY)
            assert again.status == 200 and again.body["prompt_id"] == pid and again.body["duplicate"], again.body
        assert (await generate(third, {**BODY, "steps": 5}, key=KEY)).status == 422
        assert (await wait_status(second.url, pid))["status"] == "completed"
        assert runs(c, pid) == 1


@pytest.mark.gen_test(timeout=40)
async def test_the_keys_worker_down_is_503_not_a_second_job_elsewhere(tmp_path, monkeypatch):
    from t2i.worker import handlers as worker_handlers

    async with SchedulerCluster(tmp_path) as c:
        first = await generate(c.scheduler, key=KEY)
        pid = first.body["prompt_id"]
        await until(lambda: c.scheduler.mirror.fresh(pid), what="mirrored")
        holder = c.worker_named(first.body["worker"])
        await holder.stop()
        posts = CountingRoute(monkeypatch, worker_handlers.GenerateHandler, "post")
        again = await generate(c.scheduler, key=KEY)
        assert again.status == 503 and again.headers["Retry-After"] and first.body["worker"] in again.body["error"]
        assert len(posts) == 0 and runs(c, pid) == 1
        assert (await generate(c.scheduler)).status == 200  # other jobs still go to the other worker


@pytest.mark.gen_test(timeout=20)
async def test_a_bad_key_is_400_naming_the_header(tmp_path):
    async with SchedulerCluster(tmp_path, n=1) as c:
        for key in ("", "x" * 201):
            bad = await generate(c.scheduler, key=key)
            assert bad.status == 400 and bad.body["header"] == "Idempotency-Key", (key, bad.body)
            assert "Idempotency-Key" in bad.body["error"]
        long_key = "y" * 200  # the longest allowed; scoped for the workers, it is hashed to fit
        placed = await generate(c.scheduler, key=long_key)
        assert placed.status == 200, placed.body
        assert (await generate(c.scheduler, key=long_key)).body["prompt_id"] == placed.body["prompt_id"]


# --- POSTs that got no answer ----------------------------------------------------------------

@pytest.mark.parametrize("key", [None, KEY])
@pytest.mark.gen_test(timeout=40)
async def test_a_worker_answering_after_the_schedulers_timeout_runs_the_job_once(tmp_path, monkeypatch, key):
    """The scheduler gives up waiting for POST /generate; it asks that worker, which holds the job,
    and answers with it instead of sending it to the next worker."""
    from t2i.scheduler import forward

    monkeypatch.setattr(forward, "GENERATE_TIMEOUT", 0.5)
    async with SchedulerCluster(tmp_path) as c:
        gate = sim_prompts(monkeypatch)
        placed = await generate(c.scheduler, key=key)
        assert placed.status == 200, placed.body
        pid = placed.body["prompt_id"]
        assert len(gate.arrived) == 1  # the worker had it in hand, waiting for its ComfyUI
        assert c.worker_named(placed.body["worker"]).store.get(pid) is not None
        gate.open()
        assert (await wait_status(c.scheduler.url, pid))["status"] == "completed"
        assert runs(c, pid) == 1 and len(gate.arrived) == 1


@pytest.mark.gen_test(timeout=40)
async def test_a_worker_still_accepting_when_the_post_times_out_is_waited_for_not_skipped(tmp_path, monkeypatch):
    """The POST timed out while the worker was still accepting the job (waiting for its ComfyUI's
    websocket, before the job is stored): /status there says 409, not 404, so the scheduler keeps
    asking instead of sending the job to the next worker, and it runs once, where it was sent."""
    from t2i.scheduler import forward
    from t2i.worker import handlers as worker_handlers

    monkeypatch.setattr(forward, "GENERATE_TIMEOUT", 0.5)
    monkeypatch.setattr(forward, "ACCEPTING_POLL", 0.05)
    async with SchedulerCluster(tmp_path) as c:
        asked = CountingRoute(monkeypatch, worker_handlers.StatusHandler, "get")
        opened, held = asyncio.Event(), []
        for worker in c.workers:
            comfy = worker.runner.comfy

            async def slow(timeout, original=comfy.wait_connected, worker=worker):
                if not held:          # the first POST, wherever it went, is held mid-accept
                    held.append(worker)
                    await opened.wait()
                return await original(timeout)
            monkeypatch.setattr(comfy, "wait_connected", slow)
        placing = asyncio.ensure_future(generate(c.scheduler, key=KEY))
        pid = prompt_id_for(SCOPED)
        await until(lambda: asked.at(held[0]) >= 3 if held else False, what="the scheduler asking again")
        direct = await fetch_json(f"{held[0].url}/status/{pid}", connect_timeout=2, request_timeout=5)
        assert direct.status == 409 and direct.body["prompt_id"] == pid, direct.body
        result = await fetch_json(f"{held[0].url}/result/{pid}", connect_timeout=2, request_timeout=5)
        assert result.status == 409 and result.headers["Retry-After"], result.body
        again = await fetch_json(f"{held[0].url}/generate", "POST", BODY, headers={"Idempotency-Key": SCOPED},
                                 connect_timeout=2, request_timeout=5)
        assert again.status == 409 and again.body["prompt_id"] == pid, again.body  # never accepted twice
        assert not placing.done()     # neither answered nor sent to the other worker
        opened.set()
        placed = await placing
        assert placed.status == 200 and placed.body["worker"] == held[0].config.name, placed.body
        assert (await wait_status(c.scheduler.url, pid))["status"] == "completed"
        assert runs(c, pid) == 1


@pytest.mark.gen_test(timeout=40)
async def test_a_worker_that_never_got_the_job_is_skipped_after_it_says_so(tmp_path, monkeypatch):
    from t2i.scheduler import forward
    from t2i.worker import handlers as worker_handlers

    monkeypatch.setattr(forward, "GENERATE_TIMEOUT", 0.5)
    async with SchedulerCluster(tmp_path) as c:
        stuck = c.workers[0]
        gate = Gate(monkeypatch, worker_handlers.GenerateHandler, "post", ports=(stuck.port,),
                    then_call_through=False)
        try:
            for _ in range(2):  # whichever worker is tried first, gpu-1 takes the jobs
                placed = await generate(c.scheduler, key=None)
                assert placed.status == 200 and placed.body["worker"] == "gpu-1", placed.body
                assert (await wait_status(c.scheduler.url, placed.body["prompt_id"]))["status"] == "completed"
            assert gate.arrived  # it was tried (and marked down until its next health check)
            assert stuck.store.get(placed.body["prompt_id"]) is None
        finally:
            gate.open()


@pytest.mark.gen_test(timeout=40)
async def test_a_worker_that_cannot_say_whether_it_took_the_job_is_503_not_a_second_run(tmp_path, monkeypatch):
    from t2i.scheduler import forward
    from t2i.worker import handlers as worker_handlers

    monkeypatch.setattr(forward, "GENERATE_TIMEOUT", 0.5)
    monkeypatch.setattr(forward, "JOB_TIMEOUT", 0.5)
    async with SchedulerCluster(tmp_path, n=1) as c:
        worker = c.workers[0]
        posts = Gate(monkeypatch, worker_handlers.GenerateHandler, "post", then_call_through=False)
        statuses = Gate(monkeypatch, worker_handlers.StatusHandler, "get", then_call_through=False)
        try:
            unsure = await generate(c.scheduler, key=KEY)
            assert unsure.status == 503 and unsure.headers["Retry-After"], unsure.body
            assert "cannot run twice" in unsure.body["error"] and unsure.body["prompt_id"] == prompt_id_for(SCOPED)
            assert len(posts.arrived) == 1 and len(statuses.arrived) == 1
        finally:
            posts.open()
            statuses.open()
        assert worker.store.get(unsure.body["prompt_id"]) is None
