"""The page, second edition (issue 13): a dense job list, each image once, time, recovery and
errors in plain words. Headless Chromium against a real scheduler, real workers and the
ComfyUI double on 127.0.0.1 (routes stand in for answers a test cannot easily provoke).

The screenshots of the README (desktop, dark, phone) come from the first test: they go to
test-artifacts/screenshots/, and to docs/ as well when T2I_DOCS_SCREENSHOTS=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from support.browser import browser, page, screenshot, page_cluster, servers  # noqa: F401 (fixtures)
from support.cluster import start_scheduler, worker_entry, write_workers_yaml

pytest.importorskip("playwright")
from playwright.sync_api import expect  # noqa: E402

from support.page import (RAW, expect_state, generate_bodies, grid_columns, images_shown,  # noqa: E402
                          open_advanced, open_page, picture, row, states_in_view, submit, wait_done)

STEP_TIME = 0.05  # 4 steps make an image in a fraction of a second; 150 steps run for 7.5 s
DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def cluster(servers, tmp_path_factory):
    """One ComfyUI double (with previews), two workers in front of it, one scheduler."""
    yield from page_cluster(servers, tmp_path_factory.mktemp("layout"), workers=("gpu-a", "gpu-b"),
                            step_time=STEP_TIME, previews=True)


def docs_screenshot(page, name: str, **kwargs) -> None:
    path = screenshot(page, name, **kwargs)
    if os.environ.get("T2I_DOCS_SCREENSHOTS") == "1":
        shutil.copyfile(path, DOCS / f"{name}.png")


def resume_job(page, job_id: str, job: dict, worker: str = "gpu-a") -> None:
    """Make the page believe it submitted `job` a minute ago (as before a reload), then reload."""
    page.evaluate("""([id, worker, job]) => {
      job.submittedAt = Date.now() - 60000;
      sessionStorage.setItem('t2i.active.v1', JSON.stringify([{id, worker, job}]));
    }""", [job_id, worker, job])
    page.reload()
    page.wait_for_selector("html[data-ready]")


# --- a screen full of jobs ----------------------------------------------------------


def test_a_screen_full_of_jobs_and_every_image_once(cluster, page, servers):
    page.set_viewport_size({"width": 1280, "height": 800})
    open_page(page, cluster.url)
    done = ["a red fox in fresh snow, golden hour", "a lighthouse on a cliff at night",
            "a bowl of ramen, studio light", "a koi pond in autumn, overhead view"]
    for prompt in done:
        submit(page, prompt, steps=4)
    for prompt in done:
        wait_done(page, prompt)
    servers.call(cluster.sim.fail_next, node_type="KSampler", message="CUDA out of memory", after_steps=2)
    submit(page, "a cathedral made of glass", steps=4)
    expect_state(row(page, "a cathedral made of glass"), "failed")

    waiting = ["a night train in the snow", "a paper boat on a puddle", "a harbour in the rain",
               "a snowy mountain village", "a tiny robot watering plants"]
    for prompt in waiting:
        submit(page, prompt, steps=150)
    running = page.locator("li.job[data-state=running]")
    # Elapsed time and an estimate from the rate so far, while it runs; the others wait their turn.
    expect(running.locator(".time")).to_contain_text(re.compile(r"\d+\s+s · about \d+\s+s left"), timeout=10000)
    expect(running.locator("img.preview")).to_be_visible()
    expect(page.locator("li.job[data-state=pending]")).to_have_count(4)
    expect(page.locator("li.job .state").filter(has_text=re.compile(r"Queued — \d+ jobs? ahead on gpu-"))
           ).not_to_have_count(0)
    page.click("details.advanced summary")  # folded, as most people leave it
    page.locator("#prompt").blur()
    page.wait_for_function("!document.querySelector('.gallery-item.fresh')")  # the new-image ring has faded

    # Six jobs' states on one 1280×800 screen, and every finished image shown once.
    assert states_in_view(page) >= 5 + 1
    shown = images_shown(page)
    assert len(shown) == len(set(shown)) == len(done), shown
    expect(page.locator("li.job[data-state=completed]")).to_have_count(0)
    expect(page.locator("#gallery .gallery-item")).to_have_count(len(done))
    docs_screenshot(page, "screenshot")

    page.emulate_media(color_scheme="dark")
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(14, 16, 21)", background
    docs_screenshot(page, "screenshot-dark")
    page.emulate_media(color_scheme="light")

    page.set_viewport_size({"width": 390, "height": 844})
    assert grid_columns(page) >= 2
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    docs_screenshot(page, "screenshot-phone", full_page=True)

    page.evaluate("document.querySelectorAll('li.job button.cancel').forEach((b) => b.hidden || b.click())")
    page.wait_for_function("[...document.querySelectorAll('li.job')].every((li) => li.dataset.state === 'cancelled'"
                           " || li.dataset.state === 'failed')")


# --- recovery -----------------------------------------------------------------------


def test_try_again_on_a_lost_job_keeps_its_seed_and_reuse_too(cluster, page):
    open_page(page, cluster.url)
    bodies = generate_bodies(page)
    body = {"prompt": "a snail on a mushroom", "seed": 4242, "steps": 3}
    resume_job(page, "lost0001", {"prompt": body["prompt"], "body": body, "params": {"seed": 4242, "steps": 3}})
    job = row(page, "a snail on a mushroom")
    expect_state(job, "gone")  # nobody knows it, long after it was sent
    expect(job.locator(".state")).to_contain_text("Lost")
    expect(job.locator("button.retry")).to_be_visible()
    job.locator("button.retry").click()
    wait_done(page, "a snail on a mushroom")
    assert bodies == [body], bodies  # the same parameters and seed
    item = picture(page, "a snail on a mushroom")
    expect(item.locator(".meta")).to_contain_text("seed 4242")

    # Reuse fills the form with the same prompt, settings and seed.
    page.fill("#prompt", "something else")
    item.locator("button.reuse").click()
    expect(page.locator("#prompt")).to_have_value("a snail on a mushroom")
    expect(page.locator("#prompt")).to_be_focused()
    expect(page.locator("#seed")).to_have_value("4242")
    expect(page.locator("#steps")).to_have_value("3")
    expect(page.locator("details.advanced")).to_have_attribute("open", "")


def test_the_form_survives_a_reload_and_nothing_is_cut(cluster, page):
    open_page(page, cluster.url)
    page.fill("#prompt", "a castle in the clouds")
    expect(page.locator("#prompt-counter")).to_have_text("1,978 characters left")
    open_advanced(page)
    page.fill("#negative_prompt", "blurry")
    page.fill("#steps", "7")
    page.click("#seed-dice")
    seed = page.input_value("#seed")
    assert re.fullmatch(r"\d+", seed)
    page.click("#seed-dice")
    expect(page.locator("#seed")).not_to_have_value(seed)  # a new one each time
    seed = page.input_value("#seed")

    page.reload()
    page.wait_for_selector("html[data-ready]")
    expect(page.locator("#prompt")).to_have_value("a castle in the clouds")
    expect(page.locator("details.advanced")).to_have_attribute("open", "")
    expect(page.locator("#negative_prompt")).to_have_value("blurry")
    expect(page.locator("#steps")).to_have_value("7")
    expect(page.locator("#seed")).to_have_value(seed)
    expect(page.locator("#width")).to_have_value("512")  # untouched: the server's default

    # A paste longer than the workflow's max_length is kept whole and said to be too long.
    page.fill("#prompt", "a" * 2500)
    assert len(page.input_value("#prompt")) == 2500
    expect(page.locator("#prompt-counter")).to_have_text("500 characters too many")
    page.press("#prompt", "Enter")
    expect(page.locator("#prompt-error")).to_contain_text("2,500 characters; the limit is 2,000")
    expect(page.locator("#prompt")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("li.job")).to_have_count(0)


def test_settings_that_cannot_be_read_are_said_so(cluster, page):
    page.route("**/workflows", lambda route: route.fulfill(
        status=500, content_type="application/json", body=json.dumps({"error": "Internal server error."})))
    open_page(page, cluster.url)
    note = page.locator(".settings-note")
    expect(note).to_be_visible()
    expect(note.locator(".note-text")).to_contain_text("could not be loaded")
    assert not RAW.search(note.locator(".note-text").text_content())
    expect(page.locator("#steps")).to_be_disabled()  # no made-up defaults
    # Generate still works, with the server's defaults.
    submit(page, "a lone tree on a hill")
    wait_done(page, "a lone tree on a hill")
    # Once the server answers, the form gets its settings.
    page.unroute("**/workflows")
    expect(note).to_be_hidden(timeout=10000)
    expect(page.locator("#steps")).to_have_value("20")


def test_on_a_touch_screen_enter_is_a_new_line(cluster, browser):
    context = browser.new_context(viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True)
    try:
        page = context.new_page()
        open_page(page, cluster.url)
        expect(page.locator("#prompt-hint")).to_be_hidden()  # no "Enter generates" where there is no key
        open_advanced(page)
        page.fill("#steps", "2")
        page.fill("#prompt", "a kite over the dunes")
        page.press("#prompt", "Enter")
        expect(page.locator("#prompt")).to_have_value("a kite over the dunes\n")
        expect(page.locator("li.job")).to_have_count(0)
        page.locator("button.primary").tap()
        wait_done(page, "a kite over the dunes")
    finally:
        context.close()


# --- errors in plain words ----------------------------------------------------------


def test_full_queues_and_no_worker_are_told_apart_in_plain_words(cluster, page, servers, tmp_path):
    # A scheduler whose one worker takes a single job at a time: a second job finds it full.
    write_workers_yaml(tmp_path / "workers.yaml", [worker_entry(cluster.workers[0], max_queue=1)])
    scheduler = servers.run(start_scheduler(tmp_path, cluster.workers[:1]))
    try:
        open_page(page, scheduler.url)
        submit(page, "the first long one", steps=150)
        first = row(page, "the first long one")
        expect_state(first, "running", timeout=10000)
        submit(page, "the second one", steps=3)
        second = row(page, "the second one")
        state = second.locator(".state")
        expect(state).to_contain_text(re.compile(r"Every worker's queue is full — trying again in \d+ s"))
        expect(second.locator(".detail-text")).to_contain_text("full")  # the server's own sentence
        assert not RAW.search(state.text_content())

        # (No worker up at all is said differently: see test_page.py::test_no_worker_available_then_retried.)
        first.locator("button.cancel").click()
        expect_state(first, "cancelled")
        second.locator("button.cancel").click()
        expect_state(second, "cancelled")
    finally:
        servers.run(scheduler.stop())


def test_a_rejected_workflow_in_plain_words_with_the_details_once(cluster, page):
    node_errors = {
        str(n): {"class_type": "CheckpointLoaderSimple", "dependent_outputs": ["9"],
                 "errors": [{"type": "value_not_in_list", "message": "Value not in list",
                             "details": "ckpt_name: 'sdxl.safetensors' not in ['v1-5-pruned-emaonly.safetensors']",
                             "extra_info": {}}]}
        for n in (4, 14, 24)}
    page.route("**/generate", lambda route: route.fulfill(
        status=502, content_type="application/json",
        body=json.dumps({"error": "ComfyUI rejected the workflow: Prompt outputs failed validation",
                         "node_errors": node_errors})))
    open_page(page, cluster.url)
    submit(page, "a portrait in the style of nobody")
    job = row(page, "a portrait in the style of nobody")
    expect_state(job, "failed")
    state = job.locator(".state")
    expect(state).to_contain_text("a model or node it needs is missing")
    assert not RAW.search(state.text_content())
    job.locator("details.details summary").click()
    detail = job.locator(".detail-text").text_content()
    assert detail.count("Value not in list") == 1 and "(×3)" in detail, detail
    assert "CheckpointLoaderSimple" in detail and "HTTP 502" in detail
    expect(job.locator("button.retry")).to_be_visible()
    screenshot(page, "20-rejected-workflow")


def test_an_unfinished_jobs_notice_is_not_a_failure(cluster, page):
    state = {"prompt_id": "notice01", "status": "running", "version": 3, "attempt": 2,
             "progress": {"value": 3, "max": 20}, "queue_position": None, "image_url": None,
             "preview_url": None, "seed": 7,
             "error": "ComfyUI is not reachable (HTTP 599: Failed to connect to 127.0.0.1:8223); "
                      "the job carries on when it is back."}
    page.route("**/status/notice01*", lambda route: route.fulfill(
        status=200, content_type="application/json", body=json.dumps(state)))
    open_page(page, cluster.url)
    resume_job(page, "notice01", {"prompt": "through a restart", "body": {"prompt": "through a restart"},
                                  "params": {}})
    job = row(page, "through a restart")
    expect_state(job, "running")
    expect(job.locator(".state")).to_have_text("Generating — step 3 of 20 — attempt 2 (ComfyUI restarted)")
    notice = job.locator(".notice")
    expect(notice).to_have_text("ComfyUI cannot be reached right now; the job carries on when it is back.")
    expect(job.locator(".detail-text")).to_contain_text("HTTP 599")  # the technical words, behind Details
    expect(job.locator("button.cancel")).to_be_visible()
    expect(job.locator("button.retry")).to_be_hidden()
    expect(job.locator(".time")).to_have_text(re.compile(r"^\d+\s+s"))  # elapsed while it runs
    page.unroute("**/status/notice01*")


def test_words_times_and_errors_units(cluster, page):
    """The JS modules' pure parts, through the browser."""
    open_page(page, cluster.url)
    got = page.evaluate("""async () => {
      const s = await import('./status.js');
      const e = await import('./errors.js');
      const api = await import('./api.js');
      const pending = (queue_position) => s.stateText({status: 'pending', queue_position}, {worker: 'gpu-a'});
      return {
        final: [...s.FINAL_STATES].sort(),
        apiUsesIt: typeof api.JobWatcher === 'function',
        pending: [pending(0), pending(1), pending(3), pending(null)],
        running: s.stateText({status: 'running', progress: {value: 7, max: 20}}),
        failed: s.stateText({status: 'failed', error: 'KSampler failed: CUDA out of memory'}),
        durations: [s.duration(4.2), s.duration(4.24, {precise: true}), s.duration(65), s.duration(3725)],
        took: s.tookSeconds({created_at: 100, started_at: 103, completed_at: 105.5}),
        meta: s.metaParts({width: 512, height: 768, steps: 20, seed: 42, worker: 'gpu-a', took: 2.14}),
        kinds: [
          "Every available worker's queue is full; try again shortly.",
          "Every enabled worker is down or unreachable.",
          "Every worker is disabled in workers.yaml.",
          "No worker is configured (workers.yaml lists none).",
          "No worker could take the job: gpu-a is unreachable (HTTP 599: Timeout).",
          "No available worker serves the workflow 'img2img'.",
        ].map((error) => e.plainUnavailable({error}).kind),
        trouble: e.plainTrouble("Worker gpu-a cannot be reached now (HTTP 599: Failed to connect to "
          + "127.0.0.1:8223); the job is not lost, ask again shortly.").text,
        answered: e.plainTrouble('The server answered 500.').text,
      };
    }""")
    assert got["final"] == ["cancelled", "completed", "failed"]
    assert got["pending"] == ["Queued — next on gpu-a", "Queued — 1 job ahead on gpu-a",
                              "Queued — 3 jobs ahead on gpu-a", "Queued"]
    assert got["running"] == "Generating — step 7 of 20"
    assert got["failed"] == "Failed — the GPU ran out of memory. Try a smaller size or fewer steps."
    assert got["durations"] == ["4\u00a0s", "4.2\u00a0s", "1\u00a0min\u00a05\u00a0s", "1\u00a0h\u00a02\u00a0min"]
    assert got["took"] == 2.5
    assert got["meta"] == ["512×768", "20 steps", "seed 42", "on gpu-a", "2.1\u00a0s"]
    assert got["kinds"] == ["busy", "down", "down", "down", "down", "workflow"]
    assert got["trouble"] == "Worker gpu-a cannot be reached right now; the job is not lost."
    assert not RAW.search(got["answered"]), got["answered"]
