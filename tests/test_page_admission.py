"""The page and a full pool (issue 15): a 503's Retry-After is when a place is expected to free up, so the
page sends the job again after it, every time, instead of stretching it with a growing backoff of its own
(which left GPUs idle while jobs waited in browsers). Without a Retry-After its own backoff still applies.

Time in the browser is Playwright's fake clock: moved by hand, no waiting on the wall clock.
"""

from __future__ import annotations

import json

import pytest

from support.browser import browser, page, page_cluster, servers  # noqa: F401 (fixtures)

pytest.importorskip("playwright")
from playwright.sync_api import expect  # noqa: E402

from support.page import open_page, row, submit, wait_done  # noqa: E402

FULL = json.dumps({"error": "Every available worker's queue is full; try again shortly."})


@pytest.fixture(scope="module")
def cluster(servers, tmp_path_factory):  # noqa: F811
    yield from page_cluster(servers, tmp_path_factory.mktemp("page-admission"), step_time=0.01)


# The page's own clock at each POST /generate it sends and at each answer it gets.
TIMES = """
window.__generate = {sent: [], answered: []};
const fetchFirst = window.fetch;
window.fetch = async (...args) => {
  const post = String(args[0]).endsWith('/generate');
  if (post) window.__generate.sent.push(Date.now());
  const response = await fetchFirst(...args);
  if (post) window.__generate.answered.push(Date.now());
  return response;
};
"""


def refuse(page, refusals: int, headers: dict[str, str]) -> None:
    """POST /generate answered 503 ``refusals`` times (with ``headers``), then sent on to the scheduler."""
    count = [0]

    def handle(route):
        count[0] += 1
        if route.request.method == "POST" and count[0] <= refusals:
            route.fulfill(status=503, content_type="application/json", headers=headers, body=FULL)
        else:
            route.continue_()

    page.route("**/generate", handle)


def answered(page, n: int) -> None:
    page.wait_for_function(f"window.__generate.answered.length >= {n}", timeout=10000)


def waits(page) -> list[float]:
    """ms from each answer to the next request, on the page's clock."""
    times = page.evaluate("window.__generate")
    return [sent - got for got, sent in zip(times["answered"], times["sent"][1:])]


def start(page, url: str, prompt: str) -> None:
    page.clock.install()
    page.add_init_script(TIMES)
    open_page(page, url)
    page.clock.pause_at(page.evaluate("Date.now()") + 1000)  # from now on time moves only by hand
    submit(page, prompt, steps=2)
    expect(row(page, prompt).locator(".state")).to_contain_text("queue is full")
    answered(page, 1)


def test_a_full_pool_is_asked_again_after_its_retry_after_every_time(cluster, page):  # noqa: F811
    refuse(page, refusals=5, headers={"Retry-After": "2"})
    start(page, cluster.url, "a full pool")
    for n in range(2, 7):
        # Never before the server's 2 s, at most a quarter more (and the countdown's 250 ms tick),
        # each time: a growing backoff of the page's own would wait 4 s and more by the fourth 503.
        page.clock.run_for(2750)
        answered(page, n)
    assert all(2000 <= wait <= 2750 for wait in waits(page)), waits(page)
    page.clock.resume()
    wait_done(page, "a full pool")


def test_without_a_retry_after_the_page_backs_off_on_its_own(cluster, page):  # noqa: F811
    refuse(page, refusals=4, headers={})
    start(page, cluster.url, "no retry-after")
    for n in range(2, 6):
        page.clock.run_for(10250)  # the longest the n-th wait can be: 1, 2, 4, 8 s, each cut by up to a half
        answered(page, n)
    seen = waits(page)
    assert len(seen) == 4 and seen[3] >= 4000 and seen[3] > seen[0], seen
    page.clock.resume()
    wait_done(page, "no retry-after")
