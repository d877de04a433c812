"""Any template parameter (issue 14): typed params in worker.yaml, choices from ComfyUI's object_info,
GET /workflows describing each, validation naming the bad field (worker and scheduler), batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.cluster import WorkerCluster, call, start_scheduler, start_sim, start_worker
from support.timing import until
from t2i.comfy_sim.nodes import SAMPLERS, SCHEDULERS
from t2i.config import ConfigError, load_worker_config
from t2i.validation import ValidationError, catalogue_of, validate_generate
from t2i.worker.workflow import build_workflow

ROOT = Path(__file__).resolve().parent.parent
TXT2IMG = ROOT / "t2i" / "workflows" / "txt2img.json"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def custom(tmp_path: Path, params: str, extra: str = "") -> Path:
    """worker.yaml with one workflow `mine` on the packaged txt2img template and these params."""
    return write(tmp_path / "w.yaml", f"listen: '127.0.0.1:1'\n{extra}default_workflow: mine\nworkflows:\n"
                                      f"  mine:\n    file: {TXT2IMG}\n    params:\n{params}")


def field_of(body, catalogue):
    with pytest.raises(ValidationError) as info:
        validate_generate(body, catalogue)
    return info.value.field, str(info.value)


# --- worker.yaml ----------------------------------------------------------------------

def test_types_written_inferred_and_defaults_from_the_template(tmp_path):
    config = load_worker_config(custom(tmp_path, (
        "      prompt: {node: '6', input: text}\n"
        "      guidance: {node: '3', input: cfg, min: 1, max: 20}\n"              # float, from the template's 7.0
        "      sampler: {node: '3', input: sampler_name, type: enum}\n"          # choices from ComfyUI
        "      noise_schedule: {node: '3', input: scheduler, choices: [normal, karras]}\n"  # enum by its choices
        "      label: {node: '9', input: filename_prefix, max_length: 20}\n"     # string, default "t2i"
        "      count: {node: '5', input: batch_size, max: 4}\n"                  # int, default 1
        "      strength: {node: '3', input: denoise, type: float, default: 0.5, min: 0, max: 1}\n")))
    params = {name: spec.to_json() for name, spec in config.workflows["mine"].params.items()}
    assert params == {
        "prompt": {"type": "string", "required": True, "max_length": 2000},
        "guidance": {"type": "number", "default": 7.0, "min": 1.0, "max": 20.0},
        "sampler": {"type": "enum", "default": "euler"},
        "noise_schedule": {"type": "enum", "default": "normal", "choices": ["normal", "karras"]},
        "label": {"type": "string", "default": "t2i", "max_length": 20},
        "count": {"type": "integer", "default": 1, "max": 4},
        "strength": {"type": "number", "default": 0.5, "min": 0.0, "max": 1.0},
    }


def test_the_built_in_templates_and_their_parameters(tmp_path):
    config = load_worker_config(write(tmp_path / "w.yaml", ""))
    assert config.default_workflow == "txt2img" and list(config.workflows) == ["txt2img", "img2img"]
    txt2img = {name: spec.to_json() for name, spec in config.workflows["txt2img"].params.items()}
    # today's six, unchanged
    assert txt2img["prompt"] == {"type": "string", "required": True, "max_length": 2000}
    assert txt2img["seed"] == {"type": "integer"}
    assert txt2img["steps"] == {"type": "integer", "default": 20, "min": 1, "max": 150}
    assert txt2img["width"] == {"type": "integer", "default": 512, "min": 64, "max": 2048}
    assert txt2img["cfg"] == {"type": "number", "default": 7.0, "min": 0.0, "max": 30.0}
    assert txt2img["sampler_name"] == {"type": "enum", "default": "euler"}
    assert txt2img["scheduler"] == {"type": "enum", "default": "normal"}
    assert txt2img["batch_size"] == {"type": "integer", "default": 1, "min": 1, "max": 8}
    img2img = config.workflows["img2img"].params
    assert set(img2img) == {"prompt", "negative_prompt", "seed", "steps", "cfg", "sampler_name", "scheduler",
                            "denoise", "batch_size", "image"}
    assert img2img["denoise"].to_json() == {"type": "number", "default": 0.75, "min": 0.0, "max": 1.0}
    template = config.workflows["img2img"].template
    assert [template[n]["class_type"] for n in ("4", "10", "11", "12", "3", "8", "9")] == [
        "CheckpointLoaderSimple", "LoadImage", "VAEEncode", "RepeatLatentBatch", "KSampler", "VAEDecode",
        "SaveImage"]
    # a `workflows` entry named like a built-in, without `file`, is that built-in
    config = load_worker_config(write(tmp_path / "w.yaml", "workflows:\n  img2img: {}\ndefault_workflow: img2img\n"))
    assert list(config.workflows) == ["img2img"] and "image" in config.workflows["img2img"].params


@pytest.mark.parametrize("params, key, problem", [
    ("      x: {node: '3', input: cfg, type: decimal}\n", "type", "must be one of int, float, string, bool"),
    ("      steps: {node: '3', input: steps, type: float}\n", "type", "`steps` is always int"),
    ("      workflow: {node: '3', input: cfg}\n", "workflow", "is a request field of its own"),
    ("      Bad-Name: {node: '3', input: cfg}\n", "Bad-Name", "lower-case letters, digits and _"),
    ("      a: {node: '3', input: cfg}\n      b: {node: '3', input: cfg}\n", "input", "already filled by `a`"),
    ("      a: {node: '3', input: model}\n", "type", "is required here"),
    ("      a: {node: '3', input: cfg, default: 50, max: 30}\n", "default", "is greater than max 30"),
    ("      a: {node: '3', input: cfg, default: yes}\n", "default", "must be a number"),
    ("      a: {node: '3', input: sampler_name, choices: [euler, heun], default: lms}\n", "default",
     "is not one of the choices"),
    ("      a: {node: '3', input: sampler_name, choices: []}\n", "choices", "non-empty list of strings"),
    ("      a: {node: '3', input: seed, max_length: 5}\n", "max_length", "unknown key"),
    ("      a: {node: '3', input: cfg, type: image, default: x.png}\n", "default", "unknown key"),
])
def test_parameter_mistakes_name_the_key(tmp_path, params, key, problem):
    with pytest.raises(ConfigError) as info:
        load_worker_config(custom(tmp_path, params))
    assert info.value.key.endswith(key) and problem in info.value.problem, str(info.value)


def test_max_body_bytes_makes_room_for_the_images(tmp_path):
    config = load_worker_config(write(tmp_path / "w.yaml", "max_image_bytes: 3000000\n"))
    assert config.max_body_bytes == 1_048_576 + 4_000_000  # 1 MiB + the base64 of one image
    assert config.workflows["img2img"].params["image"].max_bytes == 3_000_000
    # a cap written by hand is kept...
    assert load_worker_config(write(tmp_path / "w.yaml", "max_body_bytes: 2048\n")).max_body_bytes == 2048
    # ...unless it cannot carry the image size also written
    with pytest.raises(ConfigError, match="max_body_bytes: is too small for 1 image"):
        load_worker_config(write(tmp_path / "w.yaml", "max_body_bytes: 2000000\nmax_image_bytes: 3000000\n"))
    # no image parameter: today's 1 MiB
    only_text = custom(tmp_path, "      prompt: {node: '6', input: text}\n")
    assert load_worker_config(only_text).max_body_bytes == 1_048_576


# --- validation, by type ----------------------------------------------------------------

@pytest.fixture
def catalogue(tmp_path):
    config = load_worker_config(custom(tmp_path, (
        "      prompt: {node: '6', input: text}\n"
        "      cfg: {node: '3', input: cfg, min: 0, max: 30}\n"
        "      sampler_name: {node: '3', input: sampler_name, choices: [euler, heun, dpmpp_2m]}\n"
        "      scheduler: {node: '3', input: scheduler, type: enum}\n"
        "      batch_size: {node: '5', input: batch_size, min: 1, max: 8}\n"
        "      tiled: {node: '9', input: filename_prefix, type: bool, default: false}\n"
        "      label: {node: '7', input: text, max_length: 5}\n")))
    return json.loads(json.dumps(catalogue_of(config)))  # as the scheduler gets it


def test_typed_values_are_accepted(catalogue):
    request = validate_generate({"prompt": "a fox", "cfg": 4, "sampler_name": "heun", "scheduler": "karras",
                                 "batch_size": 8, "tiled": True, "label": "abc"}, catalogue)
    assert request.params == {"prompt": "a fox", "cfg": 4, "sampler_name": "heun", "scheduler": "karras",
                              "batch_size": 8, "tiled": True, "label": "abc"}
    assert validate_generate({"prompt": "a fox", "cfg": 7.25}, catalogue).params["cfg"] == 7.25
    defaults = validate_generate({"prompt": "a fox"}, catalogue).params
    assert defaults["cfg"] == 7.0 and defaults["tiled"] is False and defaults["scheduler"] == "normal"


@pytest.mark.parametrize("body, field, message", [
    ({"cfg": "7"}, "cfg", "`cfg` must be a number."),
    ({"cfg": True}, "cfg", "`cfg` must be a number."),
    ({"cfg": 30.5}, "cfg", "`cfg` must be at most 30.0."),
    ({"cfg": -0.1}, "cfg", "`cfg` must be at least 0.0."),
    ({"cfg": float("nan")}, "cfg", "`cfg` must be a finite number."),
    ({"sampler_name": "lms"}, "sampler_name", "`sampler_name` must be one of: euler, heun, dpmpp_2m."),
    ({"sampler_name": 1}, "sampler_name", "`sampler_name` must be one of"),
    ({"scheduler": 3}, "scheduler", "`scheduler` must be a string naming one of its choices."),
    ({"batch_size": 0}, "batch_size", "`batch_size` must be at least 1."),
    ({"batch_size": 9}, "batch_size", "`batch_size` must be at most 8."),
    ({"batch_size": 2.5}, "batch_size", "`batch_size` must be an integer."),
    ({"tiled": "yes"}, "tiled", "`tiled` must be true or false."),
    ({"tiled": 1}, "tiled", "`tiled` must be true or false."),
    ({"label": "toolong"}, "label", "`label` is longer than 5 characters."),
    ({"denoise": 0.5}, "denoise", "Unknown field 'denoise'"),
])
def test_bad_values_name_the_field(catalogue, body, field, message):
    got_field, got_message = field_of({"prompt": "a fox", **body}, catalogue)
    assert got_field == field and got_message.startswith(message), got_message


def test_a_parameter_of_another_workflow_is_named(tmp_path):
    config = load_worker_config(write(tmp_path / "w.yaml", ""))
    catalogue = catalogue_of(config)
    assert field_of({"prompt": "a fox", "denoise": 0.5}, catalogue) == (
        "denoise", "Workflow 'txt2img' has no parameter 'denoise'.")
    assert field_of({"prompt": "a fox", "workflow": "img2img", "width": 512}, catalogue)[0] == "width"
    # the scheduler before any worker reported: any field passes to the worker, today's six are type-checked
    assert validate_generate({"prompt": "x", "cfg": "anything"}, None).params == {"prompt": "x"}


def test_build_workflow_puts_each_value_in_its_input(tmp_path):
    config = load_worker_config(write(tmp_path / "w.yaml", ""))
    request = validate_generate({"prompt": "a fox", "cfg": 3.5, "sampler_name": "heun", "scheduler": "karras",
                                 "batch_size": 3, "seed": 1}, catalogue_of(config))
    workflow = build_workflow(config, request, "0b6f3a52-2a53-4c54-9bb6-8a0c7b6a7f11")
    assert {k: workflow["3"]["inputs"][k] for k in ("cfg", "sampler_name", "scheduler", "seed")} == {
        "cfg": 3.5, "sampler_name": "heun", "scheduler": "karras", "seed": 1}
    assert workflow["5"]["inputs"]["batch_size"] == 3


def test_each_job_gets_its_own_workflow_and_the_template_stays_as_read(tmp_path):
    config = load_worker_config(write(tmp_path / "w.yaml", ""))
    template = config.workflows["txt2img"].template
    pristine = json.loads(json.dumps(template))
    first = build_workflow(config, validate_generate({"prompt": "a fox", "seed": 1}, catalogue_of(config)), "job-1")
    second = build_workflow(config, validate_generate({"prompt": "an owl", "seed": 2}, catalogue_of(config)), "job-2")
    assert first["6"]["inputs"]["text"] == "a fox" and second["6"]["inputs"]["text"] == "an owl"
    assert first["3"]["inputs"]["seed"] == 1 and second["3"]["inputs"]["seed"] == 2
    assert first["3"]["inputs"] is not second["3"]["inputs"]
    assert template == pristine  # filled-in values never leak back into the template (or the next job)


# --- choices from ComfyUI's object_info ----------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_choices_come_from_object_info_and_bad_values_never_reach_comfyui(tmp_path):
    ckpt = {"ckpt": {"node": "4", "input": "ckpt_name", "type": "enum"}}
    workflows = {"txt2img": {"file": str(TXT2IMG), "params": {
        "prompt": {"node": "6", "input": "text"},
        "sampler_name": {"node": "3", "input": "sampler_name", "type": "enum", "default": "euler"},
        "scheduler": {"node": "3", "input": "scheduler", "type": "enum", "choices": ["normal", "karras"]},
        "steps": {"node": "3", "input": "steps", "default": 2, "min": 1, "max": 10},
        **ckpt}}}
    async with WorkerCluster(tmp_path, sim={"checkpoints": ("v1-5-pruned-emaonly.safetensors", "dreamy.ckpt")},
                             workflows=workflows) as c:
        await until(lambda: c.worker.runner.readiness.checked_at, what="readiness checked")
        params = (await call("GET", f"{c.url}/workflows")).json["workflows"]["txt2img"]["params"]
        assert params["sampler_name"] == {"type": "enum", "default": "euler", "choices": SAMPLERS}
        assert params["ckpt"] == {"type": "enum", "default": "v1-5-pruned-emaonly.safetensors",
                                  "choices": ["v1-5-pruned-emaonly.safetensors", "dreamy.ckpt"]}
        assert params["scheduler"]["choices"] == ["normal", "karras"]  # written ones win
        for body, field in (({"sampler_name": "warp_drive"}, "sampler_name"), ({"ckpt": "sd3.safetensors"}, "ckpt"),
                            ({"scheduler": "exponential"}, "scheduler"), ({"sampler_name": 5}, "sampler_name")):
            reply = await c.generate({"prompt": "a fox", **body})
            assert reply.code == 400 and reply.json["field"] == field, reply
            assert field in reply.json["error"]
        assert not c.sim.submitted
        # a bad value is the client's mistake: the workflow stays ready
        assert (await call("GET", f"{c.url}/workflows")).json["workflows"]["txt2img"]["ready"] is True
        prompt_id = await c.submit({"prompt": "a fox", "sampler_name": "dpmpp_2m", "ckpt": "dreamy.ckpt"})
        assert (await c.wait(prompt_id))["status"] == "completed"
        [(_, graph, _)] = c.sim.submitted
        assert graph["3"]["inputs"]["sampler_name"] == "dpmpp_2m" and graph["4"]["inputs"]["ckpt_name"] == "dreamy.ckpt"


@pytest.mark.gen_test(timeout=40)
async def test_the_scheduler_checks_the_workers_choices_before_placing(tmp_path):
    sim = await start_sim(step_time=0.01)
    worker = await start_worker(tmp_path / "w", sim.url)
    scheduler = await start_scheduler(tmp_path / "s", [worker])
    try:
        await until(lambda: worker.runner.readiness.checked_at, what="readiness checked")

        async def listed():
            reply = await call("GET", f"{scheduler.url}/workflows")
            params = (reply.json or {}).get("workflows", {}).get("txt2img", {}).get("params", {})
            return params if "choices" in params.get("scheduler", {}) else None

        params = await until(listed, what="the scheduler's catalogue with choices")
        assert params["scheduler"]["choices"] == SCHEDULERS and params["sampler_name"]["choices"] == SAMPLERS
        assert params["cfg"]["type"] == "number" and params["batch_size"]["max"] == 8
        for body, field in (({"scheduler": "weekly"}, "scheduler"), ({"cfg": "high"}, "cfg"),
                            ({"batch_size": 99}, "batch_size"), ({"colour": "red"}, "colour")):
            reply = await call("POST", f"{scheduler.url}/generate", {"prompt": "a fox", **body})
            assert reply.code == 400 and reply.json["field"] == field, reply
        assert not sim.submitted
    finally:
        await scheduler.stop()
        await worker.stop()
        await sim.stop()


# --- batches ------------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_a_batch_of_three_gives_three_images_all_served(tmp_path):
    async with WorkerCluster(tmp_path) as c:
        prompt_id = await c.submit({"prompt": "three foxes", "batch_size": 3, "steps": 2, "width": 64, "height": 64})
        state = await c.wait(prompt_id)
        assert state["status"] == "completed", state
        [(_, graph, _)] = c.sim.submitted
        assert graph["5"]["inputs"]["batch_size"] == 3
        saved = c.sim.history[prompt_id]["outputs"]["9"]["images"]
        assert len(saved) == 3 and len({image["filename"] for image in saved}) == 3
        assert all((Path(c.sim.output_dir) / image["filename"]).is_file() for image in saved)
        result = await call("GET", f"{c.url}/result/{prompt_id}")
        assert result.code == 200 and len(result.json["image_urls"]) == 3
        assert result.json["image_url"] == result.json["image_urls"][0]
        bodies = []
        for url in result.json["image_urls"]:
            served = await call("GET", url)
            assert served.code == 200 and served.headers["Content-Type"] == "image/png"
            bodies.append(served.body)
        assert len(set(bodies)) == 3  # one seed each: three different pictures
        too_many = await c.generate({"prompt": "nine foxes", "batch_size": 9})
        assert too_many.code == 400 and too_many.json["field"] == "batch_size"
