"""The page offers what the API offers (issue 14, item 5): the Advanced section built from the
chosen workflow's params (numbers with their ranges, choices as selects, defaults from the
catalogue only), a picture for img2img (drop zone and file picker, checked here before it is
sent, not kept across a reload), every image of a batch in the gallery, and Try again / Reuse
with the new params and the picture. Headless Chromium against a real scheduler, a real worker
and the ComfyUI double on 127.0.0.1; waits are on the page's own events.
"""

from __future__ import annotations

import json
import re
import struct
import zlib

import pytest

from support.browser import browser, page, screenshot, page_cluster, servers  # noqa: F401 (fixtures)
from support.cluster import call
from support.timing import until

pytest.importorskip("playwright")
from playwright.sync_api import expect  # noqa: E402

from support.page import (expect_state, generate_bodies, images_shown, open_advanced, open_page,  # noqa: E402
                          picture, row, wait_done)

STEP_TIME = 0.02  # 3 steps: well under a second


def png(width: int, height: int) -> bytes:
    """A real PNG of the given size (a gradient), made here without any imaging library."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    rows = b"".join(b"\x00" + b"".join(bytes((x * 255 // width, y * 255 // height, 128)) for x in range(width))
                    for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def cluster(servers, tmp_path_factory):
    """One ComfyUI double, one worker (txt2img and img2img built in), one scheduler."""

    async def listed(scheduler) -> bool:  # the samplers come from ComfyUI's object_info, once the worker asked
        reply = await call("GET", f"{scheduler.url}/workflows")
        return reply.code == 200 and "choices" in reply.json["workflows"]["txt2img"]["params"]["sampler_name"]

    async def ready(scheduler) -> None:
        await until(lambda: listed(scheduler), what="the pool's catalogue with ComfyUI's samplers")

    yield from page_cluster(servers, tmp_path_factory.mktemp("inputs"), step_time=STEP_TIME, ready=ready)


def catalogue(page) -> dict:
    return page.evaluate("fetch('/workflows').then((r) => r.json())")


def choose_workflow(page, name: str) -> None:
    open_advanced(page)
    page.select_option("#workflow", name)


def drop_zone(page, name: str = "image"):
    return page.locator(f'.picture-field[data-field="{name}"]')


# --- the Advanced section ---------------------------------------------------------------


def test_advanced_is_built_from_the_chosen_workflow(cluster, page):
    open_page(page, cluster.url)
    params = catalogue(page)["workflows"]["txt2img"]["params"]
    open_advanced(page)
    expect(page.locator("#workflow")).to_have_value("txt2img")
    # Numbers with the catalogue's ranges and defaults; width and height go by 8.
    cfg = page.locator("#cfg")
    expect(cfg).to_have_value("7")
    assert (cfg.get_attribute("type"), cfg.get_attribute("min"), cfg.get_attribute("max")) == ("number", "0", "30")
    expect(page.locator("label[for=cfg]")).to_have_text("CFG")
    batch = page.locator("#batch_size")
    expect(batch).to_have_value("1")
    assert (batch.get_attribute("min"), batch.get_attribute("max"), batch.get_attribute("step")) == ("1", "8", "1")
    expect(page.locator("#batch_size-hint")).to_have_text("1–8")
    assert page.locator("#width").get_attribute("step") == "8"
    # Choices as a select holding exactly the catalogue's, the default chosen.
    for name in ("sampler_name", "scheduler"):
        select = page.locator(f"#{name}")
        assert select.evaluate("el => el.tagName") == "SELECT"
        assert select.evaluate("el => [...el.options].map((o) => o.value)") == params[name]["choices"]
        expect(select).to_have_value(params[name]["default"])
    expect(page.locator("#denoise")).to_have_count(0)  # img2img's only
    expect(drop_zone(page)).to_have_count(0)
    screenshot(page, "30-advanced-txt2img")

    # Switching keeps what still applies; img2img has a drop zone and denoise, no width/height.
    page.fill("#cfg", "5.5")
    page.fill("#steps", "6")
    page.select_option("#sampler_name", "dpmpp_2m")
    page.select_option("#workflow", "img2img")
    expect(drop_zone(page)).to_be_visible()
    expect(drop_zone(page).locator("button.choose")).to_have_text("Choose a picture…")
    expect(drop_zone(page).locator(".hint")).to_contain_text("PNG, JPEG or WebP, up to 8 MB")
    expect(page.locator("#denoise")).to_have_value("0.75")
    assert page.locator("#denoise").get_attribute("step") == "0.01"
    expect(page.locator("#width")).to_be_hidden()
    expect(page.locator("#cfg")).to_have_value("5.5")
    expect(page.locator("#steps")).to_have_value("6")
    expect(page.locator("#sampler_name")).to_have_value("dpmpp_2m")
    page.fill("#denoise", "0.4")
    screenshot(page, "31-advanced-img2img")

    # The form survives a reload, per workflow: the chosen one and its values.
    page.reload()
    page.wait_for_selector("html[data-ready]")
    expect(page.locator("#workflow")).to_have_value("img2img")
    expect(page.locator("#denoise")).to_have_value("0.4")
    expect(page.locator("#cfg")).to_have_value("5.5")
    page.select_option("#workflow", "txt2img")
    expect(page.locator("#width")).to_have_value("512")
    expect(page.locator("#denoise")).to_have_count(0)
    expect(page.locator("#sampler_name")).to_have_value("dpmpp_2m")
    page.select_option("#workflow", "img2img")
    expect(page.locator("#denoise")).to_have_value("0.4")  # kept while txt2img was shown


# --- a picture for img2img ----------------------------------------------------------------


def test_a_picture_by_keyboard_makes_an_image_of_its_size(cluster, page):
    # Playwright turns file-chooser interception on without waiting for it: on from the start,
    # so the Enter below cannot beat it (and open a real dialog nobody answers).
    page.on("filechooser", lambda chooser: None)
    open_page(page, cluster.url)
    bodies = generate_bodies(page)
    choose_workflow(page, "img2img")
    page.fill("#steps", "3")
    page.fill("#cfg", "6.5")
    zone = drop_zone(page)
    # The picker is a button: reached and opened from the keyboard.
    zone.locator("button.choose").focus()
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files(files=[{"name": "gradient.png", "mimeType": "image/png", "buffer": png(96, 80)}])
    expect(zone.locator(".file-name")).to_have_text("gradient.png")
    expect(zone.locator(".file-meta")).to_have_text(re.compile(r"^96×80 · \d+(\.\d)? (bytes|KB) · PNG$"))
    page.wait_for_function("img => img.complete && img.naturalWidth === 96",
                           arg=zone.locator("img.drop-preview").element_handle())
    expect(zone.locator("button.replace")).to_be_focused()  # focus stays in the field
    expect(page.locator("#announcer")).to_contain_text("Picture gradient.png added")
    screenshot(page, "32-picture-chosen")

    page.fill("#prompt", "the gradient, repainted")
    page.press("#prompt", "Enter")
    image = wait_done(page, "the gradient, repainted")
    size = picture(page, "the gradient, repainted").locator("img").evaluate(
        "img => [img.naturalWidth, img.naturalHeight]")
    assert size == [96, 80], image  # an image-to-image run keeps the input's size
    assert len(bodies) == 1
    body = bodies[0]
    assert body["workflow"] == "img2img" and body["image"].startswith("data:image/png;base64,")
    assert body["cfg"] == 6.5 and body["steps"] == 3 and "denoise" not in body  # defaults left to the server
    # The picture is never written to localStorage (the form, the job cache, the gallery).
    stored = page.evaluate("JSON.stringify(Object.assign({}, localStorage))")
    assert "data:image" not in stored and "gradient.png" in stored

    # Reuse while the page holds the picture: back in the drop zone, with the settings.
    page.fill("#cfg", "9")
    zone.locator("button.clear").click()
    expect(zone.locator("button.choose")).to_be_focused()
    picture(page, "the gradient, repainted").locator("button.reuse").click()
    expect(zone.locator(".file-name")).to_have_text("gradient.png")
    expect(page.locator("#cfg")).to_have_value("6.5")

    # A reload drops it, and the drop zone says so.
    page.reload()
    page.wait_for_selector("html[data-ready]")
    zone = drop_zone(page)
    expect(zone.locator(".picture-note")).to_have_text(
        "“gradient.png” was not kept across the reload: pictures are too big to keep in this browser. "
        "Choose it again.")
    expect(zone.locator("button.choose")).to_be_visible()
    screenshot(page, "33-picture-not-kept")


def test_what_is_not_a_picture_is_refused_here_and_nothing_is_sent(cluster, page):
    open_page(page, cluster.url)
    bodies = generate_bodies(page)
    choose_workflow(page, "img2img")
    zone = drop_zone(page)
    page.fill("#prompt", "a cat from my notes")
    # Named like a PNG, but its bytes are text: checked by content, as the server does.
    zone.locator("input[type=file]").set_input_files(files=[{"name": "notes.png", "mimeType": "image/png",
                                                              "buffer": b"shopping list: milk, eggs\n"}])
    error = zone.locator(".error")
    expect(error).to_have_text("“notes.png” is not a picture this server takes: choose a PNG, JPEG or WebP image.")
    expect(page.locator("#announcer")).to_contain_text("notes.png")
    expect(zone.locator(".dropzone")).to_have_class(re.compile(r"\binvalid\b"))
    screenshot(page, "34-not-a-picture")
    page.press("#prompt", "Enter")
    expect(error).to_have_text("Choose a picture to start from.")  # still nothing to send
    expect(zone.locator("button.choose")).to_be_focused()
    expect(page.locator("li.job")).to_have_count(0)
    assert bodies == []

    # A picture over the catalogue's byte cap is refused here too.
    page.route("**/workflows", lambda route: route.fulfill(
        status=200, content_type="application/json", body=json.dumps(_with_cap(route.fetch().json(), 1000))))
    page.reload()
    page.wait_for_selector("html[data-ready]")
    zone = drop_zone(page)
    big = png(64, 64)
    assert len(big) > 1000
    zone.locator("input[type=file]").set_input_files(files=[{"name": "big.png", "mimeType": "image/png", "buffer": big}])
    expect(zone.locator(".error")).to_contain_text("“big.png” is ")
    expect(zone.locator(".error")).to_contain_text("pictures can be up to 1000 bytes here. Choose a smaller one.")
    page.unroute("**/workflows")

    # The server checks again: its 400 naming the field is shown at the drop zone.
    page.route("**/generate", lambda route: route.fulfill(
        status=400, content_type="application/json",
        body=json.dumps({"error": "`image` is a damaged or truncated PNG image.", "field": "image"})))
    zone.locator("input[type=file]").set_input_files(files=[{"name": "small.png", "mimeType": "image/png",
                                                              "buffer": png(8, 8)}])
    expect(zone.locator(".file-name")).to_have_text("small.png")
    page.press("#prompt", "Enter")
    expect(zone.locator(".error")).to_have_text("Image is a damaged or truncated PNG image.")
    expect(zone.locator("button.replace")).to_be_focused()
    expect(page.locator("li.job")).to_have_count(0)


def _with_cap(data: dict, max_bytes: int) -> dict:
    data["workflows"]["img2img"]["params"]["image"]["max_bytes"] = max_bytes
    return data


# --- batches, Try again ---------------------------------------------------------------------


def test_a_batch_of_three_puts_three_images_in_the_gallery(cluster, page):
    open_page(page, cluster.url)
    bodies = generate_bodies(page)
    open_advanced(page)
    page.fill("#batch_size", "3")
    page.fill("#steps", "3")
    page.fill("#width", "128")
    page.fill("#height", "128")
    page.fill("#prompt", "three paper cranes")
    page.press("#prompt", "Enter")
    expect(row(page, "three paper cranes").locator(".meta")).to_contain_text("3 images")
    items = picture(page, "three paper cranes")
    expect(items).to_have_count(3, timeout=20000)
    page.wait_for_function("""() => {
      const imgs = [...document.querySelectorAll('#gallery .gallery-item img')];
      return imgs.length === 3 && imgs.every((img) => img.complete && img.naturalWidth > 0);
    }""")
    assert bodies[0]["batch_size"] == 3
    srcs = [items.nth(i).locator("img").get_attribute("src") for i in range(3)]
    assert len(set(srcs)) == 3, srcs
    shown = images_shown(page)
    assert sorted(shown) == sorted(srcs), shown  # each image once on the page
    expect(items.locator(".meta")).to_contain_text(["1 of 3", "2 of 3", "3 of 3"])
    for i in range(3):
        expect(items.nth(i).locator("a.open")).to_have_attribute("href", srcs[i])
        expect(items.nth(i).locator("a.open")).to_have_attribute("aria-label", re.compile(rf"image {i + 1} of 3"))
    with page.expect_download() as download:
        items.nth(1).locator("button.download").click()
    assert download.value.suggested_filename.endswith("-2.png"), download.value.suggested_filename
    screenshot(page, "35-batch-of-three", full_page=True)

    # After a reload they are all still there, once each.
    page.reload()
    page.wait_for_selector("html[data-ready]")
    expect(picture(page, "three paper cranes")).to_have_count(3)


def test_try_again_sends_the_same_params_and_picture(cluster, page, servers):
    open_page(page, cluster.url)
    bodies = generate_bodies(page)
    choose_workflow(page, "img2img")
    page.fill("#steps", "3")
    page.fill("#denoise", "0.5")
    page.select_option("#scheduler", "karras")
    drop_zone(page).locator("input[type=file]").set_input_files(
        files=[{"name": "start.png", "mimeType": "image/png", "buffer": png(40, 24)}])
    expect(drop_zone(page).locator(".file-name")).to_have_text("start.png")
    servers.call(cluster.sim.fail_next, node_type="KSampler", message="CUDA out of memory", after_steps=1)
    page.fill("#prompt", "a second try")
    page.press("#prompt", "Enter")
    job = row(page, "a second try")
    expect_state(job, "failed")
    job.locator("button.retry").click()
    wait_done(page, "a second try")
    assert len(bodies) == 2 and bodies[1] == bodies[0], [sorted(b) for b in bodies]
    assert bodies[0]["denoise"] == 0.5 and bodies[0]["scheduler"] == "karras" and bodies[0]["image"].startswith("data:")
    size = picture(page, "a second try").locator("img").evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert size == [40, 24]
    # A job this page no longer holds the picture of (sent before a reload): Try again fills the
    # form instead, and its drop zone asks for the picture again; nothing is sent without it.
    body = {"prompt": "lost with its picture", "workflow": "img2img", "steps": 3, "denoise": 0.3, "seed": 77}
    page.evaluate("""(job) => {
      job.submittedAt = Date.now() - 60000;
      sessionStorage.setItem('t2i.active.v1', JSON.stringify([{id: 'lostpic1', worker: 'gpu-a', job}]));
    }""", {"prompt": body["prompt"], "body": body, "params": {"steps": 3, "denoise": 0.3, "seed": 77},
           "inputs": {"image": {"name": "holiday.jpg", "size": 52000, "width": 640, "height": 480}}})
    page.reload()
    page.wait_for_selector("html[data-ready]")
    lost = row(page, "lost with its picture")
    expect_state(lost, "gone")
    lost.locator("button.retry").click()
    zone = drop_zone(page)
    expect(zone.locator(".picture-note")).to_have_text(
        "This page no longer holds “holiday.jpg”, the picture to start from (pictures are not kept across a "
        "reload). Choose it again.")
    expect(zone.locator("button.choose")).to_be_focused()
    expect(page.locator("#prompt")).to_have_value("lost with its picture")
    expect(page.locator("#denoise")).to_have_value("0.3")
    expect(page.locator("#seed")).to_have_value("77")
    assert len(bodies) == 2  # nothing sent


def test_every_type_of_param_gets_its_field(cluster, page):
    """A workflow of the operator's own (routed catalogue): a switch, free text, choices without a
    default, a whole number; what is sent, and a 400 about a built field shown at that field."""
    custom = {"prompt": {"type": "string", "required": True, "max_length": 500},
              "clip_skip": {"type": "integer", "default": 1, "min": 1, "max": 4},
              "tiling": {"type": "boolean", "default": False},
              "style": {"type": "string", "max_length": 12},
              "upscaler": {"type": "enum", "choices": ["none", "4x", "8x"]}}

    def workflows(route):
        data = route.fetch().json()
        data["workflows"]["custom"] = {"params": custom, "ready": True}
        route.fulfill(status=200, content_type="application/json", body=json.dumps(data))

    sent = []

    def generate(route):
        sent.append(route.request.post_data_json)
        route.fulfill(status=400, content_type="application/json",
                      body=json.dumps({"error": "`style` is not a style this server knows.", "field": "style"}))

    page.route("**/workflows", workflows)
    page.route("**/generate", generate)
    open_page(page, cluster.url)
    choose_workflow(page, "custom")
    expect(page.locator("#steps")).to_be_hidden()  # not a param of this workflow
    expect(page.locator("#clip_skip")).to_have_value("1")
    expect(page.locator("label[for=clip_skip]")).to_have_text("Clip skip")
    tiling = page.locator("#tiling")
    assert tiling.get_attribute("type") == "checkbox"
    expect(tiling).not_to_be_checked()
    upscaler = page.locator("#upscaler")
    assert upscaler.evaluate("el => [...el.options].map((o) => [o.value, o.text])") == [
        ["", "Default"], ["none", "none"], ["4x", "4x"], ["8x", "8x"]]  # no default: the server's
    page.fill("#style", "watercolour paper")
    expect(page.locator("#style-counter")).to_have_text("5 characters too many")
    page.fill("#prompt", "a custom one")
    page.press("#prompt", "Enter")
    expect(page.locator("#style-error")).to_have_text("Style has 17 characters; the limit is 12. Shorten it by 5.")
    expect(page.locator("#style")).to_be_focused()
    assert sent == []  # refused here
    page.fill("#style", "watercolour")
    page.focus("#clip_skip")
    page.keyboard.press("Tab")
    expect(tiling).to_be_focused()  # numbers, then switches and choices (in the catalogue's order), then text
    page.keyboard.press("Space")
    page.keyboard.press("Tab")
    expect(upscaler).to_be_focused()
    page.select_option("#upscaler", "4x")
    page.fill("#clip_skip", "2")
    page.press("#prompt", "Enter")
    expect(page.locator("#style-error")).to_have_text("Style is not a style this server knows.")
    expect(page.locator("#style")).to_be_focused()
    expect(page.locator("#style")).to_have_attribute("aria-invalid", "true")
    assert sent[0]["workflow"] == "custom"
    assert {k: v for k, v in sent[0].items() if k not in ("prompt", "workflow", "seed")} == {
        "clip_skip": 2, "tiling": True, "style": "watercolour", "upscaler": "4x"}, sent
    screenshot(page, "36-custom-workflow")

