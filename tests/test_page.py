"""The browser page, end to end: headless Chromium against a real scheduler,
real workers and the ComfyUI double, all on 127.0.0.1.

Screenshots of the main states go to test-artifacts/screenshots/.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from support.browser import SCREENSHOTS, browser, page, screenshot, servers  # noqa: F401 (fixtures)
from support.cluster import (start_scheduler, start_sim, start_worker, worker_entry,
                             write_workers_yaml)
from support.net import free_port

pytest.importorskip("playwright")
from playwright.sync_api import expect  # noqa: E402

STEP_TIME = 0.1   # seconds per sampler step: 20 steps make an image in about 2 s
POLL_MS = 300

# Records every state line any job card showed, so fast transitions are not missed.
RECORDER = """
window.__t2iSeen = [];
new MutationObserver(() => {
  for (const el of document.querySelectorAll('.job .state')) {
    const text = el.textContent;
    if (text && !window.__t2iSeen.includes(text)) window.__t2iSeen.push(text);
  }
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture(scope="module", autouse=True)
def say_where_screenshots_go():
    print(f"\npage screenshots: {SCREENSHOTS}")


@pytest.fixture(scope="module")
def cluster(servers, tmp_path_factory):
    """One ComfyUI double, two workers in front of it, one scheduler."""
    base = tmp_path_factory.mktemp("page")

    async def start():
        sim = await start_sim(step_time=STEP_TIME, previews=True)
        workers = [await start_worker(base / name, sim.url, name=name) for name in ("gpu-a", "gpu-b")]
        scheduler = await start_scheduler(base / "scheduler", workers)
        return SimpleNamespace(sim=sim, workers=workers, scheduler=scheduler, url=scheduler.url, dir=base)

    c = servers.run(start())
    yield c

    async def stop():
        await c.scheduler.stop()
        for worker in c.workers:
            await worker.stop()
        await c.sim.stop()

    servers.run(stop())


# --- helpers ---------------------------------------------------------------------


def open_page(page, url: str, poll: int = POLL_MS) -> None:
    page.add_init_script(RECORDER)
    page.goto(f"{url}/?poll={poll}")
    page.wait_for_selector("html[data-ready]")


def submit(page, prompt: str, **advanced) -> None:
    if advanced:
        details = page.locator("details.advanced")
        if details.get_attribute("open") is None:
            page.click("details.advanced summary")
        for name, value in advanced.items():
            page.fill(f"#{name}", str(value))
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")


def card(page, prompt: str):
    return page.locator("li.job").filter(has=page.locator(".prompt", has_text=prompt))


def seen_states(page) -> list[str]:
    return page.evaluate("window.__t2iSeen")


def expect_state(job, state: str, timeout: float = 20000) -> None:
    expect(job).to_have_attribute("data-state", state, timeout=timeout)


def image_of(job) -> dict:
    return job.locator("img.result").evaluate(
        "img => ({src: img.src, width: img.naturalWidth, complete: img.complete, alt: img.alt})")


def wait_image_loaded(job, timeout: float = 10000) -> dict:
    job.locator("img.result").wait_for(state="visible", timeout=timeout)
    job.page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=job.locator("img.result").element_handle(),
        timeout=timeout)
    return image_of(job)


# --- tests -------------------------------------------------------------------------


def test_submit_shows_progress_then_the_image(cluster, page):
    open_page(page, cluster.url)
    expect(page.locator("#sim-banner")).to_be_hidden()  # this scheduler does not say it is simulated
    screenshot(page, "01-empty")

    submit(page, "a red fox in fresh snow, golden hour")
    job = card(page, "a red fox in fresh snow")
    expect(job).to_have_count(1)
    expect(job.locator(".state")).to_contain_text(re.compile(r"Generating — step \d+ of 20"), timeout=10000)
    # The live preview comes from the worker too.
    preview = job.locator("img.result")
    expect(preview).to_have_attribute("src", re.compile(r"/previews/"), timeout=5000)
    expect(job.locator(".badge")).to_have_text("Live preview")
    screenshot(page, "02-running")

    expect_state(job, "completed")
    expect(job.locator(".state")).to_have_text("Done")
    assert any(re.fullmatch(r"Generating — step \d+ of 20", s) for s in seen_states(page)), seen_states(page)
    image = wait_image_loaded(job)
    worker_urls = tuple(w.config.public_url for w in cluster.workers)
    assert image["width"] > 0
    assert image["src"].startswith(worker_urls), image  # straight from the worker, not proxied
    assert image["alt"] == "a red fox in fresh snow, golden hour"
    expect(job.locator("progress")).to_have_attribute("value", "1")
    expect(job.locator("a.open")).to_have_attribute("href", image["src"])

    with page.expect_download() as download:
        job.locator("button.download").click()
    assert download.value.suggested_filename.endswith(".png")

    gallery = page.locator("#gallery .gallery-item")
    expect(gallery).to_have_count(1)
    expect(gallery.first.locator(".caption")).to_have_text("a red fox in fresh snow, golden hour")
    screenshot(page, "03-done")


def test_two_jobs_at_once(cluster, page):
    open_page(page, cluster.url)
    submit(page, "a lighthouse on a cliff at night")
    submit(page, "a bowl of ramen, studio light")
    first, second = card(page, "a lighthouse"), card(page, "a bowl of ramen")
    expect(page.locator("li.job")).to_have_count(2)
    # Both are in flight before either is done.
    page.wait_for_function("document.querySelectorAll('li.job[data-state=pending], li.job[data-state=running]')"
                           ".length === 2", timeout=10000)
    screenshot(page, "04-two-jobs")
    expect_state(first, "completed")
    expect_state(second, "completed")
    one, two = wait_image_loaded(first), wait_image_loaded(second)
    assert one["src"] != two["src"]
    # Newest first, in the cards and in the gallery.
    expect(page.locator("li.job .prompt").first).to_have_text("a bowl of ramen, studio light")
    expect(page.locator("#gallery .caption")).to_have_text(["a bowl of ramen, studio light",
                                                             "a lighthouse on a cliff at night"])
    # The overview picture: finished jobs, one running with its live preview, the gallery.
    submit(page, "a koi pond in autumn, overhead view", steps=60)
    third = card(page, "a koi pond")
    expect(third.locator(".state")).to_contain_text(re.compile(r"step (1[0-9]|[2-9][0-9]) of 60"), timeout=15000)
    expect(third.locator(".badge")).to_be_visible()
    page.click("details.advanced summary")  # folded, as most people leave it
    screenshot(page, "13-overview", full_page=True)
    third.locator("button.cancel").click()
    expect_state(third, "cancelled")


def test_failure_shows_the_reason(cluster, page, servers):
    open_page(page, cluster.url)
    servers.call(cluster.sim.fail_next, node_type="KSampler", message="CUDA out of memory", after_steps=3)
    submit(page, "a cathedral made of glass")
    job = card(page, "a cathedral made of glass")
    expect_state(job, "failed")
    expect(job.locator(".state")).to_contain_text("Failed — ")
    expect(job.locator(".state")).to_contain_text("CUDA out of memory")
    expect(job.locator("button.retry")).to_be_visible()
    expect(job.locator("button.cancel")).to_be_hidden()
    expect(page.locator("#gallery .gallery-item")).to_have_count(0)
    screenshot(page, "05-failed")


def test_validation_error_is_shown_next_to_the_field(cluster, page):
    open_page(page, cluster.url)
    submit(page, "a tiny robot", steps=0)
    error = page.locator("#steps-error")
    expect(error).to_be_visible()
    expect(error).not_to_be_empty()
    expect(page.locator("#steps")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#steps")).to_be_focused()
    expect(page.locator("li.job")).to_have_count(0)  # nothing was queued
    screenshot(page, "06-validation")
    # Fixing the field clears the message, and the job goes through.
    page.fill("#steps", "4")
    expect(error).to_be_hidden()
    expect(page.locator("#steps")).not_to_have_attribute("aria-invalid", "true")
    page.press("#prompt", "Enter")
    expect_state(card(page, "a tiny robot"), "completed")


def test_running_job_survives_a_reload_and_can_be_cancelled(cluster, page):
    open_page(page, cluster.url)
    submit(page, "a very slow landscape", steps=150)
    job = card(page, "a very slow landscape")
    expect_state(job, "running", timeout=10000)
    page.reload()
    page.wait_for_selector("html[data-ready]")
    job = card(page, "a very slow landscape")
    expect_state(job, "running", timeout=10000)  # picked up again after the reload
    expect(job.locator(".state")).to_contain_text(re.compile(r"Generating — step \d+ of 150"))
    job.locator("button.cancel").click()
    expect_state(job, "cancelled", timeout=10000)
    expect(job.locator(".state")).to_have_text("Cancelled")
    expect(job.locator("button.cancel")).to_be_hidden()
    expect(job.locator("button.dismiss")).to_be_visible()
    screenshot(page, "07-cancelled")
    job.locator("button.dismiss").click()
    expect(job).to_have_count(0)


def test_gallery_survives_a_reload_and_shows_expired_images(cluster, page):
    open_page(page, cluster.url)
    submit(page, "a paper boat on a puddle", steps=4)
    expect_state(card(page, "a paper boat"), "completed")
    src = wait_image_loaded(card(page, "a paper boat"))["src"]
    # An older image the worker no longer has.
    worker = cluster.workers[0].config.public_url
    page.evaluate("""([worker]) => {
      const items = JSON.parse(localStorage.getItem('t2i.gallery.v1'));
      items.push({id: 'gone0000', prompt: 'an image from last week', image_url: worker + '/images/gone0000.png',
                  width: 512, height: 512, steps: 20, seed: 1, created_at: Date.now() / 1000 - 7 * 86400});
      localStorage.setItem('t2i.gallery.v1', JSON.stringify(items));
    }""", [worker])

    page.reload()
    page.wait_for_selector("html[data-ready]")
    items = page.locator("#gallery .gallery-item")
    expect(items).to_have_count(2)
    expect(items.first.locator(".caption")).to_have_text("a paper boat on a puddle")
    thumb = items.first.locator("img")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumb.element_handle())
    assert thumb.get_attribute("src") == src
    expired = items.nth(1)
    expect(expired).to_have_class(re.compile(r"\bexpired\b"))
    expect(expired.locator(".expired-label")).to_have_text("Expired")
    expect(expired.locator("img")).to_be_hidden()
    screenshot(page, "08-gallery-after-reload", full_page=True)


def test_no_worker_available_then_retried(cluster, page, servers, tmp_path):
    # A scheduler whose only worker is disabled: every submission is 503 with Retry-After.
    workers_file = write_workers_yaml(tmp_path / "workers.yaml",
                                      [worker_entry(cluster.workers[0], enabled=False)])
    scheduler = servers.run(start_scheduler(tmp_path, cluster.workers[:1]))
    try:
        open_page(page, scheduler.url)
        submit(page, "a snowy mountain village")
        job = card(page, "a snowy mountain village")
        expect(job.locator(".state")).to_contain_text(re.compile(r"No worker available — retrying in \d+ s"))
        screenshot(page, "09-no-worker")
        # Ops enable the worker; the page's next retry goes through without a click.
        write_workers_yaml(workers_file, [worker_entry(cluster.workers[0], enabled=True)])
        expect_state(job, "completed", timeout=30000)
        wait_image_loaded(job)
    finally:
        servers.run(scheduler.stop())


def test_worker_down_then_back(servers, page, tmp_path):
    """The only worker goes away mid-job: the card says it is reconnecting, then recovers by itself."""
    port = free_port()

    async def start():
        sim = await start_sim(step_time=STEP_TIME)
        worker = await start_worker(tmp_path / "gpu-a", sim.url, name="gpu-a", port=port)
        scheduler = await start_scheduler(tmp_path / "scheduler", [worker])
        return sim, worker, scheduler

    sim, worker, scheduler = servers.run(start())
    try:
        open_page(page, scheduler.url)
        submit(page, "a harbour in the rain", steps=40)
        job = card(page, "a harbour in the rain")
        expect_state(job, "running", timeout=10000)
        servers.run(worker.stop())
        trouble = job.locator(".trouble")
        expect(trouble).to_be_visible(timeout=10000)
        expect(trouble).to_contain_text("Reconnecting…")
        screenshot(page, "10-reconnecting")

        # The same worker comes back on the same port (its memory intact, as after a network
        # outage): it catches up with ComfyUI, and the page finishes the job without a click.
        servers.run(worker.start())
        expect_state(job, "completed", timeout=45000)
        expect(trouble).to_be_hidden()
        wait_image_loaded(job)
        screenshot(page, "11-recovered")
        # And the page works as before.
        submit(page, "after the storm", steps=4)
        expect_state(card(page, "after the storm"), "completed", timeout=20000)
    finally:
        async def stop():
            await scheduler.stop()
            await worker.stop()
            await sim.stop()
        servers.run(stop())


def test_simulated_banner_and_phone_layout(cluster, page):
    page.route("**/health", lambda route: route.fulfill(
        status=200, content_type="application/json", body=json.dumps({"ok": True, "simulated": True})))
    page.set_viewport_size({"width": 390, "height": 844})
    open_page(page, cluster.url)
    expect(page.locator("#sim-banner")).to_be_visible()
    expect(page.locator("#sim-banner")).to_contain_text("Simulated backend")
    submit(page, "a lantern festival", steps=4)
    expect_state(card(page, "a lantern festival"), "completed")
    wait_image_loaded(card(page, "a lantern festival"))
    # Nothing wider than the screen.
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    screenshot(page, "12-phone", full_page=True)


def test_keyboard_only(cluster, page):
    open_page(page, cluster.url)
    page.keyboard.press("Tab")  # skip link
    page.keyboard.press("Enter")
    expect(page.locator("#prompt")).to_be_focused()
    page.keyboard.type("a quiet forest")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("with morning fog")
    expect(page.locator("#prompt")).to_have_value("a quiet forest\nwith morning fog")
    expect(page.locator("li.job")).to_have_count(0)  # Shift+Enter is a new line, not a submit
    page.keyboard.press("Tab")
    expect(page.locator("details.advanced summary")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("details.advanced")).to_have_attribute("open", "")
    page.keyboard.press("Tab")
    expect(page.locator("#negative_prompt")).to_be_focused()
    for _ in range(4):
        page.keyboard.press("Tab")
    expect(page.locator("#height")).to_be_focused()
    page.keyboard.press("Tab")
    expect(page.locator("button.primary")).to_be_focused()
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"  # focus is visible
    page.keyboard.press("Enter")
    job = card(page, "a quiet forest")
    expect_state(job, "completed")
    expect(page.locator("#announcer")).to_contain_text("a quiet forest")  # told the screen reader


def test_network_down_then_back(cluster, page):
    """Requests fail outright (no HTTP answer): the card backs off, says so, and carries on."""
    open_page(page, cluster.url)
    backoff = page.evaluate("""async () => {
      const { Backoff } = await import('./api.js');
      const b = new Backoff();
      const seen = Array.from({length: 7}, () => b.next());
      b.reset();
      return [seen, b.next()];
    }""")
    assert backoff == [[1500, 3000, 6000, 12000, 24000, 30000, 30000], 1500]

    submit(page, "a night train in the snow", steps=30)
    job = card(page, "a night train in the snow")
    expect_state(job, "running", timeout=10000)
    page.route("**/status/**", lambda route: route.abort("connectionrefused"))
    trouble = job.locator(".trouble")
    expect(trouble).to_be_visible(timeout=10000)
    expect(trouble).to_contain_text("Reconnecting…")
    expect(trouble).to_contain_text("Cannot reach the server")
    page.unroute("**/status/**")
    expect_state(job, "completed", timeout=20000)
    expect(trouble).to_be_hidden()
    wait_image_loaded(job)


def test_cancel_while_the_submission_is_on_its_way(cluster, page, monkeypatch):
    """Cancel pressed before POST /generate answers: once the job exists, it is cancelled there too."""
    import time as _time

    from t2i.worker.runner import Runner

    original = Runner.submit

    async def slow_submit(self, request):
        import asyncio
        await asyncio.sleep(1.5)  # the answer is still on its way when the user cancels
        return await original(self, request)

    monkeypatch.setattr(Runner, "submit", slow_submit)
    before = {job.prompt_id for worker in cluster.workers for job in worker.store._jobs.values()}
    open_page(page, cluster.url)
    submit(page, "changed my mind", steps=150)
    job = card(page, "changed my mind")
    expect_state(job, "submitting", timeout=5000)
    job.locator("button.cancel").click()
    expect_state(job, "cancelled", timeout=5000)

    def new_jobs():
        return [j for worker in cluster.workers for j in list(worker.store._jobs.values())
                if j.prompt_id not in before]

    deadline = _time.monotonic() + 10
    while _time.monotonic() < deadline and not [j for j in new_jobs() if j.status == "cancelled"]:
        _time.sleep(0.1)
    assert [j.status for j in new_jobs()] == ["cancelled"]  # cancelled on the worker, not left running
    page.wait_for_timeout(1000)
    expect_state(job, "cancelled", timeout=1000)  # and the card did not come back to life
    assert page.evaluate("sessionStorage.length") == 0 or "changed my mind" not in json.dumps(
        page.evaluate("Object.assign({}, sessionStorage)"))


def test_gallery_keeps_keyboard_focus_when_another_tab_adds_an_image(cluster, page):
    open_page(page, cluster.url)
    submit(page, "a lighthouse at dawn", steps=4)
    expect_state(card(page, "a lighthouse at dawn"), "completed")
    item = page.locator("#gallery .gallery-item").filter(has_text="a lighthouse at dawn")
    item.locator("button.reuse").focus()
    other = page.context.new_page()
    try:
        other.goto(f"{cluster.url}/?poll={POLL_MS}")
        other.wait_for_selector("html[data-ready]")
        # The other tab finishes a job: the gallery is re-drawn here from the storage event.
        other.evaluate("""() => {
          const items = JSON.parse(localStorage.getItem('t2i.gallery.v1') || '[]');
          items.unshift({id: 'othertab1', prompt: 'from the other tab', image_url: location.origin + '/x.png',
                         width: 64, height: 64, steps: 4, seed: 1, created_at: Date.now() / 1000});
          localStorage.setItem('t2i.gallery.v1', JSON.stringify(items));
        }""")
        expect(page.locator("#gallery .gallery-item").filter(has_text="from the other tab")).to_have_count(1)
        focused = page.evaluate("""() => {
          const el = document.activeElement;
          return {cls: el.className, item: el.closest('[data-id]') && el.closest('[data-id]').textContent};
        }""")
        assert "reuse" in focused["cls"] and "a lighthouse at dawn" in (focused["item"] or ""), focused
    finally:
        other.close()


def test_gallery_does_not_forget_an_image_during_an_outage(cluster, page):
    """The image fails to load and the server answers 503: unavailable now, not expired for good."""
    open_page(page, cluster.url)
    page.route("**/status/outage01*", lambda route: route.fulfill(
        status=503, content_type="application/json", headers={"Retry-After": "1"},
        body=json.dumps({"error": "Worker gpu-a cannot be reached now."})))
    page.evaluate("""() => {
      localStorage.setItem('t2i.gallery.v1', JSON.stringify([{id: 'outage01', prompt: 'during an outage',
        image_url: 'http://127.0.0.1:9/images/outage01.png', width: 64, height: 64, steps: 4, seed: 1,
        created_at: Date.now() / 1000}]));
    }""")
    page.reload()
    page.wait_for_selector("html[data-ready]")
    item = page.locator("#gallery .gallery-item").filter(has_text="during an outage")
    expect(item.locator(".expired-label")).to_have_text("Image unavailable right now", timeout=10000)
    stored = page.evaluate("JSON.parse(localStorage.getItem('t2i.gallery.v1'))")
    assert stored[0]["id"] == "outage01" and not stored[0].get("expired")
    page.evaluate("localStorage.removeItem('t2i.gallery.v1')")
