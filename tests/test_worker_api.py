"""The worker's HTTP API around the jobs: auth, bad requests, the feed, long-polls, health, shutdown."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.cluster import WorkerCluster, call, write_worker_yaml
from support.net import free_port

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.gen_test(timeout=30)
async def test_auth_token_guards_generate_cancel_and_the_feed(tmp_path):
    async with WorkerCluster(tmp_path, auth_token="s3cret") as c:
        reply = await c.generate({"prompt": "x", "steps": 2})
        assert reply.code == 401 and reply.headers["WWW-Authenticate"] == "Bearer" and "token" in reply.json["error"]
        assert (await c.generate({"prompt": "x"}, token="wrong")).code == 401
        reply = await c.generate({"prompt": "x", "steps": 2}, token="s3cret")
        assert reply.code == 200
        prompt_id = reply.json["prompt_id"]
        assert (await call("GET", f"{c.url}/jobs")).code == 401
        assert (await call("GET", f"{c.url}/jobs", token="s3cret")).code == 200
        assert (await call("POST", f"{c.url}/cancel/{prompt_id}")).code == 401
        # Status, result and images are open to whoever knows the id.
        state = await c.wait(prompt_id)
        assert state["status"] == "completed"
        assert (await call("GET", state["image_url"])).code == 200
        assert (await call("GET", f"{c.url}/result/{prompt_id}")).code == 200


@pytest.mark.gen_test(timeout=30)
async def test_bad_requests_are_json_errors(tmp_path):
    async with WorkerCluster(tmp_path, max_body_bytes=2048) as c:
        big = await c.generate({"prompt": "x" * 5000})
        assert big.code == 413 and "larger than 2048" in big.json["error"]
        # Other routes are capped too (by the server, before any handler reads the body).
        huge = await call("POST", f"{c.url}/cancel/x", raw=b"x" * 200_000)
        assert huge.code == 413 and "larger than 2048" in huge.json["error"]
        assert (await call("GET", f"{c.url}/health")).code == 200
        bad_json = await call("POST", f"{c.url}/generate", raw=b"{not json", headers={"Content-Type": "application/json"})
        assert bad_json.code == 400 and "not valid JSON" in bad_json.json["error"]
        empty = await call("POST", f"{c.url}/generate")
        assert empty.code == 400 and "empty" in empty.json["error"]
        unknown = await c.generate({"prompt": "x", "colour": "red"})
        assert unknown.code == 400 and unknown.json["field"] == "colour"
        not_object = await c.generate(["prompt"])
        assert not_object.code == 400 and "JSON object" in not_object.json["error"]
        for path in ("/nope", "/status", "/status/unknown-id", "/result/unknown-id", "/previews/unknown-id"):
            reply = await call("GET", c.url + path)
            assert reply.code == 404 and reply.headers["Content-Type"].startswith("application/json"), path
            assert reply.json["error"], path
        bad_since = await call("GET", f"{c.url}/jobs?since=abc")
        assert bad_since.code == 400 and bad_since.json["field"] == "since"
        prompt_id = await c.submit({"prompt": "x", "steps": 2})
        for query, field in (("wait=soon", "wait"), ("wait=-1", "wait"), ("wait=nan", "wait"), ("since=1.5", "since")):
            reply = await call("GET", f"{c.url}/status/{prompt_id}?{query}")
            assert reply.code == 400 and reply.json["field"] == field, query


@pytest.mark.gen_test(timeout=30)
async def test_images_route_serves_nothing_outside_images(tmp_path):
    async with WorkerCluster(tmp_path) as c:
        state = await c.wait(await c.submit({"prompt": "x", "steps": 2}))
        name = state["image_url"].rsplit("/", 1)[1]
        (tmp_path / "images" / "notes.txt").write_text("secret")
        (tmp_path / "secret.png").write_bytes(b"secret")
        for path in ("/images/../worker.yaml", "/images/%2e%2e/worker.yaml", "/images/..%2fworker.yaml",
                     "/images/notes.txt", "/images/", "/images/%2e%2e%2fsecret.png",
                     "/images/" + name.replace(".png", ".jpg"),
                     "/images/00000000-0000-0000-0000-000000000000_0.png", f"/images/sub/{name}"):
            reply = await call("GET", c.url + path)
            assert reply.code == 404, (path, reply)
            assert reply.json["error"] and b"secret" not in reply.body, path
        assert (await call("GET", f"{c.url}/images/{name}")).code == 200


@pytest.mark.gen_test(timeout=30)
async def test_jobs_feed_full_list_since_waits_removals_and_epoch(tmp_path):
    async with WorkerCluster(tmp_path) as c:
        empty = (await call("GET", f"{c.url}/jobs")).json
        # seq starts from the clock, not 0: versions keep growing across a worker restart.
        assert empty == {"epoch": c.worker.store.epoch, "seq": c.worker.store.seq, "full": True, "jobs": [],
                         "removed": []}
        assert empty["seq"] > 0
        # A follower of a worker with no job at all waits too, instead of spinning.
        waiting = asyncio.ensure_future(call("GET", f"{c.url}/jobs?since={empty['seq']}&wait=10"))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        first = await c.submit({"prompt": "one", "steps": 2})
        page = (await waiting).json
        assert page["full"] is False and [j["prompt_id"] for j in page["jobs"]] == [first]
        await c.wait(first)
        full = (await call("GET", f"{c.url}/jobs?since=0")).json
        assert full["full"] is True and [j["prompt_id"] for j in full["jobs"]] == [first]
        assert full["jobs"][0]["status"] == "completed" and full["seq"] >= full["jobs"][0]["version"]

        # Nothing new: a waiting follower is answered when the next job appears.
        cursor = full["seq"]
        waiting = asyncio.ensure_future(call("GET", f"{c.url}/jobs?since={cursor}&wait=10"))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        second = await c.submit({"prompt": "two", "steps": 2})
        changes = (await waiting).json
        assert changes["full"] is False and changes["epoch"] == full["epoch"]
        assert [j["prompt_id"] for j in changes["jobs"]] == [second] and changes["seq"] > cursor
        await c.wait(second)

        # A wait with nothing happening ends after `wait` seconds with no changes.
        cursor = (await call("GET", f"{c.url}/jobs?since=0")).json["seq"]
        started = time.monotonic()
        idle = (await call("GET", f"{c.url}/jobs?since={cursor}&wait=0.3")).json
        assert time.monotonic() - started >= 0.25
        assert idle["jobs"] == [] and idle["removed"] == [] and idle["seq"] == cursor

        c.worker.store.remove([first])
        removed = (await call("GET", f"{c.url}/jobs?since={cursor}")).json
        assert removed["removed"] == [first] and removed["jobs"] == []
        gone = await call("GET", f"{c.url}/status/{first}")
        assert gone.code == 410 and "removed" in gone.json["error"]
        assert (await call("GET", f"{c.url}/result/{first}")).code == 410
        # A cursor from the future (the worker restarted) gets a full list.
        assert (await call("GET", f"{c.url}/jobs?since={cursor + 1000}")).json["full"] is True


@pytest.mark.gen_test(timeout=30)
async def test_status_long_poll(tmp_path):
    async with WorkerCluster(tmp_path, sim={"step_time": 0.05}) as c:
        prompt_id = await c.submit({"prompt": "x", "steps": 6})
        first = (await call("GET", f"{c.url}/status/{prompt_id}")).json
        # An old version answers at once.
        started = time.monotonic()
        reply = await call("GET", f"{c.url}/status/{prompt_id}?wait=10&since={first['version'] - 1}")
        assert reply.code == 200 and time.monotonic() - started < 5  # not the 10 s wait
        # The current version waits for the next change, which comes long before 10 s.
        reply = await call("GET", f"{c.url}/status/{prompt_id}?wait=10&since={first['version']}")
        assert reply.json["version"] > first["version"]
        done = await c.wait(prompt_id)
        # Nothing changes any more: the wait runs out (capped by `wait`) and returns the same state.
        started = time.monotonic()
        same = await call("GET", f"{c.url}/status/{prompt_id}?wait=0.3&since={done['version']}")
        assert time.monotonic() - started >= 0.25 and same.json == done


@pytest.mark.gen_test(timeout=30)
async def test_long_poll_stops_waiting_when_the_client_goes_away(tmp_path):
    async with WorkerCluster(tmp_path, sim={"step_time": 0.05}) as c:
        c.sim.stall = True
        prompt_id = await c.submit({"prompt": "x", "steps": 3})
        version = (await c.wait(prompt_id, "running"))["version"]  # stalled: no more changes
        store = c.worker.store
        with pytest.raises(ConnectionError):
            await call("GET", f"{c.url}/status/{prompt_id}?wait=30&since={version}", timeout=0.3)
        for _ in range(100):
            if not store._waiters:
                break
            await asyncio.sleep(0.02)
        assert not store._waiters
        c.sim.stall = False


@pytest.mark.gen_test(timeout=30)
async def test_health_workflows_and_metrics(tmp_path):
    async with WorkerCluster(tmp_path) as c:
        health = await call("GET", f"{c.url}/health")
        assert health.code == 200
        assert health.json["ok"] is True and health.json["name"] == "gpu-a"
        assert health.json["comfyui"] == {"reachable": True, "url": c.sim.url, "error": None, "queue_running": 0,
                                          "queue_pending": 0, "websocket_connected": True}
        assert health.json["jobs"] == {"held": 0, "pending": 0, "running": 0}
        assert "prune" in health.json
        workflows = (await call("GET", f"{c.url}/workflows")).json
        assert workflows["default_workflow"] == "txt2img" and workflows["allow_raw_workflows"] is False
        assert workflows["workflows"]["txt2img"]["params"]["steps"] == {"type": "integer", "default": 20, "min": 1,
                                                                         "max": 150}
        await c.wait(await c.submit({"prompt": "x", "steps": 2}))
        metrics = await call("GET", f"{c.url}/metrics")
        assert metrics.code == 200
        assert b't2i_jobs_submitted_total{worker="gpu-a"}' in metrics.body
        assert b't2i_jobs_finished_total{status="completed",worker="gpu-a"}' in metrics.body
        assert b't2i_job_duration_seconds_count{worker="gpu-a"}' in metrics.body
        document = await call("GET", f"{c.url}/openapi.json")
        assert document.code == 200 and "/jobs" in document.json["paths"]


def test_sigterm_shuts_down_cleanly(tmp_path):
    port = free_port()
    config = write_worker_yaml(tmp_path, f"http://127.0.0.1:{free_port()}", port=port)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "t2i.worker", "--config", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            except urllib.error.HTTPError as exc:
                assert exc.code == 503  # ComfyUI is down, the worker is up
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 5
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.gen_test(timeout=30)
async def test_result_waits_for_the_end_and_redirects_to_the_image(tmp_path):
    """One request to the result: no status loop for an API client."""
    async with WorkerCluster(tmp_path, sim={"step_time": 0.05}) as c:
        prompt_id = await c.submit({"prompt": "x", "steps": 10})
        early = await call("GET", f"{c.url}/result/{prompt_id}?wait=0")
        assert early.code == 202
        done = await call("GET", f"{c.url}/result/{prompt_id}?wait=30")
        assert done.code == 200 and done.json["status"] == "completed" and done.json["image_url"]
        moved = await call("GET", f"{c.url}/result/{prompt_id}?redirect=image")
        assert moved.code == 303 and moved.headers["Location"] == done.json["image_url"]
        image = await call("GET", moved.headers["Location"])
        assert image.code == 200 and image.body.startswith(b"\x89PNG")
