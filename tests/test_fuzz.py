"""Schemathesis against both servers, each from its own ``GET /openapi.json``.

A ComfyUI test double, a worker and a scheduler run as processes on 127.0.0.1
(``python -m t2i.comfy_sim|t2i.worker|t2i.scheduler``), as they are deployed.
Schemathesis runs its examples, coverage and fuzzing phases on every operation of
each document, with a fixed seed and at most ``MAX_EXAMPLES`` fuzzed examples per
operation, and fails on any 500 (or other 5xx), any 502/503 where the document does
not promise one (it does where design.md does: ComfyUI rejected the workflow, no
worker with room, ComfyUI or the job's owner unreachable), any other status, content
type, header or body the document does not promise, and any schema-invalid request
that is not refused.

Not checked: ``positive_data_acceptance`` (a schema-valid request answered 2xx). The
document cannot hold a workflow's configured limits (steps up to ``max``, a prompt
up to ``max_length``...) or whether the pool has room, so a valid-looking request
may rightly get 400 or 503. Long-poll waits (``wait``) are cut to ``WAIT_CAP``
seconds before a request is sent, so the run stays short; their parsing is tested
as generated (negative values, text, NaN are sent as they are). Half the job ids a
positive case names (chosen by the id's CRC, so the run stays deterministic) are
swapped for a real job's, so the routes' own checks run, not only their 404.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import json
import os
import subprocess
import sys
import urllib.request
import zlib
from pathlib import Path

import pytest
import schemathesis
import yaml
from schemathesis.core.parameters import ParameterLocation

from support.net import free_port
from support.timing import until
from t2i import openapi

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "t2i" / "workflows" / "txt2img.json"
ARTIFACTS = ROOT / "test-artifacts"
TOKEN = "fuzz-token"                      # the worker's auth_token (the scheduler sends it)
CLIENT_KEY = "fuzz-client-key-0123456789"  # the scheduler's API key for the fuzzer (scheduler.yaml clients)
KEYS = {"worker": TOKEN, "scheduler": CLIENT_KEY}
MAX_EXAMPLES = 30
SEED = 20260416
WAIT_CAP = 0.1

CONFIG = {
    "seed": SEED,
    "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True},
    "phases": {"stateful": {"enabled": False}},
    "checks": {
        "positive_data_acceptance": {"enabled": False},
        # 502 (ComfyUI rejected the workflow) and 503 (no worker with room; ComfyUI unreachable) are
        # answers design.md prescribes; status_code_conformance still fails them where undocumented.
        "not_a_server_error": {"expected-statuses": ["2XX", "3XX", "4XX", "502", "503"]},
    },
    "request-timeout": 20,
}


# --------------------------------------------------------------------------- the fleet, as processes

class Fleet:
    """A ComfyUI test double, a worker and a scheduler: ``python -m ...`` each, logs in ``directory``."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.comfy_port, self.worker_port, self.scheduler_port = free_port(), free_port(), free_port()
        self.comfy = f"http://127.0.0.1:{self.comfy_port}"
        self.worker = f"http://127.0.0.1:{self.worker_port}"
        self.scheduler = f"http://127.0.0.1:{self.scheduler_port}"
        self.processes: list[tuple[str, subprocess.Popen, Path]] = []
        self.job_id: str | None = None  # a finished job both servers know

    def write_configs(self) -> tuple[Path, Path]:
        small = {"node": "5", "default": 64, "min": 64, "max": 256}
        worker = {
            "name": "fuzz-a",
            "listen": f"127.0.0.1:{self.worker_port}",
            "public_url": self.worker,
            "auth_token": TOKEN,
            "allow_raw_workflows": True,
            "job_timeout": 30,
            "state_dir": str(self.directory / "state"),
            "comfyui": {"url": self.comfy, "connect_timeout": 2, "request_timeout": 10},
            "images": {"dir": str(self.directory / "images")},
            "workflows": {"txt2img": {"file": str(TEMPLATE), "params": {
                "prompt": {"node": "6", "input": "text", "max_length": 2000},
                "negative_prompt": {"node": "7", "input": "text", "default": ""},
                "seed": {"node": "3", "input": "seed"},
                "steps": {"node": "3", "input": "steps", "default": 2, "min": 1, "max": 4},
                "width": {**small, "input": "width"},
                "height": {**small, "input": "height"},
            }}},
        }
        worker_yaml = self.directory / "worker.yaml"
        worker_yaml.write_text(yaml.safe_dump(worker))
        workers_yaml = self.directory / "workers.yaml"
        workers_yaml.write_text(yaml.safe_dump({"workers": [
            {"name": "fuzz-a", "url": self.worker, "enabled": True, "max_queue": 4}]}))
        scheduler_yaml = self.directory / "scheduler.yaml"
        scheduler_yaml.write_text(yaml.safe_dump({
            "listen": f"127.0.0.1:{self.scheduler_port}", "workers_file": str(workers_yaml),
            "auth_token": TOKEN, "reload_interval": 1, "health_interval": 1,
            "clients": {"keys": {"fuzz": CLIENT_KEY}, "max_jobs": 1000}}))
        return worker_yaml, scheduler_yaml

    def spawn(self, name: str, *args: str) -> None:
        log_path = self.directory / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        with open(log_path, "wb") as log:
            process = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env,
                                       stdout=log, stderr=subprocess.STDOUT)
        self.processes.append((name, process, log_path))

    def start(self) -> None:
        worker_yaml, scheduler_yaml = self.write_configs()
        self.spawn("comfy", "t2i.comfy_sim", "--port", str(self.comfy_port), "--step-time", "0.002",
                   "--output-dir", str(self.directory / "comfy-output"), "--log-level", "warning")
        self.spawn("worker", "t2i.worker", "--config", str(worker_yaml))
        self.spawn("scheduler", "t2i.scheduler", "--config", str(scheduler_yaml))
        # The deadlines only bound a failing start (a loaded 2-core box starts Python slowly).
        asyncio.run(until(self._ready, timeout=60, interval=0.1, what="the fleet to answer"))
        request = urllib.request.Request(self.scheduler + "/generate", method="POST",
                                         data=json.dumps({"prompt": "a job to look up", "steps": 1}).encode(),
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": f"Bearer {CLIENT_KEY}"})
        self.job_id = json.loads(urllib.request.urlopen(request, timeout=20).read())["prompt_id"]
        asyncio.run(until(self._job_finished, timeout=30, interval=0.05, what="the first job to finish"))

    def _job_finished(self) -> bool:
        status = json.loads(urllib.request.urlopen(f"{self.scheduler}/status/{self.job_id}", timeout=5).read())
        assert status["status"] in ("pending", "running", "completed"), status
        return status["status"] == "completed"

    def _ready(self) -> bool:
        for name, process, log_path in self.processes:
            if process.poll() is not None:
                raise AssertionError(f"{name} exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            health = json.loads(urllib.request.urlopen(self.scheduler + "/health", timeout=2).read())
        except (OSError, ValueError):
            return False
        return bool(health.get("ok"))  # the worker answers and its ComfyUI is reachable

    def stop(self) -> None:
        for _, process, _ in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for _, process, _ in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{path.read_text(errors='replace')[-4000:]}" for name, _, path in self.processes)


class Tally:
    """Requests sent, by server, operation and status (written to test-artifacts/fuzz-summary.json)."""

    def __init__(self):
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def add(self, server: str, case, status: int) -> None:
        self.counts[server][f"{case.operation.label} -> {status}"] += 1

    def summary(self) -> dict:
        out = {}
        for server, counter in sorted(self.counts.items()):
            operations = collections.Counter()
            for key, count in counter.items():
                operations[key.split(" -> ")[0]] += count
            out[server] = {"requests": sum(counter.values()), "operations": dict(sorted(operations.items())),
                           "statuses": dict(sorted(counter.items()))}
        return out


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    fleet = Fleet(tmp_path_factory.mktemp("fuzz"))
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture(scope="module")
def tally(request):
    tally = Tally()
    yield tally
    summary = tally.summary()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "fuzz-summary.json").write_text(json.dumps(summary, indent=2))
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        for server, figures in summary.items():
            reporter.write_line(f"schemathesis {server}: {figures['requests']} requests over "
                                f"{len(figures['operations'])} operations")


def load_schema(server: str):
    """``server``'s document, as its ``GET /openapi.json`` serves it (test_served_documents checks that)."""
    config = schemathesis.config.SchemathesisConfig.from_dict(CONFIG)
    schema = schemathesis.openapi.from_dict(copy.deepcopy(openapi.document(server)), config=config)
    schema.config.update(headers={"Authorization": f"Bearer {KEYS[server]}"})
    return schema


def cap_wait(case) -> None:
    """A long-poll ``wait`` above WAIT_CAP (a number, or text that reads as one) is sent as WAIT_CAP."""
    query = case.query or {}
    value = query.get("wait")
    try:
        number = float(value)
    except (TypeError, ValueError):
        return
    if number > WAIT_CAP and not isinstance(value, bool):
        query["wait"] = WAIT_CAP


def name_a_real_job(case, job_id: str) -> None:
    """Half the positive cases' job ids (by the generated id's CRC) become ``job_id``."""
    ids = case.path_parameters or {}
    if "prompt_id" in ids and not case.meta.is_negative_at(ParameterLocation.PATH):
        if zlib.crc32(str(ids["prompt_id"]).encode()) % 2 == 0:
            ids["prompt_id"] = job_id


def call_and_check(server: str, case, fleet: Fleet, tally: Tally) -> None:
    cap_wait(case)
    name_a_real_job(case, fleet.job_id)
    response = case.call(base_url=getattr(fleet, server))
    tally.add(server, case, response.status_code)
    try:
        case.validate_response(response)
    except BaseException:
        if response.status_code >= 500:
            print(fleet.logs())
        raise


worker_api = load_schema("worker")
scheduler_api = load_schema("scheduler")


@worker_api.parametrize()
def test_worker_api(case, fleet, tally):
    call_and_check("worker", case, fleet, tally)


@scheduler_api.parametrize()
def test_scheduler_api(case, fleet, tally):
    call_and_check("scheduler", case, fleet, tally)


def test_served_documents(fleet):
    """Each server serves its own document: the one fuzzed above, with only its own routes."""
    paths = {}
    for server in ("worker", "scheduler"):
        served = json.loads(urllib.request.urlopen(getattr(fleet, server) + "/openapi.json", timeout=10).read())
        assert served == openapi.document(server)
        paths[server] = set(served["paths"])
    assert {"/jobs", "/images/{filename}", "/previews/{prompt_id}"} <= paths["worker"]
    assert "/workers" not in paths["worker"]
    assert "/workers" in paths["scheduler"]
    assert not {"/images/{filename}", "/previews/{prompt_id}"} & paths["scheduler"]
