"""Helpers for the browser page tests (tests/test_page*.py): open the page, submit, find a
job's row or its image in the gallery, and watch what the page asked for.

Time comes from the page's own events: every wait is a Playwright ``expect`` or
``wait_for_function`` on a state of the page, never a sleep.
"""

from __future__ import annotations

import re
from typing import Any

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect

POLL_MS = 300

# Records every state line any job row showed (so fast transitions are not missed), and when
# the page first got a final /status for each job (to check nothing is asked after it).
RECORDER = """
window.__t2iSeen = [];
window.__t2iFinalAt = {};
new MutationObserver(() => {
  for (const el of document.querySelectorAll('.job .state')) {
    const text = el.textContent;
    if (text && !window.__t2iSeen.includes(text)) window.__t2iSeen.push(text);
  }
}).observe(document, {subtree: true, childList: true, characterData: true});
const fetchBefore = window.fetch;
window.fetch = async (...args) => {
  const response = await fetchBefore(...args);
  if (String(args[0]).includes('/status/')) {
    response.clone().json().then((data) => {
      if (['completed', 'failed', 'cancelled'].includes(data.status) && !(data.prompt_id in window.__t2iFinalAt)) {
        window.__t2iFinalAt[data.prompt_id] = performance.now();
      }
    }).catch(() => {});
  }
  return response;
};
"""

# Text a person should not have to read in the main line: status codes, URLs, exception names.
RAW = re.compile(r"\bHTTP\b|\b[1-5]\d\d\b|https?://|Errno|Traceback|\w+Error\b")


def open_page(page, url: str, poll: int = POLL_MS) -> None:
    page.add_init_script(RECORDER)
    page.goto(f"{url}/?poll={poll}")
    page.wait_for_selector("html[data-ready]")


def open_advanced(page) -> None:
    if page.locator("details.advanced").get_attribute("open") is None:
        page.click("details.advanced summary")


def submit(page, prompt: str, **advanced: Any) -> None:
    if advanced:
        open_advanced(page)
        for name, value in advanced.items():
            page.fill(f"#{name}", str(value))
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")


def row(page, prompt: str):
    """A job's row in the job list (gone once its image is in the gallery)."""
    return page.locator("li.job").filter(has=page.locator(".prompt", has_text=prompt))


def picture(page, prompt: str):
    """A finished image in the gallery."""
    return page.locator("#gallery .gallery-item").filter(has=page.locator(".caption", has_text=prompt))


def expect_state(job, state: str, timeout: float = 20000) -> None:
    """Wait until the row is in `state` (polled at every frame; expect's polling backs off to 0.5 s)."""
    try:
        handle = job.element_handle(timeout=timeout)
        job.page.wait_for_function("([el, state]) => el.dataset.state === state", arg=[handle, state],
                                   timeout=timeout)
    except PlaywrightError:
        expect(job).to_have_attribute("data-state", state, timeout=1000)  # says what it saw instead
        raise


DONE = """([prompt]) => {
  const item = [...document.querySelectorAll('#gallery .gallery-item')]
    .find((li) => li.querySelector('.caption').textContent.includes(prompt));
  const img = item && item.querySelector('img');
  const rowLeft = [...document.querySelectorAll('li.job .prompt')].some((p) => p.textContent.includes(prompt));
  return Boolean(img && img.complete && img.naturalWidth > 0 && !rowLeft);
}"""


def wait_done(page, prompt: str, timeout: float = 20000) -> dict:
    """Wait until the job's image is in the gallery, loaded, and its row has gone; the <img>."""
    item = picture(page, prompt)
    try:
        page.wait_for_function(DONE, arg=[prompt], timeout=timeout)
    except PlaywrightError:
        expect(item).to_have_count(1, timeout=1000)  # says what it saw instead
        expect(row(page, prompt)).to_have_count(0, timeout=1000)
        raise
    return item.locator("img").evaluate("img => ({src: img.src, width: img.naturalWidth, alt: img.alt})")


def seen_states(page) -> list[str]:
    return page.evaluate("window.__t2iSeen")


def generate_bodies(page) -> list[dict]:
    """Collects the JSON body of every POST /generate the page sends, from now on."""
    bodies: list[dict] = []
    page.on("request", lambda request: bodies.append(request.post_data_json)
            if request.method == "POST" and request.url.endswith("/generate") else None)
    return bodies


def states_in_view(page) -> int:
    """How many job rows' state lines are wholly inside the viewport."""
    return page.evaluate("""() => [...document.querySelectorAll('li.job .state')].filter((el) => {
      const r = el.getBoundingClientRect();
      return r.height > 0 && r.top >= 0 && r.bottom <= innerHeight && r.left >= 0 && r.right <= innerWidth;
    }).length""")


def grid_columns(page) -> int:
    return page.evaluate(
        "getComputedStyle(document.getElementById('gallery')).gridTemplateColumns.split(' ').length")


def images_shown(page) -> list[str]:
    """The src of every image on the page that shows a finished picture (previews excluded)."""
    return page.evaluate("""() => [...document.querySelectorAll('img')]
      .filter((img) => img.src && !img.hidden && img.offsetParent !== null && !img.src.includes('/previews/'))
      .map((img) => img.src)""")
