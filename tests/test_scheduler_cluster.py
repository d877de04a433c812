"""The scheduler against real workers and ComfyUI test doubles, all on loopback in this loop."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import urlsplit

import pytest
from tornado.httpclient import AsyncHTTPClient

from support.cluster import (SchedulerCluster, start_scheduler, start_sim, start_worker, worker_entry,
                             write_workers_yaml)
from support.net import free_port
from support.timing import until
from t2i.config import PACKAGE_WORKFLOWS
from t2i.httpclient import JSONResponse, fetch_json
from t2i.openapi import check_response

TXT2IMG = PACKAGE_WORKFLOWS / "txt2img.json"


# --- helpers ------------------------------------------------------------------

async def call(method: str, url: str, body: Any = None, *, timeout: float = 10.0, **kw: Any) -> JSONResponse:
    """A JSON call; every answer is checked against the OpenAPI document."""
    response = await fetch_json(url, method, body, connect_timeout=2.0, request_timeout=timeout, **kw)
    problems = check_response(method, urlsplit(url).path, response.status, response.body)
    assert not problems, problems
    return response


async def get(url: str, **kw: Any) -> JSONResponse:
    return await call("GET", url, **kw)


async def workers_of(scheduler) -> dict[str, dict[str, Any]]:
    response = await get(scheduler.url + "/workers")
    return {w["name"]: w for w in response.body["workers"]}


async def routable(scheduler, name: str) -> bool:
    info = (await workers_of(scheduler)).get(name)
    return bool(info and info["routable"])


async def status_of(base: str, prompt_id: str) -> str | None:
    response = await get(f"{base}/status/{prompt_id}")
    return response.body.get("status") if response.status == 200 else None


async def generate(scheduler, **body: Any) -> JSONResponse:
    return await call("POST", scheduler.url + "/generate", {"prompt": "a red fox", "steps": 4, **body})


Cluster = SchedulerCluster


def stall(cluster: Cluster, value: bool = True) -> None:
    for sim in cluster.sims:
        sim.stall = value


async def frozen_running_job(cluster: Cluster) -> tuple[str, int]:
    """A job that is running and will not change until ``stall(cluster, False)``: (id, version)."""
    stall(cluster)
    pid = (await generate(cluster.scheduler)).body["prompt_id"]
    await until(lambda: _is(cluster.scheduler.url, pid, "running"), what="running (then frozen)")
    await asyncio.sleep(0.1)  # the last progress message of the step in flight has arrived
    return pid, (await get(f"{cluster.scheduler.url}/status/{pid}")).body["version"]


# --- routing --------------------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_load_spreads_by_queue_and_full_workers_are_skipped(tmp_path):
    async with Cluster(tmp_path) as c:
        entries = [worker_entry(c.workers[0], max_queue=2), worker_entry(c.workers[1], max_queue=4)]
        write_workers_yaml(c.workers_file, entries)
        await until(lambda: c.scheduler.registry.workers["gpu-0"].entry.max_queue == 2, what="reload")
        stall(c)
        placed = []
        for _ in range(6):
            response = await generate(c.scheduler)
            assert response.status == 200, response.body
            assert response.body["worker_url"] == c.workers[int(response.body["worker"][-1])].config.public_url
            placed.append(response.body)
        counts = {name: sum(1 for p in placed if p["worker"] == name) for name in ("gpu-0", "gpu-1")}
        assert counts == {"gpu-0": 2, "gpu-1": 4}, counts
        # both full now: 503 with Retry-After and a sentence saying so
        response = await generate(c.scheduler)
        assert response.status == 503 and "full" in response.body["error"]
        assert int(response.headers["Retry-After"]) >= 1
        workers = await workers_of(c.scheduler)
        assert workers["gpu-0"]["pending"] + workers["gpu-0"]["running"] == 2
        stall(c, False)
        for job in placed:
            await until(lambda: status_of(c.scheduler.url, job["prompt_id"]), what="status")
            await until(lambda: _is(c.scheduler.url, job["prompt_id"], "completed"), timeout=15,
                        what=f"{job['prompt_id']} completed")


async def _is(base: str, prompt_id: str, status: str) -> bool:
    return await status_of(base, prompt_id) == status


@pytest.mark.gen_test(timeout=30)
async def test_dead_worker_is_skipped_and_used_again_when_back(tmp_path):
    async with Cluster(tmp_path) as c:
        await c.workers[0].stop()
        for _ in range(3):  # the first may hit the dead worker: it is marked down, the next one is tried
            response = await generate(c.scheduler)
            assert response.status == 200 and response.body["worker"] == "gpu-1", response.body
        workers = await workers_of(c.scheduler)
        assert not workers["gpu-0"]["routable"] and workers["gpu-0"]["last_error"]
        await c.restart_worker(0)
        await until(lambda: routable(c.scheduler, "gpu-0"), what="gpu-0 back")
        seen = set()
        for _ in range(4):
            response = await generate(c.scheduler)
            assert response.status == 200
            seen.add(response.body["worker"])
        assert "gpu-0" in seen
        # every worker down: 503 saying so
        for worker in c.workers:
            await worker.stop()
        response = await generate(c.scheduler)
        assert response.status == 503 and response.headers.get("Retry-After")
        assert "unreachable" in response.body["error"] or "down" in response.body["error"]
        assert (await get(c.scheduler.url + "/health")).status == 503


@pytest.mark.gen_test(timeout=30)
async def test_worker_refusing_the_token_is_skipped(tmp_path):
    async with Cluster(tmp_path) as c:
        await c.workers[0].stop()
        c.workers[0] = await start_worker(tmp_path / "w0", c.sims[0].url, name="gpu-0", port=c.workers[0].port,
                                          auth_token="not-the-schedulers")
        await until(lambda: routable(c.scheduler, "gpu-0"), what="gpu-0 healthy again")
        for _ in range(4):  # gpu-0 answers 401: marked down, the job goes to gpu-1
            response = await generate(c.scheduler)
            assert response.status == 200 and response.body["worker"] == "gpu-1", response.body
        await until(lambda: _feed_error(c.scheduler, "gpu-0", "401"), what="feed refused with 401")


@pytest.mark.gen_test(timeout=30)
async def test_the_schedulers_token_reaches_the_workers(tmp_path):
    """auth_token in scheduler.yaml: generate, the job feed and cancel all pass the workers' check."""
    async with Cluster(tmp_path, n=1, auth_token="s3cret", worker_overrides={"auth_token": "s3cret"}) as c:
        direct = await call("POST", c.workers[0].url + "/generate", {"prompt": "x"})
        assert direct.status == 401  # the worker does require it
        response = await generate(c.scheduler)
        assert response.status == 200, response.body
        pid = response.body["prompt_id"]
        await until(lambda: _mirrored_status(c.scheduler, pid, "completed"), what="completed via the feed")
        refused = await call("POST", f"{c.scheduler.url}/cancel/{pid}")
        assert refused.status == 409, refused.body  # reached the worker, which says it already ended


@pytest.mark.gen_test(timeout=30)
async def test_the_worker_gets_the_body_as_the_client_sent_it(tmp_path, monkeypatch):
    """The scheduler reads the body to check and place the job, and forwards the client's bytes, not a
    new encoding of them (json.dumps of a body of input images holds the loop as long as its parse)."""
    from support.cluster import call as raw_call
    from t2i.worker import handlers as worker_handlers

    received: list[bytes] = []
    original = worker_handlers.GenerateHandler.get_json_body

    def recording(self):
        value = original(self)
        received.append(self.request.body)
        return value

    monkeypatch.setattr(worker_handlers.GenerateHandler, "get_json_body", recording)
    sent = b'{ "steps" : 2,\n  "prompt": "caf\\u00e9 au lait"  }'
    async with Cluster(tmp_path, n=1) as c:
        reply = await raw_call("POST", f"{c.scheduler.url}/generate", raw=sent)
        assert reply.code == 200, reply
        assert received == [sent]
        assert c.workers[0].store.get(reply.json["prompt_id"]).params["prompt"] == "café au lait"


def _mirrored_status(scheduler, pid: str, status: str) -> bool:
    entry = scheduler.mirror.fresh(pid)
    return entry is not None and entry.status["status"] == status


@pytest.mark.gen_test(timeout=20)
async def test_an_idle_workers_feed_is_long_polled_not_spun(tmp_path, monkeypatch):
    """A worker with no job yet (seq 0) still holds the feed request: a few calls a second at most."""
    from t2i.worker import handlers as worker_handlers

    calls = []
    original = worker_handlers.JobsHandler.get

    async def counting_get(self, *args):
        calls.append(self.request.uri)
        return await original(self, *args)

    monkeypatch.setattr(worker_handlers.JobsHandler, "get", counting_get)
    async with Cluster(tmp_path, n=1) as c:
        await until(lambda: _feed_epoch(c.scheduler, "gpu-0", c.workers[0].store.epoch), what="feed up")
        before = len(calls)
        await asyncio.sleep(1.0)
        assert len(calls) - before <= 3, calls[-5:]
        assert any("wait=" in uri and "wait=0" not in uri for uri in calls), calls
        # ... and a change still arrives at once through the held request.
        response = await generate(c.scheduler)
        await until(lambda: c.scheduler.mirror.fresh(response.body["prompt_id"]) is not None, timeout=2,
                    what="mirrored through the held long-poll")


# --- workers.yaml live reload ----------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_workers_yaml_edits_apply_without_restart(tmp_path):
    async with Cluster(tmp_path, listed=1) as c:
        assert list(await workers_of(c.scheduler)) == ["gpu-0"]
        reloads_ok = await metric(c.scheduler.url, 't2i_config_reloads_total{result="ok"}')
        reloads_failed = await metric(c.scheduler.url, 't2i_config_reloads_total{result="failed"}')
        stall(c)
        first = (await generate(c.scheduler)).body
        assert first["worker"] == "gpu-0"
        # the worker's queue-depth gauge sees the stalled job
        await until(lambda: _metric_at_least(c.workers[0].url, 't2i_queue_depth{state="running",worker="gpu-0"}', 1),
                    what="queue depth gauge")
        # add gpu-1: it is checked, followed, and gets the next job (gpu-0 has one pending)
        write_workers_yaml(c.workers_file, [worker_entry(w) for w in c.workers])
        await until(lambda: routable(c.scheduler, "gpu-1"), what="gpu-1 added")
        assert await metric(c.scheduler.url, 't2i_config_reloads_total{result="ok"}') == reloads_ok + 1
        assert (await generate(c.scheduler)).body["worker"] == "gpu-1"
        # a broken edit: last good list kept, error visible with file and line
        c.workers_file.write_text("workers:\n  - name: gpu-0\n    url: nope\n")
        info = await until(lambda: _config_error(c.scheduler), what="config error")
        assert "workers.yaml:3" in info["error"] and "url" in info["error"]
        assert await metric(c.scheduler.url, 't2i_config_reloads_total{result="failed"}') == reloads_failed + 1
        assert set(await workers_of(c.scheduler)) == {"gpu-0", "gpu-1"}
        assert (await generate(c.scheduler)).status == 200
        # remove gpu-0 while its job is pending: no new jobs there, its job still answerable
        write_workers_yaml(c.workers_file, [worker_entry(c.workers[1])])
        await until(lambda: not c.scheduler.registry.workers["gpu-0"].listed, what="gpu-0 removed")
        assert (await _config_error(c.scheduler)) is None
        for _ in range(2):
            assert (await generate(c.scheduler)).body["worker"] == "gpu-1"
        stall(c, False)
        await until(lambda: _is(c.scheduler.url, first["prompt_id"], "completed"), timeout=15,
                    what="job on the removed worker completed")
        assert "gpu-0" in await workers_of(c.scheduler)  # still followed (lingers after draining)
        # the same name moved to another machine: its jobs are forgotten, the new one is followed
        write_workers_yaml(c.workers_file, [{"name": "gpu-1", "url": c.workers[0].url}])
        epoch = c.workers[0].store.epoch
        await until(lambda: _feed_epoch(c.scheduler, "gpu-1", epoch), what="gpu-1 re-followed at its new URL")
        assert await status_of(c.scheduler.url, first["prompt_id"]) == "completed"


async def metric(base: str, sample: str) -> float:
    """One sample of a server's /metrics, e.g. 't2i_config_reloads_total{result="ok"}' (0 when absent)."""
    response = await AsyncHTTPClient().fetch(base + "/metrics", request_timeout=5)
    for line in response.body.decode().splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return 0.0


async def _metric_at_least(base: str, sample: str, value: float) -> bool:
    return await metric(base, sample) >= value


async def _feed_error(scheduler, name: str, text: str) -> bool:
    feed = (await workers_of(scheduler))[name]["feed"]
    return feed["state"] == "down" and text in (feed["last_error"] or "")


async def _feed_epoch(scheduler, name: str, epoch: str) -> bool:
    info = (await workers_of(scheduler)).get(name)
    return bool(info and info["feed"]["state"] == "up" and info["feed"]["epoch"] == epoch)


async def _config_error(scheduler):
    config = (await get(scheduler.url + "/workers")).body["config"]
    return config if config["error"] else None


# --- job state without owning it ----------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_status_survives_scheduler_restart_and_replicas_agree(tmp_path):
    async with Cluster(tmp_path, step_time=0.05) as c:
        job = (await generate(c.scheduler, steps=20)).body
        pid = job["prompt_id"]
        # the status right after submission (mirror may not have it yet: asked from the owner)
        assert (await get(f"{c.scheduler.url}/status/{pid}")).status == 200
        await c.scheduler.stop()
        c.schedulers.pop(0)
        second = await c.add_scheduler()
        third = await c.add_scheduler()
        assert await status_of(second.url, pid) in ("pending", "running", "completed")
        # long-poll on the new scheduler follows the job to its end
        version = 0
        while True:
            response = await get(f"{second.url}/status/{pid}?wait=5&since={version}", timeout=10)
            assert response.status == 200
            assert response.body["version"] > version or response.body["status"] == "completed"
            version = response.body["version"]
            if response.body["status"] == "completed":
                break
        a = await get(f"{second.url}/status/{pid}")
        b = await get(f"{third.url}/status/{pid}")
        direct = await get(f"{c.workers[int(job['worker'][-1])].url}/status/{pid}")
        assert a.body == b.body == direct.body
        ra, rb = await get(f"{second.url}/result/{pid}"), await get(f"{third.url}/result/{pid}")
        rd = await get(f"{c.workers[int(job['worker'][-1])].url}/result/{pid}")
        assert ra.status == rb.status == rd.status == 200 and ra.body == rb.body == rd.body
        assert ra.body["image_url"].startswith(job["worker_url"])


@pytest.mark.gen_test(timeout=20)
async def test_long_poll_answers_on_change_and_after_wait(tmp_path):
    async with Cluster(tmp_path, n=1) as c:
        pid, version = await frozen_running_job(c)
        polls = await metric(c.scheduler.url, 't2i_poll_requests_total{server="scheduler"}')
        state = (await get(f"{c.scheduler.url}/status/{pid}")).body
        assert state["version"] == version
        assert await metric(c.scheduler.url, 't2i_poll_requests_total{server="scheduler"}') == polls + 1
        started = time.monotonic()
        response = await get(f"{c.scheduler.url}/status/{pid}?wait=0.3&since={state['version']}")
        assert response.status == 200 and time.monotonic() - started > 0.25
        assert response.body["version"] == state["version"]
        poll = asyncio.ensure_future(get(f"{c.scheduler.url}/status/{pid}?wait=20&since={state['version']}",
                                         timeout=25))
        await asyncio.sleep(0.2)
        assert not poll.done()
        started = time.monotonic()
        stall(c, False)
        response = await poll
        assert response.body["version"] > state["version"] and time.monotonic() - started < 10  # not 20


@pytest.mark.gen_test(timeout=30)
async def test_a_long_poll_stops_waiting_when_the_browser_goes_away(tmp_path):
    async with Cluster(tmp_path, n=1) as c:
        pid, version = await frozen_running_job(c)
        reader, writer = await asyncio.open_connection("127.0.0.1", urlsplit(c.scheduler.url).port)
        writer.write(f"GET /status/{pid}?wait=30&since={version} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        await until(lambda: len(c.scheduler.mirror._waiters) == 1, what="the long-poll waits")
        writer.close()  # the browser tab is closed
        await until(lambda: len(c.scheduler.mirror._waiters) == 0, timeout=3, what="the wait dropped")


@pytest.mark.gen_test(timeout=30)
async def test_a_crafted_id_never_reaches_another_worker_route(tmp_path, monkeypatch):
    """The id is one path segment all the way: it cannot turn a status lookup into a /jobs listing."""
    from t2i.worker import handlers as worker_handlers

    listings = []
    original = worker_handlers.JobsHandler.get

    async def watching_get(self, *args):
        if "since=0" in self.request.uri and "wait" not in self.request.uri:
            listings.append(self.request.uri)
        return await original(self, *args)

    async with Cluster(tmp_path, n=1) as c:
        monkeypatch.setattr(worker_handlers.JobsHandler, "get", watching_get)
        for crafted in ("..%2Fjobs%3Fsince%3D0", "%2E%2E%2Fjobs%3Fsince%3D0", "x%23y"):
            response = await get(f"{c.scheduler.url}/status/{crafted}")
            assert response.status == 404 and response.body["error"], (crafted, response.body)
        assert listings == []


@pytest.mark.gen_test(timeout=30)
async def test_forwarded_long_polls_wait_briefly_on_the_worker(tmp_path, monkeypatch):
    from t2i.scheduler import forward

    monkeypatch.setattr(forward, "FORWARDED_WAIT_MAX", 0.3)
    async with Cluster(tmp_path, n=1) as c:
        pid, version = await frozen_running_job(c)
        c.scheduler.mirror.unfollow("gpu-0")  # no mirror copy: the poll is forwarded to the worker
        assert c.scheduler.mirror.fresh(pid) is None
        started = time.monotonic()
        response = await get(f"{c.scheduler.url}/status/{pid}?wait=20&since={version}", timeout=25)
        assert response.status == 200 and response.body["version"] == version
        assert 0.25 < time.monotonic() - started < 10  # the worker held it 0.3 s, not 20 s


# --- every status code of the design's table -----------------------------------------------

@pytest.mark.gen_test(timeout=40)
async def test_status_codes(tmp_path):
    async with Cluster(tmp_path, n=1, max_body_bytes=1_048_576) as c:
        base = c.scheduler.url
        stall(c)
        ok = await generate(c.scheduler)
        assert ok.status == 200 and set(ok.body) >= {"prompt_id", "worker", "worker_url", "status_url",
                                                     "result_url"}
        pid = ok.body["prompt_id"]
        assert ok.body["worker"] == "gpu-0" and ok.body["status_url"] == f"/status/{pid}"
        pending = await get(f"{base}/result/{pid}")
        assert pending.status == 202 and pending.body["status"] in ("pending", "running")

        bad = await call("POST", base + "/generate", {"prompt": "x", "colour": "red"})
        assert bad.status == 400 and bad.body["field"] == "colour" and bad.body["error"]
        bad = await call("POST", base + "/generate", {"prompt": "x", "steps": 10 ** 6})
        assert bad.status == 400 and bad.body["field"] == "steps"  # checked against the catalogue
        raw = await fetch_json(base + "/generate", "POST", connect_timeout=2, request_timeout=5)
        assert raw.status == 400 and "error" in raw.body
        big = await call("POST", base + "/generate", {"prompt": "x" * 2_000_000})
        assert big.status == 413 and big.body["error"]

        for path in ("/status/nope", "/result/nope"):
            missing = await get(base + path)
            assert missing.status == 404 and missing.body["error"], path
        assert (await call("POST", base + "/cancel/nope")).status == 404
        assert (await get(base + "/no/such/route")).status == 404

        cancelled = await call("POST", f"{base}/cancel/{pid}")
        assert cancelled.status == 200, cancelled.body
        await until(lambda: _is(base, pid, "cancelled"), what="cancelled")
        again = await call("POST", f"{base}/cancel/{pid}")
        assert again.status == 409 and again.body["error"]
        result = await get(f"{base}/result/{pid}")
        assert result.status == 200 and result.body["status"] == "cancelled"

        # 503: the owner is down and the copy is not fresh; no worker for new jobs
        stall(c)
        pid2 = (await generate(c.scheduler)).body["prompt_id"]
        await until(lambda: c.scheduler.mirror.fresh(pid2), what="mirrored")
        await c.workers[0].stop()
        await until(lambda: not c.scheduler.mirror.feed_up("gpu-0"), what="feed down")
        down = await get(f"{base}/status/{pid2}")
        assert down.status == 503 and down.headers["Retry-After"] == "1" and down.body["error"]
        assert (await get(f"{base}/result/{pid2}")).status == 503
        assert (await get(f"{base}/status/{pid}")).body["status"] == "cancelled"  # final: from memory
        none = await generate(c.scheduler)
        assert none.status == 503 and none.headers["Retry-After"] and none.body["error"]
        health = await get(base + "/health")
        assert health.status == 503 and health.body["ok"] is False


@pytest.mark.gen_test(timeout=30)
async def test_gone_and_rejected_are_passed_through(tmp_path):
    async with Cluster(tmp_path, n=1) as c:
        base = c.scheduler.url
        # A worker restarted with a second workflow whose node ComfyUI does not have, raw workflows
        # allowed, and a zero task_ttl.
        broken = {"1": {"class_type": "NoSuchNode", "inputs": {"text": ""}}}
        (tmp_path / "broken.json").write_text(json.dumps(broken))
        workflows = {"txt2img": {"file": str(TXT2IMG), "params": {"prompt": {"node": "6", "input": "text"}}},
                     "broken": {"file": str(tmp_path / "broken.json"),
                                "params": {"prompt": {"node": "1", "input": "text"}}}}
        await c.workers[0].stop()
        await c.restart_worker(0, retention={"interval": 0.1, "task_ttl": 0}, workflows=workflows,
                               allow_raw_workflows=True)
        await until(lambda: routable(c.scheduler, "gpu-0"), what="back")
        await until(lambda: _workflow_state(c.scheduler, "gpu-0", "broken", False), what="broken not ready")
        # 503: the one worker is not ready for that template, and the sentence says why
        unready = await call("POST", base + "/generate", {"prompt": "x", "workflow": "broken"})
        assert unready.status == 503 and unready.headers["Retry-After"], unready.body
        assert unready.body["error"].startswith("No worker is ready for workflow 'broken': gpu-0: ")
        assert "NoSuchNode" in unready.body["error"]
        # 502: ComfyUI rejects a raw workflow (the client's own); its message and node_errors are passed on
        rejected = await call("POST", base + "/generate", {"workflow": broken})
        assert rejected.status == 502 and "NoSuchNode" in rejected.body["error"], rejected.body
        assert "node_errors" in rejected.body
        # 410: a job pruned by the worker after it ended
        pid = (await call("POST", base + "/generate", {"prompt": "x"})).body["prompt_id"]
        gone = await until(lambda: _gone(base, pid), timeout=15, what="410")
        assert gone.body["error"]
        assert (await get(f"{base}/result/{pid}")).status == 410


async def _workflow_state(scheduler, worker: str, workflow: str, ready) -> bool:
    info = (await workers_of(scheduler)).get(worker) or {}
    return (info.get("workflows") or {}).get(workflow, {}).get("ready", "absent") is ready


async def _gone(base: str, pid: str):
    response = await get(f"{base}/status/{pid}")
    return response if response.status == 410 else None


@pytest.mark.gen_test(timeout=20)
async def test_workers_and_health_views_and_the_page(tmp_path):
    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<!doctype html><title>t2i</title>")
    (static / "app.js").write_text("console.log('t2i');")
    async with Cluster(tmp_path, static_dir=str(static), poll_interval=0.7) as c:
        page = await fetch_json(c.scheduler.url + "/", connect_timeout=2, request_timeout=5)
        assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
        for path in ("/static/app.js", "/app.js"):
            script = await fetch_json(c.scheduler.url + path, connect_timeout=2, request_timeout=5)
            assert script.status == 200 and "javascript" in script.headers["Content-Type"], path
        missing = await get(c.scheduler.url + "/nothing.css")
        assert missing.status == 404 and missing.body["error"]
        response = await get(c.scheduler.url + "/workers")
        assert response.status == 200
        config = response.body["config"]
        assert config["file"].endswith("workers.yaml") and config["error"] is None and config["loaded_at"]
        for worker in response.body["workers"]:
            assert {"name", "url", "public_url", "enabled", "max_queue", "reachable", "comfyui_reachable",
                    "running", "pending", "last_error", "last_checked", "feed"} <= set(worker)
            assert worker["reachable"] and worker["feed"]["state"] == "up"
        health = await get(c.scheduler.url + "/health")
        assert health.status == 200 and health.body["ok"] and len(health.body["workers"]) == 2
        assert health.body["poll_interval"] == 0.7  # the page polls at the configured interval
        workflows = await get(c.scheduler.url + "/workflows")
        assert workflows.status == 200 and "txt2img" in workflows.body["workflows"]
        assert (await get(c.scheduler.url + "/openapi.json")).body["openapi"].startswith("3.")
        metrics = await AsyncHTTPClient().fetch(c.scheduler.url + "/metrics", request_timeout=5)
        assert metrics.code == 200 and b"t2i_poll_requests_total" in metrics.body


@pytest.mark.gen_test(timeout=20)
async def test_no_worker_reachable_from_the_start(tmp_path):
    (tmp_path / "s").mkdir()
    write_workers_yaml(tmp_path / "s" / "workers.yaml", [{"name": "gone", "url": f"http://127.0.0.1:{free_port()}"}])
    scheduler = await start_scheduler(tmp_path / "s", [])
    try:
        workflows = await get(scheduler.url + "/workflows")
        assert workflows.status == 503 and workflows.headers["Retry-After"] and workflows.body["error"]
        response = await generate(scheduler)
        assert response.status == 503 and "down" in response.body["error"]  # validated shape-only first
        assert (await call("POST", scheduler.url + "/generate", {"prompt": 5})).body["field"] == "prompt"
        unknown = await get(scheduler.url + "/status/whatever")
        assert unknown.status == 503 and unknown.headers["Retry-After"] == "1"  # "gone" might know it
        health = await get(scheduler.url + "/health")
        assert health.status == 503 and health.body == {
            "ok": False, "workers": [{"name": "gone", "ok": False, "reachable": False, "comfyui_reachable": None,
                                      "enabled": True, "pending": 0, "running": 0}],
            "poll_interval": 1.5, "auth": {"required": False, "anonymous": True}}
    finally:
        await scheduler.stop()


@pytest.mark.gen_test(timeout=20)
async def test_a_worker_answering_garbage_is_502(tmp_path):
    sim = await start_sim()
    (tmp_path / "s").mkdir()
    # A pool entry that is not a t2i worker (ComfyUI itself): it answers, but not as a worker does.
    write_workers_yaml(tmp_path / "s" / "workers.yaml", [{"name": "imposter", "url": sim.url}])
    scheduler = await start_scheduler(tmp_path / "s", [])
    try:
        for route in ("status", "result"):
            response = await get(f"{scheduler.url}/{route}/some-id")
            assert response.status == 502 and "imposter" in response.body["error"], response.body
        info = (await workers_of(scheduler))["imposter"]
        assert not info["routable"] and "health" in info["last_error"]
    finally:
        await scheduler.stop()
        await sim.stop()

