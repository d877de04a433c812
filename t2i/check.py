"""``t2i-worker --check`` and ``t2i-scheduler --check``: is this machine ready to serve, before any user finds out?

Each prints one line per thing it checked, on stdout, and returns the exit code: 0 when
everything is ready, 1 when something is not (or cannot be reached). Config errors (exit 2)
are the callers'. Nothing is started and nothing is changed: both can run beside a live server.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Awaitable, Callable

from t2i.comfyui import ComfyUIClient, ComfyUIError, ComfyUIUnavailable
from t2i.config import SchedulerConfig, WorkerConfig, WorkerEntry
from t2i.httpclient import UpstreamUnavailable, fetch_json
from t2i.readiness import classes_of, problems_of

Say = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


# --- the worker: its ComfyUI, each workflow ---------------------------------------------

async def _guarded(check: Awaitable[int], say: Say) -> int:
    """A check that failed in a way nobody foresaw is one line and exit 1, never a traceback."""
    try:
        return await check
    except Exception as exc:
        say(f"the check itself failed: {type(exc).__name__}: {exc}")
        return 1


async def check_worker(config: WorkerConfig, say: Say = _print) -> int:
    """Reach ComfyUI and check every workflow against its ``/object_info``: node classes, model files,
    sampler names (the worker's routing readiness does the same, with :func:`t2i.readiness.problems_of`)."""
    return await _guarded(_check_worker(config, say), say)


async def _check_worker(config: WorkerConfig, say: Say) -> int:
    comfy = ComfyUIClient(config.comfyui.url, connect_timeout=config.comfyui.connect_timeout,
                          request_timeout=config.comfyui.request_timeout)
    classes = sorted(set().union(*(classes_of(wf.template) for wf in config.workflows.values())))
    try:
        stats, _ = await comfy.probe(timeout=config.comfyui.request_timeout)
        infos = await asyncio.gather(*(comfy.object_info(name) for name in classes))
    except ComfyUIUnavailable as exc:
        say(str(exc))  # "ComfyUI is not reachable at <url>: <why>"
        return 1
    except ComfyUIError as exc:
        say(f"ComfyUI at {comfy.url}: {exc}")
        return 1
    system = stats.get("system") if isinstance(stats, dict) else None
    version = system.get("comfyui_version") if isinstance(system, dict) else None
    say(f"ComfyUI at {comfy.url}: reachable" + (f" (version {version})" if version else ""))
    object_info = dict(zip(classes, infos))
    ready = True
    for name, workflow in config.workflows.items():
        skip = [(param.node, param.input) for param in workflow.params.values()]
        problems = problems_of(workflow.template, object_info, skip)
        say(f"{name}: {'; '.join(problems) if problems else 'ready'}")
        ready = ready and not problems
    return 0 if ready else 1


# --- the scheduler: the page, each worker -----------------------------------------------

async def check_scheduler(config: SchedulerConfig, workers: list[WorkerEntry], say: Say = _print) -> int:
    """The page's files, then each enabled worker: reachable, the token accepted, every workflow ready."""
    return await _guarded(_check_scheduler(config, workers, say), say)


async def _check_scheduler(config: SchedulerConfig, workers: list[WorkerEntry], say: Say) -> int:
    ok = True
    index = Path(config.static_dir) / "index.html"
    if index.is_file():
        say(f"page: served from {config.static_dir}")
    else:
        say(f"page: no index.html in {config.static_dir} (static_dir): GET / would answer 404")
        ok = False
    enabled = [entry for entry in workers if entry.enabled]
    if not enabled:
        say(f"no worker is enabled in {config.workers_file}: every job would be answered 503")
        ok = False
    reports = dict(zip([entry.name for entry in enabled],
                       await asyncio.gather(*(_check_one(entry, config.auth_token) for entry in enabled))))
    for entry in workers:  # in the file's order
        if entry.name not in reports:
            say(f"{entry.name}: disabled in {config.workers_file.name}, not checked")
            continue
        lines, worker_ok = reports[entry.name]
        for line in lines:
            say(line)
        ok = ok and worker_ok
    return 0 if ok else 1


async def _check_one(entry: WorkerEntry, token: str | None) -> tuple[list[str], bool]:
    name, url = entry.name, entry.url.rstrip("/")

    async def get(path: str, **kwargs: Any):
        return await fetch_json(url + path, connect_timeout=3.0, request_timeout=10.0, **kwargs)

    try:
        health = await get("/health")
        feed = await get("/jobs?limit=1", token=token)
        catalogue = await get("/workflows")
    except UpstreamUnavailable as exc:
        return [f"{name}: not reachable at {url} ({exc})"], False
    if not isinstance(health.body, dict) or "ok" not in health.body:
        return [f"{name}: {url} answered /health with HTTP {health.status} and no t2i health report: "
                "is it a t2i worker?"], False
    lines: list[str] = []
    ok = True
    if feed.status == 401:
        lines.append(f"{name}: refused the scheduler's token: " + (
            "set auth_token in scheduler.yaml to the worker's" if token is None
            else "auth_token in scheduler.yaml differs from the worker's"))
        ok = False
    elif feed.status != 200:
        lines.append(f"{name}: answered /jobs with HTTP {feed.status}")
        ok = False
    else:
        lines.append(f"{name}: reachable at {url}" + (", token accepted" if token else ""))
    if not health.body["ok"]:
        comfyui = health.body.get("comfyui")
        why = comfyui.get("error") if isinstance(comfyui, dict) else None
        lines.append(f"{name}: unhealthy: {why or 'its /health says not ok'}")
        ok = False
    workflows = catalogue.body.get("workflows") if isinstance(catalogue.body, dict) else None
    if catalogue.status != 200 or not isinstance(workflows, dict):
        lines.append(f"{name}: answered /workflows with HTTP {catalogue.status}")
        return lines, False
    for workflow, spec in workflows.items():
        spec = spec if isinstance(spec, dict) else {}
        ready, reason = spec.get("ready"), spec.get("reason")
        if "ready" not in spec:
            lines.append(f"{name}: {workflow}: the worker does not report readiness (an older t2i?)")
            ok = False
        elif ready is True:
            lines.append(f"{name}: {workflow}: ready")
        elif ready is False:
            lines.append(f"{name}: {workflow}: {reason or 'not ready'}")
            ok = False
        else:
            lines.append(f"{name}: {workflow}: not checked yet (the worker could not ask its ComfyUI)")
            ok = False
    return lines, ok
