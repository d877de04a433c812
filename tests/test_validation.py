"""The /generate validator the worker and the scheduler share, and template filling."""

import json

import pytest

from t2i.config import load_worker_config
from t2i.validation import GenerateRequest, ValidationError, catalogue_of, validate_generate
from t2i.worker.workflow import build_workflow, output_prefix, set_output_prefix

PID = "0b6f3a52-2a53-4c54-9bb6-8a0c7b6a7f11"


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "worker.yaml"
    path.write_text("listen: '127.0.0.1:1'\n")
    return load_worker_config(path)


@pytest.fixture
def catalogue(config):
    return json.loads(json.dumps(catalogue_of(config)))  # as the scheduler gets it over HTTP


def field_of(body, catalogue):
    with pytest.raises(ValidationError) as info:
        validate_generate(body, catalogue)
    return info.value.field, str(info.value)


def test_defaults_and_random_seed(catalogue):
    request = validate_generate({"prompt": "a fox"}, catalogue)
    assert request.workflow == "txt2img" and request.raw_workflow is None
    assert request.params["steps"] == 20 and request.params["width"] == 512
    assert request.params["negative_prompt"] == ""
    assert 0 <= request.params["seed"] < 2**32
    seeds = {validate_generate({"prompt": "x"}, catalogue).params["seed"] for _ in range(5)}
    assert len(seeds) > 1


def test_given_values_are_kept(catalogue):
    body = {"prompt": "p", "negative_prompt": "n", "seed": 42, "steps": 7, "width": 64, "height": 2048,
            "cfg": 4.5, "sampler_name": "dpmpp_2m", "scheduler": "karras", "batch_size": 2, "workflow": "txt2img"}
    assert validate_generate(body, catalogue).params == {k: v for k, v in body.items() if k != "workflow"}


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "colour": "red"}, "colour"),
    ({}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x" * 2001}, "prompt"),
    ({"prompt": "a\x00b"}, "prompt"),
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "steps": 151}, "steps"),
    ({"prompt": "x", "steps": "20"}, "steps"),
    ({"prompt": "x", "steps": 20.0}, "steps"),
    ({"prompt": "x", "steps": True}, "steps"),
    ({"prompt": "x", "width": 63}, "width"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "seed": 2**53}, "seed"),
    ({"prompt": "x", "workflow": "nope"}, "workflow"),
    ({"prompt": "x", "workflow": 3}, "workflow"),
    ({"workflow": {"1": {"class_type": "SaveImage", "inputs": {}}}}, "workflow"),
])
def test_bad_fields_are_named(catalogue, body, field):
    assert field_of(body, catalogue)[0] == field


def test_body_must_be_an_object(catalogue):
    assert field_of(["prompt"], catalogue) == (None, "The request body must be a JSON object.")


def test_raw_workflows_only_when_allowed(catalogue):
    raw = {"1": {"class_type": "EmptyImage", "inputs": {}}, "2": {"class_type": "SaveImage", "inputs": {}}}
    catalogue["allow_raw_workflows"] = True
    request = validate_generate({"workflow": raw}, catalogue)
    assert request.raw_workflow == raw and request.workflow is None
    assert field_of({"workflow": raw, "prompt": "x"}, catalogue)[0] == "prompt"
    assert field_of({"workflow": {"1": "not a node"}}, catalogue)[0] == "workflow"


def test_without_a_catalogue_only_types_are_checked():
    assert validate_generate({"prompt": "x", "steps": 999}, None).params == {"prompt": "x", "steps": 999}
    with pytest.raises(ValidationError):
        validate_generate({"prompt": "x", "steps": "many"}, None)


def test_unmapped_parameter_is_rejected(tmp_path):
    (tmp_path / "wf.json").write_text(json.dumps({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}))
    (tmp_path / "w.yaml").write_text(
        "workflows:\n  blank:\n    file: wf.json\n    params:\n      width: {node: '1', input: width, default: 8}\n"
        "default_workflow: blank\n")
    catalogue = catalogue_of(load_worker_config(tmp_path / "w.yaml"))
    assert validate_generate({}, catalogue).params == {"width": 8}
    assert field_of({"prompt": "x"}, catalogue)[0] == "prompt"


def test_build_workflow_fills_a_copy_and_sets_the_output_prefix(config):
    request = validate_generate({"prompt": "a fox", "seed": 7, "steps": 3}, catalogue_of(config))
    workflow = build_workflow(config, request, PID)
    assert workflow["6"]["inputs"]["text"] == "a fox"
    assert workflow["3"]["inputs"]["seed"] == 7 and workflow["3"]["inputs"]["steps"] == 3
    assert workflow["9"]["inputs"]["filename_prefix"] == output_prefix(PID) == f"t2i_{PID}"
    template = config.workflows["txt2img"].template
    assert template["6"]["inputs"]["text"] == "" and template["9"]["inputs"]["filename_prefix"] == "t2i"


def test_raw_workflow_gets_the_prefix_on_every_save_node_but_not_on_links(config):
    raw = {"1": {"class_type": "EmptyImage", "inputs": {}},
           "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "mine", "images": ["1", 0]}},
           "3": {"class_type": "SaveImage", "inputs": {"filename_prefix": ["4", 0], "images": ["1", 0]}},
           "4": {"class_type": "PrimitiveString", "inputs": {"value": "x"}}}
    workflow = build_workflow(config, GenerateRequest(workflow=None, raw_workflow=raw), PID)
    assert workflow["2"]["inputs"]["filename_prefix"] == f"t2i_{PID}"
    assert workflow["3"]["inputs"]["filename_prefix"] == ["4", 0]
    assert raw["2"]["inputs"]["filename_prefix"] == "mine"
    assert set_output_prefix({"1": {"class_type": "X"}}, "p") == 0
