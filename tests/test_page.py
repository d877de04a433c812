"""The browser page, end to end: headless Chromium against a real scheduler,
real workers and the ComfyUI double, all on 127.0.0.1.

Screenshots of the main states go to test-artifacts/screenshots/.
"""

from __future__ import annotations

import json
import re

import pytest

from support.browser import SCREENSHOTS, browser, page, screenshot, page_cluster, servers  # noqa: F401 (fixtures)
from support.cluster import (start_scheduler, start_sim, start_worker, worker_entry,
                             write_workers_yaml)
from support.net import free_port

pytest.importorskip("playwright")
from playwright.sync_api import expect  # noqa: E402

from support.page import (RAW, expect_state, generate_bodies, grid_columns,  # noqa: E402
                          open_advanced, open_page, picture, row, seen_states, submit, wait_done)

STEP_TIME = 0.05  # seconds per sampler step: 20 steps make an image in about 1 s


@pytest.fixture(scope="module", autouse=True)
def say_where_screenshots_go():
    print(f"\npage screenshots: {SCREENSHOTS}")


@pytest.fixture(scope="module")
def cluster(servers, tmp_path_factory):
    """One ComfyUI double, two workers in front of it, one scheduler."""
    yield from page_cluster(servers, tmp_path_factory.mktemp("page"), workers=("gpu-a", "gpu-b"),
                            step_time=STEP_TIME, previews=True)


# --- tests -------------------------------------------------------------------------


def test_submit_shows_progress_then_the_image(cluster, page):
    open_page(page, cluster.url)
    expect(page.locator("#sim-banner")).to_be_hidden()  # this scheduler does not say it is simulated
    screenshot(page, "01-empty")

    submit(page, "a red fox in fresh snow, golden hour")
    job = row(page, "a red fox in fresh snow")
    expect(job).to_have_count(1)
    expect(job.locator(".state")).to_contain_text(re.compile(r"Generating — step \d+ of 20"), timeout=10000)
    # Elapsed time while it runs, and where the worker is named, its name stays whole.
    expect(job.locator(".time")).to_have_text(re.compile(r"^\d+\s+s\b"))
    expect(job.locator(".meta")).to_contain_text("on gpu-")
    # The live preview, small, comes from the worker too.
    preview = job.locator("img.preview")
    expect(preview).to_have_attribute("src", re.compile(r"/previews/"), timeout=5000)
    expect(preview).to_have_attribute("alt", "Live preview of: a red fox in fresh snow, golden hour")
    screenshot(page, "02-running")

    # Done: the row leaves the list and the image is in the gallery, once.
    image = wait_done(page, "a red fox in fresh snow")
    assert any(re.fullmatch(r"Generating — step \d+ of 20", s) for s in seen_states(page)), seen_states(page)
    worker_urls = tuple(w.config.public_url for w in cluster.workers)
    assert image["width"] > 0
    assert image["src"].startswith(worker_urls), image  # straight from the worker, not proxied
    assert image["alt"] == "a red fox in fresh snow, golden hour"
    item = picture(page, "a red fox in fresh snow")
    expect(item.locator("a.open")).to_have_attribute("href", image["src"])
    expect(item.locator(".meta")).to_contain_text(re.compile(r"\d+\.\d\s+s"))  # how long it took
    expect(page.locator("li.job")).to_have_count(0)

    # /status held the image: no GET /result, and no preview asked for after the job ended.
    asked = page.evaluate("""() => {
      const entries = performance.getEntriesByType('resource');
      const finalAt = window.__t2iFinalAt;
      return {
        results: entries.filter((e) => e.name.includes('/result/')).length,
        previews: entries.filter((e) => e.name.includes('/previews/')).length,
        late: entries.filter((e) => {
          const m = e.name.match(/\\/previews\\/([^?]+)/);
          return m && finalAt[m[1]] !== undefined && e.startTime > finalAt[m[1]];
        }).map((e) => e.name),
        finals: Object.keys(finalAt).length,
      };
    }""")
    assert asked["results"] == 0 and asked["finals"] == 1 and asked["previews"] >= 1, asked
    assert asked["late"] == [], asked

    with page.expect_download() as download:
        item.locator("button.download").click()
    assert download.value.suggested_filename.endswith(".png")
    screenshot(page, "03-done")


def test_two_jobs_at_once(cluster, page):
    open_page(page, cluster.url)
    submit(page, "a lighthouse on a cliff at night", steps=8)
    submit(page, "a bowl of ramen, studio light", steps=6)
    expect(page.locator("li.job")).to_have_count(2)
    # Both are in flight before either is done.
    page.wait_for_function("document.querySelectorAll('li.job[data-state=pending], li.job[data-state=running]')"
                           ".length === 2", timeout=10000)
    screenshot(page, "04-two-jobs")
    one = wait_done(page, "a lighthouse")
    two = wait_done(page, "a bowl of ramen")
    assert one["src"] != two["src"]
    # Newest first in the gallery, and each image once on the page.
    expect(page.locator("#gallery .caption")).to_have_text(["a bowl of ramen, studio light",
                                                             "a lighthouse on a cliff at night"])
    srcs = page.evaluate("[...document.images].filter((i) => i.src).map((i) => i.src)")
    assert sorted(srcs) == sorted({one["src"], two["src"]}), srcs


def test_failure_shows_the_reason_and_try_again_keeps_the_seed(cluster, page, servers):
    open_page(page, cluster.url)
    bodies = generate_bodies(page)
    servers.call(cluster.sim.fail_next, node_type="KSampler", message="CUDA out of memory", after_steps=3)
    submit(page, "a cathedral made of glass", steps=5)
    job = row(page, "a cathedral made of glass")
    expect_state(job, "failed")
    state = job.locator(".state")
    expect(state).to_contain_text("Failed — the GPU ran out of memory")  # in words, with what to do
    assert not RAW.search(state.text_content())
    details = job.locator("details.details")
    expect(details).to_be_visible()
    details.locator("summary").click()
    expect(details.locator(".detail-text")).to_contain_text("CUDA out of memory")  # the technical words
    expect(job.locator("button.retry")).to_be_visible()
    expect(job.locator("button.cancel")).to_be_hidden()
    expect(page.locator("#gallery .gallery-item")).to_have_count(0)
    screenshot(page, "05-failed")

    # Try again: the same prompt, settings and seed.
    job.locator("button.retry").click()
    wait_done(page, "a cathedral made of glass")
    assert len(bodies) == 2, bodies
    assert bodies[0]["seed"] is not None and bodies[1] == bodies[0], bodies
    expect(picture(page, "a cathedral").locator(".meta")).to_contain_text(f"seed {bodies[0]['seed']}")


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
    wait_done(page, "a tiny robot")


def test_running_job_survives_a_reload_and_can_be_cancelled(cluster, page):
    open_page(page, cluster.url)
    submit(page, "a very slow landscape", steps=150)
    job = row(page, "a very slow landscape")
    expect_state(job, "running", timeout=10000)
    page.reload()
    page.wait_for_selector("html[data-ready]")
    job = row(page, "a very slow landscape")
    expect_state(job, "running", timeout=10000)  # picked up again after the reload
    expect(job.locator(".state")).to_contain_text(re.compile(r"Generating — step \d+ of 150"))
    job.locator("button.cancel").click()
    expect_state(job, "cancelled", timeout=10000)
    expect(job.locator(".state")).to_have_text("Cancelled")
    expect(job.locator("button.cancel")).to_be_hidden()
    expect(job.locator("button.dismiss")).to_be_visible()
    expect(job.locator("img.preview")).to_be_hidden()  # a row without a picture takes no room for one
    screenshot(page, "07-cancelled")
    job.locator("button.dismiss").click()
    expect(job).to_have_count(0)


def test_gallery_survives_a_reload_and_shows_expired_images(cluster, page):
    open_page(page, cluster.url)
    submit(page, "a paper boat on a puddle", steps=4)
    src = wait_done(page, "a paper boat")["src"]
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
        submit(page, "a snowy mountain village", steps=4)
        job = row(page, "a snowy mountain village")
        # Said as "no worker is up", not as "every queue is full"; the server's words under Details.
        expect(job.locator(".state")).to_contain_text(re.compile(r"No worker is up right now — trying again in \d+ s"))
        expect(job.locator(".detail-text")).to_contain_text("disabled")
        screenshot(page, "09-no-worker")
        # Ops enable the worker; the page's next retry goes through without a click.
        write_workers_yaml(workers_file, [worker_entry(cluster.workers[0], enabled=True)])
        wait_done(page, "a snowy mountain village", timeout=30000)
    finally:
        servers.run(scheduler.stop())


def test_worker_down_then_back(servers, page, tmp_path):
    """The only worker goes away mid-job: the row says it is reconnecting, then recovers by itself."""
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
        job = row(page, "a harbour in the rain")
        expect_state(job, "running", timeout=10000)
        servers.run(worker.stop())
        trouble = job.locator(".trouble")
        expect(trouble).to_be_visible(timeout=10000)
        expect(trouble).to_contain_text("Reconnecting…")
        assert not RAW.search(trouble.text_content()), trouble.text_content()  # the codes are under Details
        screenshot(page, "10-reconnecting")

        # The same worker comes back on the same port (its memory intact, as after a network
        # outage): it catches up with ComfyUI, and the page finishes the job without a click.
        servers.run(worker.start())
        wait_done(page, "a harbour in the rain", timeout=45000)
        screenshot(page, "11-recovered")
        # And the page works as before.
        submit(page, "after the storm", steps=4)
        wait_done(page, "after the storm")
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
    # With Advanced open the form fills the screen: the new job's state is scrolled into view.
    open_advanced(page)
    submit(page, "a lantern festival", steps=4)
    expect(row(page, "a lantern festival").locator(".state")).to_be_in_viewport()
    wait_done(page, "a lantern festival")
    assert grid_columns(page) >= 2  # the gallery is a grid of two columns or more, also here
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
    if page.locator("#workflow").is_visible():  # shown when the workers offer more than one
        expect(page.locator("#workflow")).to_be_focused()
        page.keyboard.press("Tab")
    expect(page.locator("#negative_prompt")).to_be_focused()
    page.keyboard.press("Tab")
    expect(page.locator("#seed")).to_be_focused()
    page.keyboard.press("Tab")
    expect(page.locator("#seed-dice")).to_be_focused()  # a new random seed, by keyboard too
    page.keyboard.press("Enter")
    expect(page.locator("#seed")).to_have_value(re.compile(r"^\d+$"))
    page.keyboard.press("Tab")
    expect(page.locator("#steps")).to_be_focused()
    page.keyboard.press("Control+A")
    page.keyboard.type("4")
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    expect(page.locator("#height")).to_be_focused()
    for name in ("cfg", "batch_size", "sampler_name", "scheduler"):  # the workflow's other params (issue 14)
        page.keyboard.press("Tab")
        expect(page.locator(f"#{name}")).to_be_focused()
    page.keyboard.press("Tab")
    expect(page.locator("button.primary")).to_be_focused()
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"  # focus is visible
    page.keyboard.press("Enter")
    wait_done(page, "a quiet forest")
    expect(page.locator("#announcer")).to_contain_text("a quiet forest")  # told the screen reader


def test_network_down_then_back_with_jittered_backoff(cluster, page):
    """Requests fail outright (no HTTP answer): the row backs off (with jitter), says so, and carries on."""
    open_page(page, cluster.url)
    backoff = page.evaluate("""async () => {
      const { Backoff, afterRetryAfter } = await import('./api.js');
      const run = (random) => {
        const b = new Backoff(1500, 30000, { random });
        const seen = Array.from({length: 7}, () => b.next());
        b.reset();
        return [seen, b.next()];
      };
      const firsts = Array.from({length: 50}, () => new Backoff().next());
      return {
        longest: run(() => 0), shortest: run(() => 0.999999),
        firsts: [Math.min(...firsts), Math.max(...firsts), new Set(firsts).size],
        retryAfter: [afterRetryAfter(2, () => 0), afterRetryAfter(2, () => 0.999999)],
      };
    }""")
    # Doubling from 1.5 s up to 30 s, each wait cut by a random part of up to a half.
    assert backoff["longest"] == [[1500, 3000, 6000, 12000, 24000, 30000, 30000], 1500]
    assert backoff["shortest"] == [[750, 1500, 3000, 6000, 12000, 15000, 15000], 750]
    low, high, distinct = backoff["firsts"]
    assert 750 <= low and high <= 1500 and distinct > 10, backoff  # tabs do not retry in lockstep
    assert backoff["retryAfter"] == [2000, 2500]  # never before the server's Retry-After

    submit(page, "a night train in the snow", steps=40)
    job = row(page, "a night train in the snow")
    expect_state(job, "running", timeout=10000)
    page.route("**/status/**", lambda route: route.abort("connectionrefused"))
    trouble = job.locator(".trouble")
    expect(trouble).to_be_visible(timeout=10000)
    expect(trouble).to_contain_text("Reconnecting…")
    expect(trouble).to_contain_text("Cannot reach the server")
    page.unroute("**/status/**")
    wait_done(page, "a night train in the snow")


def test_cancel_while_the_submission_is_on_its_way(cluster, page, monkeypatch):
    """Cancel pressed before POST /generate answers: once the job exists, it is cancelled there too."""
    import time as _time

    from t2i.worker.runner import Runner

    original = Runner.submit

    async def slow_submit(self, *args, **kwargs):
        import asyncio
        await asyncio.sleep(1.5)  # the answer is still on its way when the user cancels
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(Runner, "submit", slow_submit)
    before = {job.prompt_id for worker in cluster.workers for job in worker.store._jobs.values()}
    open_page(page, cluster.url)
    submit(page, "changed my mind", steps=150)
    job = row(page, "changed my mind")
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
    # And the row did not come back to life: the page sent the cancel and never followed the job.
    page.wait_for_function("performance.getEntriesByType('resource').some((e) => e.name.includes('/cancel/'))")
    asked = page.evaluate("performance.getEntriesByType('resource').map((e) => e.name)")
    assert not any("/status/" in url for url in asked), asked
    expect_state(job, "cancelled", timeout=1000)
    assert page.evaluate("sessionStorage.length") == 0 or "changed my mind" not in json.dumps(
        page.evaluate("Object.assign({}, sessionStorage)"))


def test_gallery_keeps_keyboard_focus_when_another_tab_adds_an_image(cluster, page):
    open_page(page, cluster.url)
    submit(page, "a lighthouse at dawn", steps=4)
    wait_done(page, "a lighthouse at dawn")
    item = page.locator("#gallery .gallery-item").filter(has_text="a lighthouse at dawn")
    item.locator("button.reuse").focus()
    other = page.context.new_page()
    try:
        other.goto(f"{cluster.url}/style.css")  # any page of the same origin shares the storage
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
