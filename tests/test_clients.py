"""Clients of the scheduler (issue 12): API keys, the fair share, "my jobs", cancel own and cancel all.

Real schedulers, workers and ComfyUI doubles on loopback (tests/support/cluster.py). Jobs that must
stay unfinished while a test looks at them run slowly (50 steps of 0.5 s); the cluster stops them.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest
import yaml

from support.cluster import SchedulerCluster, WorkerCluster, call, wait_status
from support.net import free_port
from support.timing import FakeClock, until
from t2i.config import ConfigError, load_scheduler_config
from t2i.scheduler.mirror import SHARE_GRACE

ROOT = Path(__file__).resolve().parent.parent

ALICE = "alice-key-5f2b8c1e9d7a4036"
BOB = "bob-key-0c4e7a91d3b25f68"
CAROL = "carol-key-8e1d2f7b6a3c9054"
WRONG = "wrong-key-1a2b3c4d5e6f7a8b"
KEYS = {"alice": ALICE, "bob": BOB, "carol": CAROL}
SLOW = {"prompt": "a slow red fox", "steps": 50}   # 25 s at 0.5 s a step: unfinished while the test looks
QUICK = {"prompt": "a quick red fox", "steps": 2}
ANON = "anon:127.0.0.1"


async def generate(base: str, token: str | None = None, body: dict | None = None, **kwargs):
    return await call("POST", f"{base}/generate", body or SLOW, token=token, **kwargs)


async def submit(base: str, token: str | None = None, body: dict | None = None) -> str:
    reply = await generate(base, token, body)
    assert reply.code == 200, reply
    return reply.json["prompt_id"]


async def jobs(base: str, token: str | None = None, **query) -> dict:
    reply = await call("GET", f"{base}/jobs" + (f"?{urlencode(query)}" if query else ""), token=token)
    assert reply.code == 200, reply
    return reply.json


def ids(listing: dict) -> list[str]:
    return [job["prompt_id"] for job in listing["jobs"]]


async def listed(base: str, token: str | None, count: int, **query) -> dict:
    """The client's listing once it holds ``count`` jobs (a job reaches the mirror through its worker's feed)."""
    async def enough():
        listing = await jobs(base, token, **query)
        return listing if len(listing["jobs"]) == count else None

    return await until(enough, what=f"{count} jobs listed")


# --- keys ----------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_keys_none_wrong_and_right_and_what_needs_no_key(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    async with SchedulerCluster(tmp_path, n=1, clients={"keys": KEYS, "allow_anonymous": False}) as c:
        base = c.scheduler.url
        basic = {"Authorization": "Basic " + base64.b64encode(b"alice:" + ALICE.encode()).decode()}
        for token, headers, why in ((None, None, "needs an API key"), (WRONG, None, "not valid"),
                                    (None, basic, "needs an API key")):
            for method, path, body in (("POST", "/generate", QUICK), ("GET", "/jobs", None),
                                       ("POST", "/cancel", None), ("POST", "/cancel/some-id", None)):
                reply = await call(method, base + path, body, token=token, headers=headers)
                assert reply.code == 401 and reply.headers["WWW-Authenticate"] == "Bearer", (path, reply)
                assert why in reply.json["error"], reply
        # What never needs a key: health (which says a key is needed), the page, status and result.
        health = await call("GET", f"{base}/health")
        assert health.json["auth"] == {"required": True, "anonymous": False}, health
        page = await call("GET", f"{base}/")
        assert page.code == 200 and b"<html" in page.body.lower()
        placed = await generate(base, ALICE, QUICK)
        assert placed.code == 200, placed
        prompt_id = placed.json["prompt_id"]
        state = await wait_status(base, prompt_id)
        assert state["status"] == "completed" and state["client"] == "alice"
        assert (await call("GET", f"{base}/result/{prompt_id}")).code == 200
        # The worker holds the client's name (journaled with the job) and shows it too.
        on_worker = await call("GET", f"{c.workers[0].url}/status/{prompt_id}")
        assert on_worker.json["client"] == "alice"
        assert c.workers[0].store.get(prompt_id).client == "alice"
    # A key is never logged, the wrong one either; the client's name is.
    assert ALICE not in caplog.text and WRONG not in caplog.text
    assert re.search(rf"placed job {prompt_id} on worker gpu-0 for client alice", caplog.text)


@pytest.mark.gen_test(timeout=60)
async def test_anonymous_clients_are_one_per_address_and_a_wrong_key_is_still_401(tmp_path):
    async with SchedulerCluster(tmp_path, n=1, step_time=0.5, clients={"keys": KEYS}) as c:
        base = c.scheduler.url
        health = await call("GET", f"{base}/health")
        assert health.json["auth"] == {"required": False, "anonymous": True}
        wrong = await generate(base, WRONG)
        assert wrong.code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
        anon = await submit(base)
        alice = await submit(base, ALICE)
        mine = await listed(base, None, 1)
        assert mine["client"] == ANON and ids(mine) == [anon] and mine["jobs"][0]["client"] == ANON
        assert ids(await listed(base, ALICE, 1)) == [alice]


# --- keys_file -----------------------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_a_keys_file_edited_live_and_a_broken_edit_keeps_the_last_good_keys(tmp_path):
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"alice": ALICE}))
    async with SchedulerCluster(tmp_path, n=1, clients={"keys_file": str(keys_file),
                                                         "allow_anonymous": False}) as c:
        base = c.scheduler.url

        async def code(token):
            return (await call("GET", f"{base}/jobs", token=token)).code

        assert await code(ALICE) == 200 and await code(BOB) == 401
        keys_file.write_text(yaml.safe_dump({"alice": ALICE, "bob": BOB}))
        await until(lambda: _is(code(BOB), 200), what="bob's key taken")
        keys_file.write_text("alice: [" + ALICE + "\n")   # broken YAML
        error = await until(lambda: c.scheduler.clients.error, what="the broken edit reported")
        assert "keys.yaml:" in error and "invalid YAML" in error and ALICE not in error
        assert await code(ALICE) == 200 and await code(BOB) == 200   # the last good keys
        keys_file.write_text(yaml.safe_dump({"bob": BOB, "carol": "short"}))   # a bad key: refused whole
        await until(lambda: c.scheduler.clients.error and "carol" in c.scheduler.clients.error)
        assert await code(ALICE) == 200
        keys_file.write_text(yaml.safe_dump({"bob": BOB}))
        await until(lambda: _is(code(ALICE), 401), what="alice's key gone")
        assert await code(BOB) == 200 and c.scheduler.clients.error is None


async def _is(awaitable, value) -> bool:
    return await awaitable == value


@pytest.mark.gen_test(timeout=60)
async def test_sighup_reloads_the_keys_file_at_once(tmp_path):
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"alice": ALICE}))
    (tmp_path / "workers.yaml").write_text("workers: []\n")
    port = free_port()
    config = tmp_path / "scheduler.yaml"
    config.write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}", "workers_file": "workers.yaml", "reload_interval": 60,
        "clients": {"keys_file": "keys.yaml", "allow_anonymous": False}}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "t2i.scheduler", "--config", str(config), "--log-level", "info", cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"

    async def code(token):
        try:
            return (await call("GET", f"{base}/jobs", token=token, timeout=2)).code
        except ConnectionError:
            return None

    try:
        await until(lambda: _is(code(ALICE), 200), timeout=30, what="the scheduler process")
        assert await code(BOB) == 401
        keys_file.write_text(yaml.safe_dump({"alice": ALICE, "bob": BOB}))
        proc.send_signal(signal.SIGHUP)   # reload_interval is 60 s: only the signal explains a reload
        await until(lambda: _is(code(BOB), 200), timeout=5, what="bob's key after SIGHUP")
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0, stderr.decode()
        assert b"client keys (alice, bob)" in stderr and ALICE.encode() not in stderr, stderr.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --- the fair share ------------------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_a_client_at_max_jobs_gets_429_and_another_is_served_at_once(tmp_path):
    async with SchedulerCluster(tmp_path, n=2, step_time=0.5, clients={"keys": KEYS, "max_jobs": 2}) as c:
        base = c.scheduler.url
        keyed = await generate(base, ALICE, headers={"Idempotency-Key": "order-1"})
        assert keyed.code == 200
        second = await submit(base, ALICE)
        full = await generate(base, ALICE)
        assert full.code == 429 and int(full.headers["Retry-After"]) >= 1, full
        assert "2 unfinished jobs" in full.json["error"] and full.json["max_jobs"] == 2
        assert full.json["unfinished"] == 2
        assert (await generate(base, BOB)).code == 200   # another client: placed as usual
        # A retry of a job alice holds is that job, not a new one: no 429.
        again = await generate(base, ALICE, headers={"Idempotency-Key": "order-1"})
        assert again.code == 200 and again.json["prompt_id"] == keyed.json["prompt_id"]
        # A burst in parallel is capped too (jobs being placed count): carol gets exactly two.
        burst = await asyncio.gather(*(generate(base, CAROL) for _ in range(6)))
        assert sorted(r.code for r in burst) == [200, 200, 429, 429, 429, 429], burst
        # One of alice's jobs ends: room again (once its worker's feed says so).
        assert (await call("POST", f"{base}/cancel/{second}", token=ALICE)).code == 200
        await until(lambda: _is(_code(generate(base, ALICE)), 200), what="room after a cancel")
        metrics = (await call("GET", f"{base}/metrics")).body.decode()
        assert re.search(r'^t2i_client_jobs_accepted_total\{client="alice"\} [1-9]', metrics, re.M)
        assert re.search(r'^t2i_client_throttled_total\{client="carol"\} [1-9]', metrics, re.M)
        assert re.search(r'^t2i_client_unfinished_jobs\{client="carol"\} 2\.0$', metrics, re.M)
        assert re.search(r'^t2i_client_unfinished_jobs\{client="alice"\} 2\.0$', metrics, re.M)


async def _code(awaitable) -> int:
    return (await awaitable).code


@pytest.mark.gen_test(timeout=60)
async def test_jobs_on_a_worker_that_stays_down_stop_counting_after_a_grace(tmp_path):
    async with SchedulerCluster(tmp_path, n=2, step_time=0.5, clients={"keys": KEYS, "max_jobs": 1}) as c:
        base = c.scheduler.url
        clock = FakeClock(now=time.time())
        c.scheduler.mirror.clock = clock   # the mirror's wall clock: when a feed went down
        placed = await generate(base, ALICE)
        assert placed.code == 200 and (await generate(base, ALICE)).code == 429
        holder = c.worker_named(placed.json["worker"])
        await holder.stop()
        await until(lambda: not c.scheduler.mirror.feed_up(holder.config.name), what="its feed down")
        # A feed that just went down (as when a health check times out on a busy box) still counts
        # the job as alice's: a blip must not let her past her cap ...
        assert (await generate(base, ALICE)).code == 429
        # ... while a worker that stays down does not lock her out.
        clock.advance(SHARE_GRACE + 1)
        again = await generate(base, ALICE)
        assert again.code == 200 and again.json["worker"] != holder.config.name, again


@pytest.mark.gen_test(timeout=60)
async def test_two_scheduler_replicas_enforce_one_limit(tmp_path):
    async with SchedulerCluster(tmp_path, n=1, step_time=0.5, clients={"keys": KEYS, "max_jobs": 2}) as c:
        second = await c.add_scheduler()
        placed = [await submit(c.scheduler.url, ALICE) for _ in range(2)]
        # The other replica counts them from the worker's feed.
        assert sorted(ids(await listed(second.url, ALICE, 2))) == sorted(placed)
        refused = await generate(second.url, ALICE)
        assert refused.code == 429 and refused.headers["Retry-After"], refused
        assert (await generate(second.url, BOB)).code == 200
        assert (await generate(c.scheduler.url, ALICE)).code == 429


# --- my jobs -------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_the_callers_own_jobs_newest_first_paged_and_filtered(tmp_path):
    async with SchedulerCluster(tmp_path, n=2, step_time=0.5, clients={"keys": KEYS}) as c:
        base = c.scheduler.url
        mine = [await submit(base, ALICE) for _ in range(3)]
        bobs = await submit(base, BOB)
        await submit(base)   # an anonymous one
        listing = await listed(base, ALICE, 3)
        assert listing["client"] == "alice" and ids(listing) == mine[::-1] and listing["next"] is None
        assert all(job["client"] == "alice" for job in listing["jobs"])
        status = (await call("GET", f"{base}/status/{mine[0]}")).json   # the same objects as /status
        assert set(listing["jobs"][-1]) == set(status) and listing["jobs"][-1]["prompt_id"] == status["prompt_id"]
        assert ids(await listed(base, BOB, 1)) == [bobs]
        # Pages: limit and the cursor of the previous page; a job placed between pages shifts nothing.
        first = await jobs(base, ALICE, limit=2)
        assert ids(first) == [mine[2], mine[1]] and first["next"]
        newest = await submit(base, ALICE)
        second = await jobs(base, ALICE, limit=2, before=first["next"])
        assert ids(second) == [mine[0]] and second["next"] is None
        await listed(base, ALICE, 4)
        assert ids(await jobs(base, ALICE, limit=1)) == [newest]
        # The status filter.
        assert (await call("POST", f"{base}/cancel/{mine[1]}", token=ALICE)).code == 200
        assert ids(await listed(base, ALICE, 1, status="cancelled")) == [mine[1]]
        assert ids(await jobs(base, ALICE, status="pending,running")) == [newest, mine[2], mine[0]]
        assert ids(await jobs(base, ALICE, status="completed")) == []
        for query, field in (("limit=0", "limit"), ("limit=501", "limit"), ("limit=x", "limit"),
                             ("status=done", "status"), ("status=", "status"), ("before=not-a-cursor", "before"),
                             ("before=" + base64.urlsafe_b64encode(b'{"a":1}').decode(), "before")):
            reply = await call("GET", f"{base}/jobs?{query}", token=ALICE)
            assert reply.code == 400 and reply.json["field"] == field, (query, reply)


# --- cancel --------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_cancel_own_not_anothers_and_all(tmp_path):
    async with SchedulerCluster(tmp_path, n=1, step_time=0.5, clients={"keys": KEYS}) as c:
        base = c.scheduler.url
        alices = [await submit(base, ALICE) for _ in range(3)]
        bobs = await submit(base, BOB)
        unknown = await call("POST", f"{base}/cancel/no-such-job", token=ALICE)
        others = await call("POST", f"{base}/cancel/{bobs}", token=ALICE)
        assert unknown.code == others.code == 404, others   # as if unknown: the same answer
        assert others.json == {"error": unknown.json["error"].replace("no-such-job", bobs)}
        own = await call("POST", f"{base}/cancel/{alices[0]}", token=ALICE)
        assert own.code == 200 and own.json["status"] == "cancelled" and own.json["client"] == "alice"
        assert (await call("POST", f"{base}/cancel/{alices[0]}", token=ALICE)).code == 409
        everything = await call("POST", f"{base}/cancel", token=ALICE)
        assert everything.code == 200, everything
        assert everything.json["cancelled"] == 2 and sorted(everything.json["prompt_ids"]) == sorted(alices[1:])
        assert everything.json["failed"] == []
        for prompt_id in alices:
            assert (await wait_status(base, prompt_id))["status"] == "cancelled"
        assert (await call("GET", f"{base}/status/{bobs}")).json["status"] in ("pending", "running")
        nothing = await call("POST", f"{base}/cancel", token=ALICE)
        assert nothing.code == 200 and nothing.json["cancelled"] == 0 and nothing.json["prompt_ids"] == []
        big = await call("POST", f"{base}/cancel", raw=b"x" * 20_000_000, token=ALICE,
                         headers={"Content-Type": "application/json"})
        assert big.code == 413, big
        text = await call("POST", f"{base}/cancel", raw=b"", token=ALICE, headers={"Content-Type": "text/plain"})
        assert text.code == 415, text
        # A job whose worker cannot be reached is not cancelled, and says why.
        await c.workers[0].stop()
        stuck = await call("POST", f"{base}/cancel", token=BOB)
        assert stuck.code == 200 and stuck.json["cancelled"] == 0, stuck
        assert [f["prompt_id"] for f in stuck.json["failed"]] == [bobs] and stuck.json["failed"][0]["error"]


# --- the worker's side ---------------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_a_worker_takes_the_client_only_with_the_schedulers_token_and_journals_it(tmp_path):
    token = "scheduler-token-7d1e"
    async with SchedulerCluster(tmp_path / "a", n=1, auth_token=token, worker_overrides={"auth_token": token},
                                clients={"keys": KEYS}) as c:
        prompt_id = await submit(c.scheduler.url, BOB, QUICK)
        assert (await wait_status(c.workers[0].url, prompt_id))["client"] == "bob"
        direct = await call("POST", f"{c.workers[0].url}/generate", QUICK, headers={"T2I-Client": "bob"})
        assert direct.code == 401
        trusted = await call("POST", f"{c.workers[0].url}/generate", QUICK, token=token,
                             headers={"T2I-Client": "carol"})
        assert trusted.code == 200
        assert (await wait_status(c.workers[0].url, trusted.json["prompt_id"]))["client"] == "carol"
        # Journaled: a restarted worker still knows whose job it was.
        await c.workers[0].stop()
        worker = await c.restart_worker(0, auth_token=token)
        assert (await call("GET", f"{worker.url}/status/{prompt_id}")).json["client"] == "bob"
    async with WorkerCluster(tmp_path / "b") as w:   # no auth_token: the header is taken as given
        named = await w.submit(QUICK, headers={"T2I-Client": "dave"})
        unnamed = await w.submit(QUICK)
        assert (await w.wait(named))["client"] == "dave" and (await w.wait(unnamed))["client"] is None
        bad = await w.generate(QUICK, headers={"T2I-Client": "x" * 201})
        assert bad.code == 400 and bad.json["header"] == "T2I-Client"


@pytest.mark.gen_test(timeout=30)
async def test_the_workers_own_queue_takes_turns_between_clients(tmp_path):
    """One client's burst waiting on a worker does not queue another client's job behind all of it."""
    async with WorkerCluster(tmp_path, comfyui={"ahead": 1}) as c:
        c.sim.stall = True
        flood = {"T2I-Client": "flood"}
        first = await c.submit(QUICK, headers=flood)
        await c.wait(first, "running")
        floods = [await c.submit({**QUICK, "seed": seed}, headers=flood) for seed in range(3)]
        polite = await c.submit(QUICK, headers={"T2I-Client": "polite"})
        positions = [(await call("GET", f"{c.url}/status/{p}")).json["queue_position"] for p in [polite, *floods]]
        assert positions == [1, 2, 3, 4]   # polite's turn comes before the flood's second
        c.sim.stall = False
        for prompt_id in [first, polite, *floods]:
            assert (await c.wait(prompt_id))["status"] == "completed"
        assert [p for p, _, _ in c.sim.submitted] == [first, polite, *floods]


# --- config --------------------------------------------------------------------------

@pytest.mark.parametrize("text, where, problem", [
    ("clients: {keys: {alice: short-key}}\n", ":1: clients.keys.alice:", "at least 16 printable"),
    ("clients:\n  keys:\n    alice: 12345678901234567890\n", ":3: clients.keys.alice:", "must be a string"),
    (f"clients:\n  keys:\n    alice: {ALICE}\n    bob: {ALICE}\n", ":4: clients.keys.bob:", "same key as 'alice'"),
    (f"clients:\n  keys:\n    'anon:x': {ALICE}\n", ":3: clients.keys.anon:x:", "client name must be"),
    ("clients: {keys: [a, b]}\n", ":1: clients.keys:", "must be a mapping"),
    ("clients: {allow_anonymous: false}\n", ":1: clients.allow_anonymous:", "nobody could submit"),
    ("clients: {max_jobs: 0}\n", ":1: clients.max_jobs:", "at least 1"),
    ("clients: {max_job: 3}\n", ":1: clients.max_job:", "unknown key (did you mean 'max_jobs'?)"),
    ("clients: {allow_anonymous: 'no'}\n", ":1: clients.allow_anonymous:", "true or false"),
    (f"clients: {{keys: {{alice: {ALICE}}}, keys_file: k.yaml}}\n", ":1: clients.keys:", "not both"),
    ("clients: {keys_file: missing.yaml}\n", "missing.yaml:", "file not found"),
])
def test_clients_config_mistakes_name_file_line_and_key_never_the_key(tmp_path, text, where, problem):
    path = tmp_path / "scheduler.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_scheduler_config(path)
    message = str(caught.value)
    assert where in message and problem in message, message
    assert ALICE not in message and "12345678901234567890" not in message


def test_clients_defaults_and_a_keys_file(tmp_path):
    default = load_scheduler_config(_write(tmp_path / "a.yaml", "listen: '127.0.0.1:8000'\n")).clients
    assert (default.keys, default.keys_file, default.allow_anonymous, default.max_jobs) == ({}, None, True, 8)
    _write(tmp_path / "keys.yaml", f"alice: {ALICE}\nbob: {BOB}\n")
    config = load_scheduler_config(_write(tmp_path / "b.yaml", "clients:\n  keys_file: keys.yaml\n"
                                                               "  allow_anonymous: false\n  max_jobs: 3\n")).clients
    assert config.keys == {"alice": ALICE, "bob": BOB} and config.keys_file == tmp_path / "keys.yaml"
    assert not config.allow_anonymous and config.max_jobs == 3 and ALICE not in repr(config)
    _write(tmp_path / "keys.yaml", "")
    with pytest.raises(ConfigError, match="keys.yaml: is empty"):
        load_scheduler_config(tmp_path / "b.yaml")


def test_a_clients_mistake_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "workers.yaml").write_text("workers: []\n")
    path = _write(tmp_path / "scheduler.yaml", f"workers_file: workers.yaml\nclients:\n  keys:\n    alice: {ALICE}\n"
                                                "    bob: tiny\n")
    result = subprocess.run([sys.executable, "-m", "t2i.scheduler", "--config", str(path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "scheduler.yaml:5: clients.keys.bob:" in lines[0], result.stderr
    assert "tiny" not in result.stderr and ALICE not in result.stderr


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
