"""The page with clients (issue 12): a key asked for, checked and remembered; a client's jobs in
every tab and browser (GET /jobs, read every ``?refresh=`` ms here); a closed tab's job reaching
the gallery; Cancel all; a client at its max_jobs waiting for a slot. Headless Chromium against a
real scheduler (keys required), a real worker and the ComfyUI double on 127.0.0.1.

Each test is its own client (its own key), so their jobs and limits never meet. "Another
browser" is another Playwright context: its own localStorage, the same key.
"""

from __future__ import annotations

import re

import pytest

from support.browser import browser, page, screenshot, page_cluster, servers  # noqa: F401 (fixtures)

pytest.importorskip("playwright")
from playwright.sync_api import expect  # noqa: E402

from support.page import RECORDER, expect_state, picture, row, submit, wait_done  # noqa: E402

STEP_TIME = 0.05  # 4 steps: a fraction of a second; 150 steps: 7.5 s
POLL_MS = 300
REFRESH_MS = 600  # how often the page reads GET /jobs again (about 30 s by default)
KEYS = {name: f"{name}-key-{'x' * 16}" for name in ("alice", "bob", "carol", "dave", "erin")}
MAX_JOBS = 2


@pytest.fixture(scope="module")
def cluster(servers, tmp_path_factory):
    """One ComfyUI double, one worker, one scheduler that wants a key from everyone."""
    yield from page_cluster(servers, tmp_path_factory.mktemp("clients"), step_time=STEP_TIME,
                            clients={"keys": KEYS, "allow_anonymous": False, "max_jobs": MAX_JOBS})


def open_page(page, url: str) -> None:
    page.add_init_script(RECORDER)
    page.goto(f"{url}/?poll={POLL_MS}&refresh={REFRESH_MS}")
    page.wait_for_selector("html[data-ready]")


def new_browser(browser, key: str | None = None, **options):
    """A browser of its own (a context: its own storage), with `key` already kept in it."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, **options)
    context.set_default_timeout(15000)
    if key:
        context.add_init_script(f"localStorage.getItem('t2i.key.v1') || localStorage.setItem('t2i.key.v1', {key!r})")
    return context


def tab(context, url: str):
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    open_page(page, url)
    return page


def job_id(job) -> str:
    job.page.wait_for_function("el => Boolean(el.dataset.id)", arg=job.element_handle())
    return job.get_attribute("data-id")


def by_id(page, prompt_id: str):
    return page.locator(f'li.job[data-id="{prompt_id}"]')


def test_the_key_is_asked_for_checked_and_remembered(cluster, page):
    requests: list = []
    page.on("request", lambda request: requests.append(request))
    open_page(page, cluster.url)
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()  # GET /health said a key is required
    expect(page.locator("#key-input")).to_be_focused()
    expect(page.locator("#key-why")).to_contain_text("needs a key")
    expect(page.locator("#account")).to_contain_text("No key")
    screenshot(page, "clients-01-key-dialog")

    # A wrong key is refused, in the dialog, which stays open.
    page.keyboard.type("not-a-key-of-this-server")
    page.keyboard.press("Enter")
    error = page.locator("#key-error")
    expect(error).to_contain_text("does not accept that key")
    expect(page.locator("#key-input")).to_have_attribute("aria-invalid", "true")
    expect(dialog).to_be_visible()
    assert page.evaluate("localStorage.getItem('t2i.key.v1')") is None
    screenshot(page, "clients-02-wrong-key")

    # The right one is taken: the dialog closes, the header names the client, Generate works.
    page.fill("#key-input", KEYS["alice"])
    page.keyboard.press("Enter")
    expect(dialog).to_be_hidden()
    expect(page.locator("#account-name")).to_have_text("Key of alice")
    expect(page.locator("#prompt")).to_be_focused()
    expect(page.locator("#announcer")).to_contain_text("you are alice")
    submit(page, "a key-shaped cloud", steps=4)
    image = wait_done(page, "a key-shaped cloud")
    sent = {r.url: r.headers.get("authorization") for r in requests}
    generate = [auth for url, auth in sent.items() if url.endswith("/generate")]
    assert generate == [f"Bearer {KEYS['alice']}"], generate
    assert sent[image["src"]] is None  # the worker's image gets no key

    # Remembered across a reload: no dialog, the same client.
    page.reload()
    page.wait_for_selector("html[data-ready]")
    expect(page.locator("#account-name")).to_have_text("Key of alice")
    expect(dialog).to_be_hidden()
    expect(picture(page, "a key-shaped cloud")).to_have_count(1)

    # Change or forget it from the header, by keyboard: Escape changes nothing, Forget forgets.
    button = page.locator("#key-button")
    expect(button).to_have_text("Change key")
    button.focus()
    page.keyboard.press("Enter")
    expect(dialog).to_be_visible()
    expect(page.locator("#key-input")).to_be_focused()
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(button).to_be_focused()
    assert page.evaluate("localStorage.getItem('t2i.key.v1')") == KEYS["alice"]
    page.keyboard.press("Enter")
    page.click("#key-forget")
    expect(dialog).to_be_hidden()
    assert page.evaluate("localStorage.getItem('t2i.key.v1')") is None
    expect(page.locator("#account-name")).to_have_text("No key")
    expect(button).to_have_text("Enter key")
    expect(page.locator("#announcer")).to_contain_text("Key forgotten")

    # Without a key, Generate is refused in words, with what to do.
    submit(page, "no key, no image", steps=4)
    job = row(page, "no key, no image")
    expect_state(job, "failed")
    expect(job.locator(".state")).to_contain_text("needs a key")


def test_a_job_shows_in_every_tab_and_browser_and_cancel_all_stops_it(cluster, browser):
    url = cluster.url
    here = new_browser(browser, KEYS["bob"])
    there = new_browser(browser, KEYS["bob"], color_scheme="dark")
    try:
        first, second = tab(here, url), tab(here, url)
        other = tab(there, url)
        cancel_all = other.locator("#jobs-cancel-all")
        expect(cancel_all).to_be_hidden()  # nothing to cancel
        submit(first, "a slow comet over the sea", steps=150)
        job = row(first, "a slow comet over the sea")
        prompt_id = job_id(job)
        expect_state(job, "running", timeout=10000)

        # The second tab shows it at once (this browser's cache); the other browser within the
        # refresh period, without a reload (GET /jobs; the prompt is not known there).
        expect(row(second, "a slow comet over the sea")).to_have_count(1, timeout=15000)  # bounds a failure only
        elsewhere = by_id(other, prompt_id)
        expect_state(elsewhere, "running", timeout=REFRESH_MS * 2 + 5000)
        expect(elsewhere.locator(".prompt")).to_have_text("A job from another browser")
        expect(elsewhere.locator(".state")).to_contain_text(re.compile(r"Generating — step \d+ of 150"))
        expect(other.locator("#account-name")).to_have_text("Key of bob")
        expect(cancel_all).to_be_enabled()
        screenshot(other, "clients-03-another-browser-dark")

        # Cancel all, from the other browser: confirmed, said, and seen everywhere.
        questions: list[str] = []

        def accept(dialog):
            questions.append(dialog.message)
            dialog.accept()

        other.once("dialog", accept)
        cancel_all.click()
        expect(other.locator("#announcer")).to_have_text("Cancelled 1 job.")
        expect(other.locator("#jobs-note .note-text")).to_have_text("Cancelled 1 job.")
        assert questions and "every tab and browser where you use this key" in questions[0], questions
        expect_state(elsewhere, "cancelled", timeout=5000)
        expect_state(job, "cancelled", timeout=5000)
        expect_state(row(second, "a slow comet over the sea"), "cancelled", timeout=5000)
        expect(cancel_all).to_be_disabled()  # nothing left unfinished

        # The key dialog in the dark, from the header: Cancel leaves the key as it was.
        other.click("#key-button")
        expect(other.locator("#key-input")).to_be_focused()
        expect(other.locator("#key-forget")).to_be_visible()
        screenshot(other, "clients-05-key-dialog-dark")
        other.click("#key-cancel")
        expect(other.locator("#key-dialog")).to_be_hidden()
        expect(other.locator("#account-name")).to_have_text("Key of bob")
        for page in (first, second, other):
            assert not page.errors, page.errors
    finally:
        here.close()
        there.close()


def test_the_job_of_a_closed_tab_reaches_the_gallery(cluster, browser):
    url = cluster.url
    here = new_browser(browser, KEYS["carol"])
    there = new_browser(browser, KEYS["carol"])
    try:
        closing = tab(here, url)
        submit(closing, "a paper lantern drifting away", steps=30)
        job = row(closing, "a paper lantern drifting away")
        prompt_id = job_id(job)
        expect_state(job, "running", timeout=10000)
        closing.close()  # before it ends: nothing of that tab follows the job any more

        # A new tab of the same browser, and another browser, both get its image.
        again = tab(here, url)
        wait_done(again, "a paper lantern drifting away")
        other = tab(there, url)
        image = other.locator(f'#gallery .gallery-item[data-id="{prompt_id}"]')
        expect(image).to_have_count(1, timeout=REFRESH_MS * 2 + 5000)
        expect(image.locator(".caption")).to_have_text("An image from another browser")
        expect(image.locator("img")).to_have_attribute("alt", "An image from another browser")
        expect(image.locator("button.reuse")).to_be_hidden()  # nothing to reuse without the prompt
        other.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.locator("img").element_handle())

        # Removed here, it stays removed: the next reads of the list do not bring it back.
        image.locator("button.remove").click()
        expect(image).to_have_count(0)
        other.reload()
        other.wait_for_selector("html[data-ready]")
        other.wait_for_function("""() => performance.getEntriesByType('resource')
          .filter((e) => e.name.includes('/jobs?')).length >= 4""")  # two full reads after the reload
        expect(image).to_have_count(0)
        assert not again.errors and not other.errors, (again.errors, other.errors)
    finally:
        here.close()
        there.close()


def test_a_client_at_its_limit_waits_for_one_of_its_jobs_to_end(cluster, browser):
    context = new_browser(browser, KEYS["dave"])
    try:
        page = tab(context, cluster.url)
        prompts = ["a slow glacier one", "a slow glacier two", "a third glacier, one too many"]
        for prompt in prompts:
            submit(page, prompt, steps=150)
        first, _, third = (row(page, prompt) for prompt in prompts)
        # The third is over this client's max_jobs (429): said so plainly, sent when one ends.
        expect_state(third, "waiting", timeout=10000)
        state = third.locator(".state")
        expect(state).to_contain_text(f"You already have {MAX_JOBS} unfinished jobs")
        expect(state).to_contain_text("sent as soon as one of them ends")
        expect(third.locator(".detail-text")).to_contain_text("as many as one client may hold")
        screenshot(page, "clients-04-limit")

        first.locator("button.cancel").click()
        expect_state(first, "cancelled", timeout=5000)
        job_id(third)  # taken now
        expect(third).not_to_have_attribute("data-state", "waiting")

        # Cancel all: this client's two unfinished jobs.
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#jobs-cancel-all")
        expect(page.locator("#announcer")).to_have_text("Cancelled 2 jobs.")
        expect(page.locator("li.job[data-state=cancelled]")).to_have_count(3)
        assert not page.errors, page.errors
    finally:
        context.close()


def test_a_job_listed_before_its_tab_cached_it_gets_its_words(cluster, browser):
    """The server's list can name a job before the tab that sent it has written its words to
    this browser's cache (the worker's feed beats the answer to POST /generate): the row first
    says "A job from another browser", then shows the prompt once the cache has it."""
    context = new_browser(browser, KEYS["erin"])
    try:
        listing, sending = tab(context, cluster.url), tab(context, cluster.url)
        auth = {"Authorization": f"Bearer {KEYS['erin']}"}
        answer = listing.request.post(f"{cluster.url}/generate", headers=auth,
                                      data={"prompt": "a lighthouse told late", "steps": 150})
        assert answer.status == 200, answer.text()
        placed = answer.json()
        job = by_id(listing, placed["prompt_id"])
        expect_state(job, "running", timeout=REFRESH_MS * 2 + 5000)
        expect(job.locator(".prompt")).to_have_text("A job from another browser")

        # What the sending tab writes once POST /generate has answered, a moment late.
        entry = {"id": placed["prompt_id"], "worker": placed.get("worker"),
                 "job": {"prompt": "a lighthouse told late", "body": {"prompt": "a lighthouse told late", "steps": 150},
                         "params": {"steps": 150}}}
        sending.evaluate("""entry => {
          const items = JSON.parse(localStorage.getItem('t2i.jobs.v1') || '[]');
          localStorage.setItem('t2i.jobs.v1', JSON.stringify([...items, { ...entry, at: Date.now() }]));
        }""", entry)
        expect(job.locator(".prompt")).to_have_text("a lighthouse told late")
        expect(job.locator(".prompt")).not_to_have_class(re.compile(r"\bunknown\b"))
        expect(job.locator(".meta")).to_contain_text("150")
        cancelled = listing.request.post(f"{cluster.url}/cancel/{placed['prompt_id']}", headers=auth, data={})
        assert cancelled.status == 200, cancelled.text()
        expect_state(job, "cancelled", timeout=5000)
        assert not listing.errors and not sending.errors, (listing.errors, sending.errors)
    finally:
        context.close()
