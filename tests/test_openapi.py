"""Each server's own OpenAPI document, and the answers only the scheduler gives on shared routes.

t2i/openapi.yaml describes both servers; ``x-servers`` marks which serve an operation
(and, where a status comes from only one of them, that response). ``GET /openapi.json``
serves the server's own cut; conftest.py checks every response against the document of
the server that sent it. tests/test_fuzz.py runs schemathesis against both.
"""

from __future__ import annotations

import pytest

from support.cluster import SchedulerCluster, call, start_scheduler, start_sim, write_workers_yaml
from support.net import free_port
from t2i import openapi


def operations(server: str | None) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, ops in openapi.document(server)["paths"].items() for method in ops}


def test_each_server_has_only_its_operations():
    worker, scheduler, both = operations("worker"), operations("scheduler"), operations(None)
    assert worker | scheduler == both
    # GET /jobs is the worker's change feed and the scheduler's list of a client's jobs (x-per-server)
    assert ("GET", "/jobs") in worker and ("GET", "/jobs") in scheduler
    jobs = {server: openapi.document(server)["paths"]["/jobs"]["get"] for server in ("worker", "scheduler")}
    assert jobs["worker"]["x-servers"] == ["worker"] and jobs["scheduler"]["x-servers"] == ["scheduler"]
    assert {p["name"] for p in jobs["scheduler"]["parameters"]} == {"limit", "status", "before"}
    assert ("POST", "/cancel") in scheduler and ("POST", "/cancel") not in worker
    assert ("GET", "/images/{filename}") in worker and ("GET", "/previews/{prompt_id}") in worker
    assert ("GET", "/workers") in scheduler and ("GET", "/workers") not in worker
    assert not {("GET", "/images/{filename}"), ("GET", "/previews/{prompt_id}")} & scheduler
    shared = {("POST", "/generate"), ("GET", "/status/{prompt_id}"), ("GET", "/result/{prompt_id}"),
              ("POST", "/cancel/{prompt_id}"), ("GET", "/health"), ("GET", "/workflows"), ("GET", "/metrics"),
              ("GET", "/openapi.json")}
    assert shared <= worker & scheduler
    assert openapi.document("worker")["info"]["title"] == "t2i worker"


def test_responses_only_one_server_gives_are_in_its_document_only():
    def statuses(server: str, method: str, path: str) -> set[int]:
        return {s for m, p, s in openapi.documented_responses(server) if (m, p) == (method, path)}

    # Both check a key (the worker its auth_token, the scheduler its clients'); only the scheduler caps a
    # client (429) and has an owner to be out of reach of.
    for server in ("worker", "scheduler"):
        assert 401 in statuses(server, "POST", "/generate") and 401 in statuses(server, "POST", "/cancel/{prompt_id}")
    assert 429 in statuses("scheduler", "POST", "/generate") and 429 not in statuses("worker", "POST", "/generate")
    for path in ("/status/{prompt_id}", "/result/{prompt_id}"):
        assert {502, 503} <= statuses("scheduler", "GET", path)
        assert not {502, 503} & statuses("worker", "GET", path)
    assert 503 in statuses("scheduler", "GET", "/workflows") and 503 not in statuses("worker", "GET", "/workflows")
    assert openapi.documented_responses(None) == (openapi.documented_responses("worker")
                                                 | openapi.documented_responses("scheduler"))


def test_a_request_must_name_the_prompt_unless_it_is_a_raw_workflow():
    schemas = openapi.document()["components"]["schemas"]
    template, raw = schemas["TemplateRequest"], schemas["RawWorkflowRequest"]
    assert template["required"] == ["prompt"] and raw["required"] == ["workflow"]
    assert "prompt" not in raw["properties"]
    body = {"$ref": "#/components/schemas/GenerateRequest"}

    def problems(value):  # t2i.openapi.validate's oneOf: exactly one branch must match
        return openapi.validate(value, body)

    assert problems({"prompt": "a fox", "steps": 4}) == []
    assert problems({"workflow": {"1": {"class_type": "EmptyImage", "inputs": {}}}}) == []
    assert problems({"steps": 4}) and problems({}) and problems({"workflow": {}, "prompt": "x"})


def test_the_handler_must_be_told_its_server():
    from types import SimpleNamespace

    from tornado import web

    app = web.Application([(r"/openapi.json", openapi.OpenAPIHandler, {"server": "worker"})])
    assert openapi.server_of(app) == "worker"
    assert openapi.server_of(web.Application([])) is None
    with pytest.raises(ValueError, match="unknown server"):
        openapi.OpenAPIHandler.initialize(SimpleNamespace(), server="gateway")
    with pytest.raises(ValueError, match="unknown server"):
        openapi.document("gateway")


@pytest.mark.gen_test(timeout=30)
async def test_bad_since_wait_and_redirect_are_400_on_both_servers(tmp_path):
    async with SchedulerCluster(tmp_path, n=1) as c:
        prompt_id = (await call("POST", c.scheduler.url + "/generate", {"prompt": "a fox", "steps": 2})).json[
            "prompt_id"]
        for base in (c.scheduler.url, c.workers[0].url):
            for query, field in (("since=&wait=", "wait"), ("since=", "since"), ("wait=", "wait"),
                                 ("since=-1", "since"), ("since=x&wait=1", "since"), ("wait=1&since=1.5", "since")):
                reply = await call("GET", f"{base}/status/{prompt_id}?{query}")
                assert reply.code == 400 and reply.json["field"] == field, (base, query, reply)
            # /result's wait likewise, and a redirect it does not know (only `image`) is refused, not ignored
            for query, field in (("wait=", "wait"), ("wait=-1", "wait"), ("redirect=", "redirect"),
                                 ("redirect=png", "redirect"), ("redirect=image&redirect=x", "redirect")):
                reply = await call("GET", f"{base}/result/{prompt_id}?{query}")
                assert reply.code == 400 and reply.json["field"] == field, (base, query, reply)
        for query in ("since=", "wait=", "limit=", "after="):
            reply = await call("GET", f"{c.workers[0].url}/jobs?{query}")
            assert reply.code == 400 and reply.json["field"] == query[:-1], (query, reply)


@pytest.mark.gen_test(timeout=30)
async def test_scheduler_cancel_when_the_owner_cannot_answer(tmp_path):
    sim = await start_sim()
    schedulers = []
    try:
        # "gone" listens nowhere; "imposter" is ComfyUI itself, which answers, but not as a worker does.
        for name, url in (("gone", f"http://127.0.0.1:{free_port()}"), ("imposter", sim.url)):
            (tmp_path / name).mkdir()
            write_workers_yaml(tmp_path / name / "workers.yaml", [{"name": name, "url": url}])
            schedulers.append(await start_scheduler(tmp_path / name, [], max_body_bytes=1_048_576))
        gone, imposter = schedulers
        unreachable = await call("POST", f"{gone.url}/cancel/some-id")
        assert unreachable.code == 503 and unreachable.headers["Retry-After"] and "gone" in unreachable.json["error"]
        big = await call("POST", f"{gone.url}/cancel/some-id", raw=b"x" * 2_000_000,
                         headers={"Content-Type": "application/json"})
        assert big.code == 413 and big.json["error"]
        garbage = await call("POST", f"{imposter.url}/cancel/some-id")
        assert garbage.code == 502 and "imposter" in garbage.json["error"], garbage
    finally:
        for scheduler in schedulers:
            await scheduler.stop()
        await sim.stop()
