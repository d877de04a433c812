"""Headless Chromium for page tests, and servers on an event loop of their own.

Playwright's sync API runs its own loop and cannot be used inside a running
asyncio loop, so the servers (ComfyUI double, workers, scheduler) live on a
background thread's loop and the test drives the browser from the main thread.

* ``servers``: a :class:`LoopThread`; ``servers.run(coro)`` runs a coroutine on
  the servers' loop and returns its result, ``servers.call(fn, ...)`` a plain
  function.
* ``browser``: one Chromium for the module (``/usr/bin/chromium``, never a
  downloaded one); tests skip when it is missing.
* ``page``: a fresh context (own localStorage) and page per test, failing the
  test on uncaught page errors.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, Callable, Coroutine

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"


class LoopThread:
    """An asyncio loop running on a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="t2i-test-servers", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        async def call() -> Any:
            return fn(*args, **kwargs)
        return self.run(call())

    def close(self) -> None:
        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        try:
            self.run(drain(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


def require_chromium() -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian: apt-get install chromium)")


@pytest.fixture(scope="module")
def servers():
    require_chromium()
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def browser():
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme="light",
                                  accept_downloads=True)
    context.set_default_timeout(15000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def screenshot(page, name: str, **kwargs: Any) -> Path:
    """Save ``test-artifacts/screenshots/<name>.png`` and say where."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), **kwargs)
    print(f"screenshot: {path}")
    return path


def page_cluster(servers: "LoopThread", base: Path, *, workers=("gpu-a",), step_time: float = 0.05,
                 previews: bool = False, ready: Callable[[Any], Coroutine[Any, Any, Any]] | None = None,
                 **scheduler_overrides: Any):
    """A ComfyUI double, ``workers`` in front of it and a scheduler, on the servers' loop, for a
    module of page tests: yields a namespace (``sim``, ``workers``, ``worker``, ``scheduler``,
    ``url``, ``dir``) and stops them after. ``ready(scheduler)``: awaited before the tests start."""
    from types import SimpleNamespace

    from support.cluster import start_scheduler, start_sim, start_worker

    async def start() -> SimpleNamespace:
        sim = await start_sim(step_time=step_time, previews=previews)
        started = [await start_worker(base / name, sim.url, name=name) for name in workers]
        scheduler = await start_scheduler(base / "scheduler", started, **scheduler_overrides)
        if ready is not None:
            await ready(scheduler)
        return SimpleNamespace(sim=sim, workers=started, worker=started[0], scheduler=scheduler,
                               url=scheduler.url, dir=base)

    async def stop(c: SimpleNamespace) -> None:
        await c.scheduler.stop()
        for worker in c.workers:
            await worker.stop()
        await c.sim.stop()

    c = servers.run(start())
    try:
        yield c
    finally:
        servers.run(stop(c))
