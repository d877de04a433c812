"""Real servers on loopback for tests: ComfyUI test doubles, workers, schedulers.

Everything runs in the test's own event loop, each on its own 127.0.0.1 port,
and talks over real sockets. Configs are written as YAML files and loaded the
way the command line loads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from support.net import free_port


async def start_sim(port: int = 0, **kwargs: Any):
    """A ComfyUI double (t2i.comfy_sim.ComfySim) on 127.0.0.1 (``port`` 0: any free one)."""
    from t2i.comfy_sim import ComfySim

    sim = ComfySim(**kwargs)
    await sim.start(port=port, address="127.0.0.1")
    return sim


def write_worker_yaml(directory: Path, comfy_url: str, *, name: str = "gpu-a", port: int | None = None,
                      **overrides: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config: dict[str, Any] = {
        "name": name,
        "listen": f"127.0.0.1:{port}",
        "public_url": f"http://127.0.0.1:{port}",
        "comfyui": {"url": comfy_url, "connect_timeout": 2, "request_timeout": 10},
        "images": {"dir": str(directory / "images")},
        "job_timeout": 60,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    path = directory / "worker.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def start_worker(directory: Path, comfy_url: str, **overrides: Any):
    """Start a worker (t2i.worker.app.Worker) from a YAML file; returns it (``.url``, ``.stop()``)."""
    from t2i.config import load_worker_config
    from t2i.worker.app import Worker

    worker = Worker(load_worker_config(write_worker_yaml(directory, comfy_url, **overrides)))
    await worker.start()
    return worker


def write_workers_yaml(path: Path, workers: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"workers": workers}))
    return path


def worker_entry(worker, **overrides: Any) -> dict[str, Any]:
    entry = {"name": worker.config.name, "url": worker.url, "enabled": True}
    entry.update(overrides)
    return entry


async def start_scheduler(directory: Path, workers: list, *, port: int | None = None, clock=None,
                          **overrides: Any):
    """Start a scheduler (t2i.scheduler.app.Scheduler) over ``workers``; returns it (``.url``, ``.stop()``).
    ``clock``: the monotonic clock its placement reads (breaker cool-downs), e.g. a FakeClock's ``mono``."""
    from t2i.config import load_scheduler_config
    from t2i.scheduler.app import Scheduler

    directory.mkdir(parents=True, exist_ok=True)
    workers_file = directory / "workers.yaml"
    if not workers_file.exists():
        write_workers_yaml(workers_file, [worker_entry(w) for w in workers])
    config = {"listen": f"127.0.0.1:{port or free_port()}", "workers_file": str(workers_file),
              "reload_interval": 0.2, "health_interval": 0.5}
    config.update(overrides)
    path = directory / "scheduler.yaml"
    path.write_text(yaml.safe_dump(config))
    scheduler = Scheduler(load_scheduler_config(path), **({"clock": clock} if clock is not None else {}))
    await scheduler.start()
    return scheduler


# --- talking to the servers -------------------------------------------------------

class Reply:
    """An HTTP answer: ``code``, ``json`` (parsed body or None), ``headers``, ``body`` (bytes)."""

    def __init__(self, code: int, body: bytes, headers):
        import json

        self.code = code
        self.body = body
        self.headers = headers
        try:
            self.json = json.loads(body) if body else None
        except ValueError:
            self.json = None

    def __repr__(self) -> str:
        return f"<Reply {self.code} {self.body[:300]!r}>"


async def call(method: str, url: str, body: Any = None, *, token: str | None = None, raw: bytes | None = None,
               headers: dict[str, str] | None = None, timeout: float = 20) -> Reply:
    """One HTTP request over loopback; any status is returned, never raised."""
    import json

    from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

    all_headers = dict(headers or {})
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        all_headers.setdefault("Content-Type", "application/json")
    if method in ("POST", "PUT"):
        data = b"" if data is None else data
        all_headers.setdefault("Content-Type", "application/json")  # the servers' only POST body type (else 415)
    if token:
        all_headers["Authorization"] = f"Bearer {token}"
    request = HTTPRequest(url, method=method, body=data, headers=all_headers, connect_timeout=5,
                          request_timeout=timeout, follow_redirects=False)
    try:
        response = await AsyncHTTPClient().fetch(request, raise_error=False)
    except (HTTPClientError, OSError) as exc:  # timeouts and refused connections
        raise ConnectionError(f"{method} {url}: {exc}") from None
    if response.code == 599:
        raise ConnectionError(f"{method} {url}: {response.error}")
    return Reply(response.code, response.body or b"", response.headers)


async def wait_status(base_url: str, prompt_id: str, statuses=("completed", "failed", "cancelled"), *,
                      timeout: float = 15, seen: list | None = None, predicate=None) -> dict[str, Any]:
    """Long-poll ``/status`` until the job is in one of ``statuses`` (or ``predicate(state)``); every state
    seen on the way is appended to ``seen``."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    version = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"job {prompt_id} never reached {statuses}; last: {seen[-1] if seen else None}")
        reply = await call("GET", f"{base_url}/status/{prompt_id}?wait={min(left, 5):.2f}&since={version}")
        if reply.code != 200:
            raise AssertionError(f"/status/{prompt_id}: {reply}")
        state = reply.json
        if seen is not None:
            seen.append(state)
        if (predicate(state) if predicate else state["status"] in statuses):
            return state
        if state["version"] == version:
            await asyncio.sleep(0.01)
        version = state["version"]


class WorkerCluster:
    """``async with WorkerCluster(tmp_path, sim={...}, **worker_yaml_overrides) as c:`` -> ``c.sim``, ``c.worker``,
    ``c.url``; both stopped on exit."""

    def __init__(self, directory: Path, sim: dict[str, Any] | None = None, **overrides: Any):
        self.directory = directory
        self.sim_kwargs = {"step_time": 0.02, **(sim or {})}
        self.overrides = overrides
        self.sim = None
        self.worker = None

    @property
    def url(self) -> str:
        return self.worker.url

    async def __aenter__(self) -> "WorkerCluster":
        self.sim = await start_sim(**self.sim_kwargs)
        try:
            self.worker = await start_worker(self.directory, self.sim.url, **self.overrides)
            await self.worker.runner.comfy.wait_connected(5)
        except BaseException:
            await self.sim.stop()
            raise
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        try:
            if self.worker is not None:
                await self.worker.stop()
        finally:
            await self.sim.stop()

    async def generate(self, body: dict[str, Any] | None = None, **kwargs: Any) -> Reply:
        return await call("POST", f"{self.url}/generate", body if body is not None else {"prompt": "a red fox"},
                          **kwargs)

    async def submit(self, body: dict[str, Any] | None = None, **kwargs: Any) -> str:
        reply = await self.generate(body, **kwargs)
        assert reply.code == 200, reply
        return reply.json["prompt_id"]

    async def wait(self, prompt_id: str, *statuses: str, **kwargs: Any) -> dict[str, Any]:
        return await wait_status(self.url, prompt_id, statuses or ("completed", "failed", "cancelled"), **kwargs)


class SchedulerCluster:
    """``async with SchedulerCluster(tmp_path, n=2) as c:`` n ComfyUI doubles, n workers (gpu-0..), one
    scheduler (``c.scheduler``; more with ``add_scheduler()``); everything stopped on exit.

    ``sims[i]`` / ``workers[i]`` (dicts) override the i-th ComfyUI double's arguments and worker.yaml;
    ``worker_overrides`` applies to every worker; ``entries`` replaces workers.yaml's list; ``listed``
    lists only the first so many; ``clock`` is the scheduler's monotonic clock; the remaining keyword
    arguments go into scheduler.yaml.
    """

    def __init__(self, tmp_path: Path, n: int = 2, step_time: float = 0.01, entries: list[dict] | None = None,
                 listed: int | None = None, worker_overrides: dict[str, Any] | None = None,
                 sims: list[dict[str, Any]] | None = None, workers: list[dict[str, Any]] | None = None,
                 clock=None, **scheduler_overrides: Any):
        self.tmp = tmp_path
        self.worker_overrides = worker_overrides or {}
        self.n = n
        self.step_time = step_time
        self.entries = entries
        self.listed = n if listed is None else listed
        self.sim_kwargs = sims or [{} for _ in range(n)]
        self.each_worker = workers or [{} for _ in range(n)]
        self.clock = clock
        self.scheduler_overrides = scheduler_overrides
        self.sims: list = []
        self.workers: list = []
        self.schedulers: list = []

    async def __aenter__(self) -> "SchedulerCluster":
        try:
            for i in range(self.n):
                self.sims.append(await start_sim(**{"step_time": self.step_time, **self.sim_kwargs[i]}))
                self.workers.append(await start_worker(self.tmp / f"w{i}", self.sims[i].url, name=f"gpu-{i}",
                                                       **{**self.worker_overrides, **self.each_worker[i]}))
            entries = self.entries or [worker_entry(w) for w in self.workers[:self.listed]]
            self.workers_file.parent.mkdir(exist_ok=True)
            write_workers_yaml(self.workers_file, entries)
            await self.add_scheduler()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    @property
    def workers_file(self) -> Path:
        return self.tmp / "s" / "workers.yaml"

    @property
    def scheduler(self):
        return self.schedulers[0]

    async def add_scheduler(self, **kw: Any):
        (self.tmp / "s").mkdir(exist_ok=True)
        scheduler = await start_scheduler(self.tmp / "s", self.workers, clock=self.clock,
                                          **{**self.scheduler_overrides, **kw})
        self.schedulers.append(scheduler)
        return scheduler

    async def restart_worker(self, i: int, **overrides: Any):
        old = self.workers[i]
        self.workers[i] = await start_worker(self.tmp / f"w{i}", self.sims[i].url, name=old.config.name,
                                             port=old.port, **overrides)
        return self.workers[i]

    def worker_named(self, name: str):
        return next(w for w in self.workers if w.config.name == name)

    async def __aexit__(self, *exc: Any) -> None:
        # Stop everything, then report what did not stop cleanly (a hang or an error in stop()
        # is a bug too), unless the test itself already failed.
        import asyncio

        problems = []
        for thing in [*self.schedulers, *self.workers, *self.sims]:
            try:
                await asyncio.wait_for(thing.stop(), 5)
            except Exception as error:
                problems.append(f"{type(thing).__name__}.stop(): {error!r}")
        assert exc[0] is not None or not problems, problems


class CountingRoute:
    """Counts the requests one handler method of a server class gets (``monkeypatch`` undoes it):
    ``CountingRoute(monkeypatch, worker_handlers.StatusHandler, "get")``; ``.uris``, ``len()``."""

    def __init__(self, monkeypatch, handler_class, method: str = "get"):
        self.uris: list[str] = []
        self.ports: list[int] = []
        original = getattr(handler_class, method)
        record = self

        async def counting(self, *args, **kwargs):
            record.uris.append(self.request.uri)
            host = self.request.host or ""
            record.ports.append(int(host.rsplit(":", 1)[1]) if ":" in host else 0)
            result = original(self, *args, **kwargs)
            if hasattr(result, "__await__"):
                result = await result
            return result

        monkeypatch.setattr(handler_class, method, counting)

    def __len__(self) -> int:
        return len(self.uris)

    def at(self, worker) -> int:
        """How many of them reached ``worker`` (by its port)."""
        return sum(1 for port in self.ports if port == worker.port)


def sim_pending_ids(sim) -> list[str]:
    """prompt_ids waiting in a ComfySim's queue."""
    return [item[1] for item in sim.queue_pending]


def sim_interrupted_ids(sim) -> list[str]:
    """prompt_ids named in targeted POST /interrupt calls to a ComfySim."""
    return [body.get("prompt_id") for body in sim.interrupts if isinstance(body, dict)]
