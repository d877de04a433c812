"""Webhooks (Standard Webhooks): signed, retried, journaled, only to allowed URLs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os

import pytest
from tornado import web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from support.cluster import WorkerCluster, call, start_worker
from support.timing import until
from t2i.backoff import Backoff
from t2i.worker import webhooks

KEY = os.urandom(24)
SECRET = "whsec_" + base64.b64encode(KEY).decode()


class Receiver:
    """A webhook endpoint on loopback: records every delivery, answers from a script (then 200)."""

    def __init__(self, answers=()):
        self.answers = list(answers)
        self.deliveries: list[tuple[dict, bytes]] = []
        receiver = self

        class Hook(web.RequestHandler):
            def post(self):
                receiver.deliveries.append((dict(self.request.headers), self.request.body))
                self.set_status(receiver.answers.pop(0) if receiver.answers else 200)

        sockets = bind_sockets(0, "127.0.0.1")
        self.server = HTTPServer(web.Application([(r"/hooks/.*", Hook)]))
        self.server.add_sockets(sockets)
        self.url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}/hooks/"

    def stop(self):
        self.server.stop()


def verify(headers: dict, body: bytes) -> dict:
    """The receiver's side of the spec, written from it (not from t2i's code)."""
    msg_id, timestamp = headers["Webhook-Id"], headers["Webhook-Timestamp"]
    expected = base64.b64encode(hmac.new(KEY, f"{msg_id}.{timestamp}.{body.decode()}".encode(),
                                         hashlib.sha256).digest()).decode()
    signatures = [part.split(",", 1)[1] for part in headers["Webhook-Signature"].split() if part.startswith("v1,")]
    assert any(hmac.compare_digest(expected, sig) for sig in signatures), "bad signature"
    return json.loads(body)


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(webhooks, "RETRY", Backoff(first=0.05, maximum=0.2, factor=2, jitter=0))


def hooks_config(receiver: Receiver, **more) -> dict:
    return {"webhooks": {"secret": SECRET, "allowed_urls": [receiver.url], **more}}


async def _webhook(url: str, prompt_id: str) -> dict:
    return (await call("GET", f"{url}/status/{prompt_id}")).json.get("webhook") or {}


@pytest.mark.gen_test(timeout=30)
async def test_a_completed_job_is_announced_once_signed(tmp_path, fast_retries):
    receiver = Receiver()
    try:
        async with WorkerCluster(tmp_path, **hooks_config(receiver)) as c:
            reply = await call("POST", f"{c.url}/generate",
                               {"prompt": "x", "steps": 2, "webhook_url": receiver.url + "job-done?token=abc"})
            assert reply.code == 200, reply
            prompt_id = reply.json["prompt_id"]
            state = await c.wait(prompt_id)
            await until(lambda: len(receiver.deliveries) == 1, what="the delivery")
            headers, body = receiver.deliveries[0]
            event = verify(headers, body)
            assert event["type"] == "job.completed" and event["data"]["prompt_id"] == prompt_id
            assert event["data"]["image_url"] == state["image_url"] and event["timestamp"].endswith("Z")
            assert headers["Webhook-Id"] == f"msg_{prompt_id}" and headers["Content-Type"] == "application/json"
            await until(lambda: _delivered(c.url, prompt_id), what="delivered in /status")
            assert await _webhook(c.url, prompt_id) == {"state": "delivered", "attempts": 1, "last_error": None}
            assert "token" not in json.dumps((await call("GET", f"{c.url}/status/{prompt_id}")).json)
    finally:
        receiver.stop()


async def _delivered(url: str, prompt_id: str) -> bool:
    return (await _webhook(url, prompt_id)).get("state") == "delivered"


@pytest.mark.gen_test(timeout=30)
async def test_a_5xx_is_retried_a_4xx_is_final_and_a_failed_job_says_so(tmp_path, fast_retries):
    receiver = Receiver(answers=[500, 503])
    try:
        async with WorkerCluster(tmp_path, **hooks_config(receiver)) as c:
            first = (await call("POST", f"{c.url}/generate",
                                {"prompt": "x", "steps": 2, "webhook_url": receiver.url})).json["prompt_id"]
            await until(lambda: _delivered(c.url, first), what="delivered after two 5xx")
            state = await _webhook(c.url, first)
            assert state["attempts"] == 3 and state["last_error"] is None and len(receiver.deliveries) == 3
            assert len({h["Webhook-Id"] for h, _ in receiver.deliveries}) == 1  # one message, retried

            receiver.answers = [410]
            c.sim.fail_next("KSampler", "CUDA out of memory")
            second = (await call("POST", f"{c.url}/generate",
                                 {"prompt": "y", "steps": 2, "webhook_url": receiver.url})).json["prompt_id"]
            await until(lambda: _state_is(c.url, second, "failed"), what="the webhook given up")
            state = await _webhook(c.url, second)
            assert state["attempts"] == 1 and "HTTP 410" in state["last_error"]
            event = verify(*receiver.deliveries[-1])
            assert event["type"] == "job.failed" and "CUDA out of memory" in event["data"]["error"]
            assert len(receiver.deliveries) == 4  # nothing after the 2xx, nothing after the 410
    finally:
        receiver.stop()


async def _state_is(url: str, prompt_id: str, state: str) -> bool:
    return (await _webhook(url, prompt_id)).get("state") == state


@pytest.mark.gen_test(timeout=30)
async def test_a_pending_delivery_survives_a_worker_restart(tmp_path, fast_retries):
    receiver = Receiver(answers=[503] * 1000)  # down until we say
    try:
        async with WorkerCluster(tmp_path, **hooks_config(receiver, max_attempts=100000)) as c:
            prompt_id = (await call("POST", f"{c.url}/generate",
                                    {"prompt": "x", "steps": 2, "webhook_url": receiver.url})).json["prompt_id"]
            await until(lambda: len(receiver.deliveries) >= 2, what="failing attempts")
            await c.worker.stop()
            receiver.answers = []  # the receiver is fixed while the worker is away
            count = len(receiver.deliveries)
            c.worker = await start_worker(tmp_path, c.sim.url, **hooks_config(receiver, max_attempts=100000))
            await until(lambda: _delivered(c.url, prompt_id), what="delivered after the restart")
            assert len(receiver.deliveries) == count + 1
            assert verify(*receiver.deliveries[-1])["data"]["prompt_id"] == prompt_id
    finally:
        receiver.stop()


@pytest.mark.gen_test(timeout=30)
async def test_webhook_urls_outside_the_allow_list_or_without_a_secret_are_refused(tmp_path):
    receiver = Receiver()
    try:
        async with WorkerCluster(tmp_path, **hooks_config(receiver)) as c:
            for url in ("http://169.254.169.254/latest/meta-data", "ftp://x", receiver.url.replace("/hooks/", "/")):
                reply = await call("POST", f"{c.url}/generate", {"prompt": "x", "webhook_url": url})
                assert reply.code == 400 and reply.json["field"] == "webhook_url", (url, reply)
            assert receiver.deliveries == [] and c.sim.submitted == []
        async with WorkerCluster(tmp_path / "plain") as c:
            reply = await call("POST", f"{c.url}/generate", {"prompt": "x", "webhook_url": receiver.url})
            assert reply.code == 400 and "not enabled" in reply.json["error"]
    finally:
        receiver.stop()


@pytest.mark.gen_test(timeout=30)
async def test_the_scheduler_checks_the_url_against_its_workers_and_places_the_job(tmp_path, fast_retries):
    from support.cluster import start_scheduler, start_sim

    receiver = Receiver()
    sim = await start_sim(step_time=0.01)
    worker = await start_worker(tmp_path / "w", sim.url, **hooks_config(receiver))
    scheduler = await start_scheduler(tmp_path / "s", [worker])
    try:
        await until(lambda: _catalogue_has_hooks(scheduler.url), what="the worker's catalogue")
        refused = await call("POST", f"{scheduler.url}/generate", {"prompt": "x", "webhook_url": "https://evil/"})
        assert refused.code == 400 and refused.json["field"] == "webhook_url" and sim.submitted == []
        placed = await call("POST", f"{scheduler.url}/generate",
                            {"prompt": "x", "steps": 2, "webhook_url": receiver.url})
        assert placed.code == 200, placed
        await until(lambda: len(receiver.deliveries) == 1, what="the delivery")
        assert verify(*receiver.deliveries[0])["data"]["prompt_id"] == placed.json["prompt_id"]
    finally:
        await scheduler.stop()
        await worker.stop()
        await sim.stop()
        receiver.stop()


async def _catalogue_has_hooks(url: str) -> bool:
    reply = await call("GET", f"{url}/workflows")
    return reply.code == 200 and bool((reply.json or {}).get("webhooks"))
