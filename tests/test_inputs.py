"""Input images (issue 14): data: URLs checked by content, the test double's POST /upload/image and
LoadImage / VAEEncode (PROTOCOL §12), t2i.worker.inputs.upload_inputs, img2img end to end, pruning.

The worker-level tests marked ``needs_upload_wiring`` run once ``Runner.submit`` calls
``upload_inputs`` (they are skipped until then).
"""

from __future__ import annotations

import base64
import json
import os
import struct
import uuid
from pathlib import Path

import pytest
from tornado.httpclient import AsyncHTTPClient

from support.cluster import WorkerCluster, call
from support.timing import FakeClock, until
from t2i.comfy_sim.imaging import Picture, encode_jpeg, encode_png, png_chunks
from t2i.comfyui import ComfyUIClient, ComfyUIUnavailable, UploadRejected
from t2i.config import RetentionConfig, load_worker_config
from t2i.dataurl import BadImage, decode_image
from t2i.validation import GenerateRequest, ValidationError, catalogue_of, validate_generate
from t2i.worker import runner as runner_module
from t2i.worker.images import ImageStore
from t2i.worker.inputs import upload_inputs
from t2i.worker.jobs import COMPLETED, STARTED, Job, JobStore
from t2i.worker.retention import Pruner
from t2i.worker.workflow import build_workflow

needs_upload_wiring = pytest.mark.skipif(
    not hasattr(runner_module, "upload_inputs"),
    reason="Runner.submit does not call t2i.worker.inputs.upload_inputs yet")

ROOT = Path(__file__).resolve().parent.parent
GIF = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00" \
      b"\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"


# --- pictures -------------------------------------------------------------------------

def png(width: int, height: int, seed: int = 1, noise: bool = False) -> bytes:
    """A flat colour (a few hundred bytes), or noise (does not compress)."""
    picture = Picture(width, height, "noise", seed=seed) if noise else \
        Picture(width, height, "solid", rgb=(seed * 47 % 256, 90, 160))
    return encode_png(width, height, picture.rows())


def jpeg(width: int, height: int) -> bytes:
    return encode_jpeg(width, height, [(200, 30, 30)] * (((width + 7) // 8) * ((height + 7) // 8)))


def webp_lossless(width: int, height: int) -> bytes:
    bits = (width - 1) | (height - 1) << 14
    payload = b"\x2f" + struct.pack("<I", bits) + b"\x00" * 8
    return b"RIFF" + struct.pack("<I", 4 + 8 + len(payload)) + b"WEBP" + b"VP8L" + struct.pack("<I", len(payload)) \
        + payload


def webp_extended(width: int, height: int) -> bytes:
    payload = b"\x10\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + 8 + len(payload)) + b"WEBP" + b"VP8X" + struct.pack("<I", 10) + payload


def webp_lossy(width: int, height: int) -> bytes:
    payload = b"\x00\x00\x00" + b"\x9d\x01\x2a" + struct.pack("<HH", width, height) + b"\x00" * 8
    return b"RIFF" + struct.pack("<I", 4 + 8 + len(payload)) + b"WEBP" + b"VP8 " + struct.pack("<I", len(payload)) \
        + payload


def data_url(data: bytes, content_type: str = "image/png") -> str:
    return f"data:{content_type};base64," + base64.b64encode(data).decode()


def png_size(data: bytes) -> tuple[int, int]:
    chunks = png_chunks(data)
    assert chunks[0][0] == b"IHDR" and all(ok for _, _, ok in chunks)
    return struct.unpack(">II", chunks[0][1][:8])


# --- data: URLs, checked by their content ------------------------------------------------

@pytest.mark.parametrize("data, kind, size", [
    (png(40, 24), "image/png", (40, 24)),
    (jpeg(33, 17), "image/jpeg", (33, 17)),
    (webp_lossless(300, 200), "image/webp", (300, 200)),
    (webp_extended(5000, 3), "image/webp", (5000, 3)),
    (webp_lossy(640, 480), "image/webp", (640, 480)),
])
def test_png_jpeg_and_webp_are_read_from_their_bytes(data, kind, size):
    image = decode_image(data_url(data, "application/octet-stream"))  # the declared type says nothing
    assert (image.content_type, (image.width, image.height), image.data) == (kind, size, data)
    assert image.extension == {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}[kind]


@pytest.mark.parametrize("value, problem", [
    (42, "must be a data: URL"),
    ("https://example.com/fox.png", "must be a data: URL"),
    ("data:image/png," + "x" * 10, "must be a base64 data: URL"),
    ("data:image/png;base64,not base64!", "is not valid base64"),
    ("data:image/png;base64,", "is empty"),
    (data_url(GIF, "image/png"), "is not a PNG, JPEG or WebP image"),        # named PNG, is a GIF
    (data_url(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/png"), "is not a PNG, JPEG or WebP image"),
    (data_url(png(8, 8)[:20]), "is a damaged or truncated PNG image"),
    (data_url(b"\xff\xd8\xff\xe0" + b"\x00" * 30, "image/jpeg"), "is a damaged or truncated JPG image"),
    (data_url(b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x00" * 20, "image/webp"), "is a damaged or truncated WEBP"),
    (data_url(webp_extended(1, 1)[:26], "image/webp"), "is a damaged or truncated WEBP"),
])
def test_what_is_not_an_acceptable_image_is_said(value, problem):
    with pytest.raises(BadImage) as info:
        decode_image(value)
    assert problem in str(info.value)


def test_size_caps_in_bytes_and_pixels():
    data = png(64, 32)
    assert decode_image(data_url(data), max_bytes=len(data)).width == 64
    with pytest.raises(BadImage, match=f"is larger than {len(data) - 1} bytes"):
        decode_image(data_url(data), max_bytes=len(data) - 1)
    with pytest.raises(BadImage, match="is larger than 100 bytes"):  # refused before decoding
        decode_image(data_url(b"\x00" * 100_000), max_bytes=100)
    assert decode_image(data_url(data), max_pixels=64 * 32).height == 32
    with pytest.raises(BadImage, match="is 64×32 pixels; at most 2047 pixels"):
        decode_image(data_url(data), max_pixels=2047)
    with pytest.raises(BadImage, match="is 5000×3 pixels"):
        decode_image(data_url(webp_extended(5000, 3)), max_pixels=10_000)


@pytest.fixture
def config(tmp_path):
    (tmp_path / "worker.yaml").write_text("listen: '127.0.0.1:1'\nmax_image_bytes: 5000\nmax_image_pixels: 4096\n")
    return load_worker_config(tmp_path / "worker.yaml")


def test_image_parameters_are_checked_by_validation(config):
    catalogue = json.loads(json.dumps(catalogue_of(config)))
    spec = catalogue["workflows"]["img2img"]["params"]["image"]
    assert spec == {"type": "image", "required": True, "max_bytes": 5000, "max_pixels": 4096}
    good = data_url(png(64, 64))
    request = validate_generate({"workflow": "img2img", "prompt": "a fox", "image": good}, catalogue)
    assert request.params["image"] == good and request.params["denoise"] == 0.75

    def refused(body):
        with pytest.raises(ValidationError) as info:
            validate_generate({"workflow": "img2img", "prompt": "a fox", **body}, catalogue)
        return info.value.field, str(info.value)

    assert refused({}) == ("image", "`image` is required.")
    assert refused({"image": data_url(GIF)}) == ("image", "`image` is not a PNG, JPEG or WebP image.")
    assert refused({"image": data_url(png(65, 64))}) == (
        "image", "`image` is 65×64 pixels; at most 4096 pixels are allowed.")
    field, message = refused({"image": data_url(png(64, 64, seed=2) + b"\x00" * 5000)})
    assert field == "image" and "is larger than 5000 bytes" in message
    assert refused({"image": 7})[0] == "image"
    # txt2img takes no image
    with pytest.raises(ValidationError) as info:
        validate_generate({"prompt": "a fox", "image": good}, catalogue)
    assert info.value.field == "image"


# --- the test double: POST /upload/image, LoadImage, VAEEncode (PROTOCOL §12) --------------

def multipart(parts: list[tuple[str, str | None, str | None, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = b""
    for name, filename, content_type, data in parts:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
        head += f'; filename="{filename}"' if filename is not None else ""
        head += "\r\n" + (f"Content-Type: {content_type}\r\n" if content_type else "") + "\r\n"
        out += head.encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def upload(sim, data: bytes, filename: str = "job123_in.png", **fields: str):
    parts = [(key, None, None, value.encode()) for key, value in fields.items()]
    body, content_type = multipart(parts + [("image", filename, "image/png", data)])
    response = await AsyncHTTPClient().fetch(sim.url + "/upload/image", method="POST", body=body, raise_error=False,
                                             headers={"Content-Type": content_type})
    return response.code, (json.loads(response.body) if response.code == 200 else response.body), response


async def post_prompt(sim, workflow: dict):
    response = await AsyncHTTPClient().fetch(sim.url + "/prompt", method="POST", raise_error=False,
                                             body=json.dumps({"prompt": workflow, "client_id": "t"}))
    return response.code, json.loads(response.body)


async def finished(sim, prompt_id: str) -> dict:
    await until(lambda: prompt_id in sim.history, what=f"{prompt_id} in history")
    return sim.history[prompt_id]


@pytest.fixture
def sim(io_loop, tmp_path):
    from t2i.comfy_sim import ComfySim

    sim = ComfySim(step_time=0.001, output_dir=str(tmp_path / "output"), input_dir=str(tmp_path / "input"))
    io_loop.run_sync(lambda: sim.start(port=0, address="127.0.0.1"))
    yield sim
    io_loop.run_sync(sim.stop)


@pytest.mark.gen_test(timeout=30)
async def test_upload_answers_name_subfolder_and_type(sim):
    data = png(16, 16)
    code, answer, response = await upload(sim, data, type="input", overwrite="true")
    assert code == 200 and answer == {"name": "job123_in.png", "subfolder": "", "type": "input"}
    assert response.headers["Content-Type"].startswith("application/json")
    code, answer, _ = await upload(sim, data, subfolder="t2i", overwrite="true")
    assert code == 200 and answer == {"name": "job123_in.png", "subfolder": "t2i", "type": "input"}
    assert (Path(sim.input_dir) / "t2i" / "job123_in.png").read_bytes() == data
    view = await AsyncHTTPClient().fetch(sim.url + "/view?filename=job123_in.png&subfolder=t2i&type=input")
    assert view.body == data and view.headers["Content-Type"] == "image/png"


@pytest.mark.gen_test(timeout=30)
async def test_upload_without_overwrite_renames_a_different_file_only(sim):
    first, second = png(16, 16, seed=1), png(16, 16, seed=2)
    assert (await upload(sim, first, subfolder="t2i"))[1]["name"] == "job123_in.png"
    # the same bytes again: ComfyUI keeps the file and answers its name
    assert (await upload(sim, first, subfolder="t2i", overwrite="false"))[1]["name"] == "job123_in.png"
    # different bytes under a taken name: stored as "name (1).png", then "(2)"
    assert (await upload(sim, second, subfolder="t2i"))[1]["name"] == "job123_in (1).png"
    assert (await upload(sim, png(16, 16, seed=3), subfolder="t2i"))[1]["name"] == "job123_in (2).png"
    folder = Path(sim.input_dir) / "t2i"
    assert (folder / "job123_in.png").read_bytes() == first and (folder / "job123_in (1).png").read_bytes() == second
    # overwrite=true (or 1) replaces it under its own name
    assert (await upload(sim, second, subfolder="t2i", overwrite="1"))[1]["name"] == "job123_in.png"
    assert (folder / "job123_in.png").read_bytes() == second


@pytest.mark.gen_test(timeout=30)
async def test_upload_refusals_are_400_with_an_empty_body(sim):
    body, content_type = multipart([("type", None, None, b"input")])  # no image part
    response = await AsyncHTTPClient().fetch(sim.url + "/upload/image", method="POST", body=body, raise_error=False,
                                             headers={"Content-Type": content_type})
    assert (response.code, response.body) == (400, b"")
    response = await AsyncHTTPClient().fetch(sim.url + "/api/upload/image", method="POST", body=b"{}",
                                             raise_error=False, headers={"Content-Type": "application/json"})
    assert (response.code, response.body) == (400, b"")
    for subfolder in ("../../etc", "..", "t2i/../../x"):
        code, body, _ = await upload(sim, png(8, 8), subfolder=subfolder)
        assert (code, body) == (400, b""), subfolder
    code, body, _ = await upload(sim, png(8, 8), filename="../escape.png")
    assert (code, body) == (400, b"")
    assert not (Path(sim.input_dir).parent / "escape.png").exists()


@pytest.mark.gen_test(timeout=30)
async def test_load_image_lists_the_input_folder_and_refuses_a_missing_file(sim):
    await upload(sim, png(8, 8), filename="top.png")
    await upload(sim, png(8, 8), filename="deep.png", subfolder="t2i")
    (Path(sim.input_dir) / "notes.txt").write_text("not an image")
    response = await AsyncHTTPClient().fetch(sim.url + "/object_info/LoadImage")
    info = json.loads(response.body)["LoadImage"]
    assert info["input"]["required"]["image"] == [["top.png"], {"image_upload": True}]
    assert info["output"] == ["IMAGE", "MASK"] and info["category"] == "image"
    code, answer = await post_prompt(sim, {
        "1": {"class_type": "LoadImage", "inputs": {"image": "missing.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "t2i_up"}}})
    assert code == 400 and answer["error"]["type"] == "prompt_outputs_failed_validation"
    assert answer["node_errors"]["1"]["errors"][0] == {
        "type": "custom_validation_failed", "message": "Custom validation failed for node",
        "details": "image - Invalid image file: missing.png", "extra_info": {"input_name": "image"}}
    assert not sim.submitted


@pytest.mark.gen_test(timeout=30)
async def test_load_image_to_save_image_keeps_the_picture(sim):
    data = png(48, 40, seed=9, noise=True)
    await upload(sim, data, subfolder="t2i", overwrite="true")
    code, answer = await post_prompt(sim, {
        "1": {"class_type": "LoadImage", "inputs": {"image": "t2i/job123_in.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "t2i_up"}}})
    assert code == 200, answer
    entry = await finished(sim, answer["prompt_id"])
    assert entry["outputs"] == {"2": {"images": [{"filename": "t2i_up_00001_.png", "subfolder": "",
                                                  "type": "output"}]}}
    saved = (Path(sim.output_dir) / "t2i_up_00001_.png").read_bytes()
    assert png_size(saved) == (48, 40)
    from t2i.comfy_sim.imaging import decode_png_rgb
    assert decode_png_rgb(saved)[2] == decode_png_rgb(data)[2]


def img2img(image: str, amount: int = 1, seed: int = 5, denoise: float = 0.6, prefix: str = "t2i") -> dict:
    workflow = json.loads((ROOT / "t2i" / "workflows" / "img2img.json").read_text())
    workflow["10"]["inputs"]["image"] = image
    workflow["12"]["inputs"]["amount"] = amount
    workflow["3"]["inputs"].update(seed=seed, steps=2, denoise=denoise)
    workflow["6"]["inputs"]["text"] = "a fox"
    workflow["9"]["inputs"]["filename_prefix"] = prefix
    return workflow


@pytest.mark.gen_test(timeout=30)
async def test_img2img_template_keeps_the_input_size_and_batches(sim):
    await upload(sim, png(200, 136), filename="a.png", subfolder="t2i")
    await upload(sim, jpeg(96, 64), filename="b.jpg", subfolder="t2i")
    await upload(sim, png(203, 141, seed=4), filename="c.png", subfolder="t2i")
    sizes = {}
    for name, amount in (("a.png", 1), ("b.jpg", 3), ("c.png", 1)):
        code, answer = await post_prompt(sim, img2img(f"t2i/{name}", amount=amount, prefix=f"out_{name[0]}"))
        assert code == 200, answer
        entry = await finished(sim, answer["prompt_id"])
        assert entry["status"]["status_str"] == "success", entry["status"]
        files = [image["filename"] for image in entry["outputs"]["9"]["images"]]
        assert len(files) == amount
        sizes[name] = {png_size((Path(sim.output_dir) / f).read_bytes()) for f in files}
        if amount > 1:  # a batch: one seed each, so different pictures
            assert len({(Path(sim.output_dir) / f).read_bytes() for f in files}) == amount
    # the VAE works on 8x8 blocks: like ComfyUI's, it crops to a multiple of 8
    assert sizes == {"a.png": {(200, 136)}, "b.jpg": {(96, 64)}, "c.png": {(200, 136)}}


@pytest.mark.gen_test(timeout=30)
async def test_img2img_result_depends_on_the_input_image(sim):
    await upload(sim, png(64, 64, seed=1), filename="one.png", subfolder="t2i")
    await upload(sim, png(64, 64, seed=2), filename="two.png", subfolder="t2i")
    results = []
    for name in ("one.png", "two.png"):
        code, answer = await post_prompt(sim, img2img(f"t2i/{name}", prefix=f"dep_{name[:3]}"))
        entry = await finished(sim, answer["prompt_id"])
        results.append((Path(sim.output_dir) / entry["outputs"]["9"]["images"][0]["filename"]).read_bytes())
    assert png_size(results[0]) == png_size(results[1]) == (64, 64)
    assert results[0] != results[1]


@pytest.mark.gen_test(timeout=30)
async def test_load_image_is_run_again_when_the_file_changes(sim):
    await upload(sim, png(32, 32, seed=1), filename="same.png", subfolder="t2i", overwrite="true")
    workflow = {"1": {"class_type": "LoadImage", "inputs": {"image": "t2i/same.png"}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "same"}}}
    first = await finished(sim, (await post_prompt(sim, workflow))[1]["prompt_id"])
    await upload(sim, png(24, 16, seed=2), filename="same.png", subfolder="t2i", overwrite="true")
    second = await finished(sim, (await post_prompt(sim, workflow))[1]["prompt_id"])
    # IS_CHANGED hashes the file: new content, so not the cached result of the first run
    assert first["outputs"]["2"]["images"][0]["filename"] != second["outputs"]["2"]["images"][0]["filename"]
    saved = Path(sim.output_dir) / second["outputs"]["2"]["images"][0]["filename"]
    assert png_size(saved.read_bytes()) == (24, 16)


# --- upload_inputs --------------------------------------------------------------------

def img2img_request(config, image: str, **params) -> GenerateRequest:
    return validate_generate({"workflow": "img2img", "prompt": "a fox", "image": image, **params},
                             catalogue_of(config))


@pytest.mark.gen_test(timeout=30)
async def test_upload_inputs_uses_the_name_comfyui_answered(sim, config):
    comfy = ComfyUIClient(sim.url)
    prompt_id = str(uuid.uuid4())
    data = png(40, 32)
    request = img2img_request(config, data_url(data, "image/jpeg"))  # named JPEG, is a PNG
    sim.rename_uploads = True  # this ComfyUI stores the upload under another name
    checked, uploaded = await upload_inputs(comfy, config, request, prompt_id)
    assert sim.uploads == [{"name": f"{prompt_id}_image (1).png", "subfolder": "t2i", "type": "input"}]
    assert uploaded == [f"t2i/{prompt_id}_image (1).png"]
    assert checked.params["image"] == uploaded[0]
    assert {k: v for k, v in checked.params.items() if k != "image"} == \
        {k: v for k, v in request.params.items() if k != "image"}
    assert request.params["image"].startswith("data:")  # the caller's request is left as it was
    assert (Path(sim.input_dir) / "t2i" / f"{prompt_id}_image (1).png").read_bytes() == data
    # the workflow built from it loads the file ComfyUI stored, and ComfyUI accepts it
    workflow = build_workflow(config, checked, prompt_id)
    assert workflow["10"]["inputs"]["image"] == f"t2i/{prompt_id}_image (1).png"
    code, answer = await post_prompt(sim, workflow)
    assert code == 200, answer
    entry = await finished(sim, answer["prompt_id"])
    [image] = entry["outputs"]["9"]["images"]
    assert png_size((Path(sim.output_dir) / image["filename"]).read_bytes()) == (40, 32)


@pytest.mark.gen_test(timeout=30)
async def test_upload_inputs_names_the_file_after_the_job_and_its_content(sim, config):
    comfy = ComfyUIClient(sim.url)
    prompt_id = str(uuid.uuid4())
    request = img2img_request(config, data_url(webp_lossless(32, 32), "image/png"))
    checked, uploaded = await upload_inputs(comfy, config, request, prompt_id)
    assert uploaded == [f"t2i/{prompt_id}_image.webp"] and checked.params["image"] == uploaded[0]
    # nothing to upload: the same request back
    plain = validate_generate({"prompt": "a fox"}, catalogue_of(config))
    assert await upload_inputs(comfy, config, plain, prompt_id) == (plain, [])
    raw = GenerateRequest(workflow=None, raw_workflow={"1": {"class_type": "EmptyImage", "inputs": {}}})
    assert await upload_inputs(comfy, config, raw, prompt_id) == (raw, [])
    assert len(sim.uploads) == 1


@pytest.mark.gen_test(timeout=30)
async def test_upload_failures(sim, config):
    comfy = ComfyUIClient(sim.url)
    with pytest.raises(UploadRejected, match="HTTP 400"):
        await comfy.upload_image("x.png", png(8, 8), "image/png", subfolder="../../etc")
    with pytest.raises(ValidationError) as info:  # not checked before: checked here
        await upload_inputs(comfy, config, GenerateRequest("img2img", {"prompt": "x", "image": data_url(GIF)}), "id")
    assert info.value.field == "image"
    await sim.stop()
    with pytest.raises(ComfyUIUnavailable):
        await upload_inputs(comfy, config, img2img_request(config, data_url(png(8, 8))), str(uuid.uuid4()))


# --- pruning ------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_uploaded_inputs_are_pruned_once_their_job_ended(tmp_path):
    clock = FakeClock()
    inputs = tmp_path / "comfy-input"
    (inputs / "t2i").mkdir(parents=True)
    store = JobStore(clock=clock)
    images = ImageStore(tmp_path / "images", clock=clock)
    images.ensure_directory()
    pruner = Pruner(store, images, RetentionConfig(), None, f"test-inputs-{uuid.uuid4()}", clock=clock,
                    comfy_input_dir=inputs)
    done = store.add(Job(str(uuid.uuid4()), created_at=clock()))
    store.update(done, phase=COMPLETED)
    running = store.add(Job(str(uuid.uuid4()), created_at=clock()))
    store.update(running, phase=STARTED)
    forgotten = str(uuid.uuid4())

    def put(name: str, age: float, folder: Path = inputs / "t2i") -> Path:
        path = folder / name
        path.write_bytes(b"x")
        os.utime(path, (clock() - age, clock() - age))
        return path

    gone = [put(f"{done.prompt_id}_image.png", 61), put(f"{done.prompt_id}_mask (1).webp", 61),
            put(f"{forgotten}_image.jpg", 61)]
    kept = [put(f"{done.prompt_id}_image.jpg", 30),             # within the grace
            put(f"{running.prompt_id}_image.png", 10 * 86400),  # its job still runs
            put(f"{forgotten}_image.gif", 10 * 86400),          # not a name t2i uploads
            put("example.png", 10 * 86400),
            put(f"{forgotten}_image.png", 10 * 86400, inputs)]  # not in input/t2i/
    report = await pruner.prune_once()
    assert report["comfyui_inputs_removed"] == 3 and report["errors"] == []
    assert not any(path.exists() for path in gone)
    assert all(path.exists() for path in kept)


# --- through the worker ---------------------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_a_bad_input_image_is_a_400_naming_the_field_before_comfyui(tmp_path):
    async with WorkerCluster(tmp_path, max_image_bytes=2000) as c:
        for image in (data_url(GIF), data_url(png(64, 64, noise=True)), "https://example.com/x.png"):
            reply = await c.generate({"workflow": "img2img", "prompt": "a fox", "image": image})
            assert reply.code == 400 and reply.json["field"] == "image", reply
        reply = await c.generate({"workflow": "img2img", "prompt": "a fox"})
        assert reply.code == 400 and reply.json["field"] == "image"
        assert not c.sim.uploads and not c.sim.submitted
        catalogue = (await call("GET", f"{c.url}/workflows")).json
        assert catalogue["workflows"]["img2img"]["params"]["image"]["max_bytes"] == 2000


@needs_upload_wiring
@pytest.mark.gen_test(timeout=30)
async def test_img2img_through_the_worker_keeps_the_input_size(tmp_path):
    async with WorkerCluster(tmp_path) as c:
        reply = await c.generate({"workflow": "img2img", "prompt": "a fox", "image": data_url(png(200, 136)),
                                  "steps": 2, "batch_size": 2, "denoise": 0.5})
        assert reply.code == 200, reply
        prompt_id = reply.json["prompt_id"]
        state = await c.wait(prompt_id)
        assert state["status"] == "completed", state
        assert c.sim.uploads == [{"name": f"{prompt_id}_image.png", "subfolder": "t2i", "type": "input"}]
        [(_, graph, _)] = [item for item in c.sim.submitted if item[0] == prompt_id]
        assert graph["10"]["inputs"]["image"] == f"t2i/{prompt_id}_image.png"
        result = (await call("GET", f"{c.url}/result/{prompt_id}")).json
        assert len(result["image_urls"]) == 2
        for url in result["image_urls"]:
            served = await call("GET", url)
            assert served.code == 200 and png_size(served.body) == (200, 136)
        # The journaled and fed job holds the file name, never the picture.
        feed = (await call("GET", f"{c.url}/jobs?since=0")).body
        assert b"base64" not in feed and b"base64" not in json.dumps(state).encode()


@needs_upload_wiring
@pytest.mark.gen_test(timeout=30)
async def test_the_worker_uses_the_name_comfyui_answered(tmp_path):
    async with WorkerCluster(tmp_path) as c:
        c.sim.rename_uploads = True
        prompt_id = await c.submit({"workflow": "img2img", "prompt": "a fox", "image": data_url(png(64, 48)),
                                    "steps": 2})
        state = await c.wait(prompt_id)
        assert state["status"] == "completed", state
        [(_, graph, _)] = [item for item in c.sim.submitted if item[0] == prompt_id]
        assert graph["10"]["inputs"]["image"] == f"t2i/{prompt_id}_image (1).png"


@needs_upload_wiring
@pytest.mark.gen_test(timeout=60)
async def test_the_body_cap_carries_an_image_of_max_image_bytes(tmp_path):
    data = png(300, 300, seed=7, noise=True)  # ~270 kB: noise does not compress
    async with WorkerCluster(tmp_path, max_image_bytes=len(data), max_image_pixels=300 * 300) as c:
        assert c.worker.config.max_body_bytes >= len(data_url(data)) + 1024
        prompt_id = await c.submit({"workflow": "img2img", "prompt": "a fox", "image": data_url(data), "steps": 1})
        assert (await c.wait(prompt_id))["status"] == "completed"
        too_big = await c.generate({"workflow": "img2img", "prompt": "a fox", "image": data_url(data + b"\x00" * 10)})
        assert too_big.code == 400 and too_big.json["field"] == "image"


@needs_upload_wiring
@pytest.mark.gen_test(timeout=30)
async def test_the_workers_uploads_are_pruned_with_their_job(tmp_path):
    async with WorkerCluster(tmp_path, sim={"input_dir": str(tmp_path / "comfy-input")},
                             comfyui={"input_dir": str(tmp_path / "comfy-input")}) as c:
        prompt_id = await c.submit({"workflow": "img2img", "prompt": "a fox", "image": data_url(png(32, 32)),
                                    "steps": 1})
        assert (await c.wait(prompt_id))["status"] == "completed"
        upload = tmp_path / "comfy-input" / "t2i" / f"{prompt_id}_image.png"
        assert upload.exists()
        os.utime(upload, (0, 0))  # past the grace
        report = await c.worker.pruner.prune_once()
        assert report["comfyui_inputs_removed"] == 1 and not upload.exists()
