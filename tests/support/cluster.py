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


async def start_sim(**kwargs: Any):
    from t2i.comfy_sim import ComfySim

    sim = ComfySim(**kwargs)
    await sim.start(port=0, address="127.0.0.1")
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
    entry = {"name": worker.config.name, "url": worker.url, "enabled": True, "max_queue": 8}
    entry.update(overrides)
    return entry


async def start_scheduler(directory: Path, workers: list, *, port: int | None = None, **overrides: Any):
    """Start a scheduler (t2i.scheduler.app.Scheduler) over ``workers``; returns it (``.url``, ``.stop()``)."""
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
    scheduler = Scheduler(load_scheduler_config(path))
    await scheduler.start()
    return scheduler
