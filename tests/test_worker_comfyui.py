"""Reading ComfyUI's shapes (t2i.comfyui), with bodies as recorded from ComfyUI 0.3.64."""

import json
import struct

from t2i.comfyui import (ImageRef, describe_rejection, error_sentence, images_of, outcome_of, parse_binary,
                         parse_queue, rejection_from)

PID = "ddfbed00-5cc2-45a6-b1af-59acf0c9a258"


def test_execution_error_sentence_strips_and_names_the_node():
    data = {"prompt_id": PID, "node_id": "1", "node_type": "SlowNoiseImage",
            "exception_message": "SlowNoiseImage asked to fail (fail=true) at step 3/5\n",
            "exception_type": "/opt/ComfyUI/custom_nodes/t2i_test_nodes.T2ITestFailure"}
    assert error_sentence(data) == "SlowNoiseImage failed: SlowNoiseImage asked to fail (fail=true) at step 3/5"
    assert error_sentence({"node_type": "KSampler", "exception_message": "CUDA out of memory\n"}) == \
        "KSampler failed: CUDA out of memory"


def test_outcome_of_history_entries():
    success = {"outputs": {"9": {"images": [{"filename": "t2i_00001_.png", "subfolder": "", "type": "output"}]},
                           "10": {"images": [{"filename": "prev.png", "subfolder": "", "type": "temp"}]}},
               "status": {"status_str": "success", "completed": True,
                          "messages": [["execution_start", {}], ["execution_cached", {"nodes": []}],
                                       ["execution_success", {}]]}}
    outcome = outcome_of(success)
    assert outcome.status == "success" and outcome.images == [ImageRef("t2i_00001_.png", "", "output")]
    failed = {"outputs": {}, "status": {"status_str": "error", "completed": False, "messages": [
        ["execution_start", {}],
        ["execution_error", {"node_type": "SlowNoiseImage", "exception_message": "asked to fail\n"}]]}}
    assert outcome_of(failed).status == "error" and outcome_of(failed).error == "SlowNoiseImage failed: asked to fail"
    interrupted = {"outputs": {}, "status": {"status_str": "error", "completed": False, "messages": [
        ["execution_start", {}], ["execution_interrupted", {"node_type": "SlowNoiseImage"}]]}}
    assert outcome_of(interrupted).status == "interrupted"


def test_images_of_an_executed_output_and_node_order():
    assert images_of({"images": [{"filename": "a.png", "subfolder": "s", "type": "output"}]}) == [
        ImageRef("a.png", "s", "output")]
    outputs = {"10": {"images": [{"filename": "b.png"}]}, "9": {"images": [{"filename": "a.png"}]},
               "11": {"text": ["hello"]}}
    assert [ref.filename for ref in images_of(outputs)] == ["a.png", "b.png"]
    assert images_of(None) == [] and images_of({}) == []


def test_queue_pending_is_sorted_by_number_not_heap_order():
    body = {"queue_running": [[18, "run", {}, {}, ["9"]]],
            "queue_pending": [[21, "c", {}, {}, []], [19, "a", {}, {}, []], [20, "b", {}, {}, []]]}
    queue = parse_queue(body)
    assert queue.running == ["run"] and queue.pending == ["a", "b", "c"]
    assert [queue.position(x) for x in ("a", "b", "c", "run", "zzz")] == [1, 2, 3, None, None]
    assert parse_queue({"queue_running": [], "queue_pending": [[-5, "front", {}, {}, []], [0, "x", {}, {}, []]]}
                       ).position("front") == 0


def test_rejections_as_recorded():
    unknown = {"error": {"type": "invalid_prompt", "message": "Cannot execute because node NoSuchNodeClass does not "
                                                              "exist.", "details": "Node ID '#1'", "extra_info": {}},
               "node_errors": {}}
    exc = rejection_from(400, json.dumps(unknown).encode())
    assert exc.message == ("ComfyUI rejected the workflow: Cannot execute because node NoSuchNodeClass does not "
                           "exist. (Node ID '#1')")
    assert exc.node_errors == {} and exc.comfyui_error["type"] == "invalid_prompt"
    out_of_range = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed "
                              "validation", "details": "", "extra_info": {}},
                    "node_errors": {"1": {"errors": [{"type": "value_bigger_than_max",
                                                      "message": "Value 100000 bigger than max of 4096",
                                                      "details": "width"}],
                                          "dependent_outputs": ["2"], "class_type": "SlowNoiseImage"}}}
    exc = rejection_from(400, json.dumps(out_of_range).encode())
    assert exc.message == ("ComfyUI rejected the workflow: Prompt outputs failed validation; node 1 "
                           "(SlowNoiseImage): Value 100000 bigger than max of 4096 (width)")
    assert exc.node_errors == out_of_range["node_errors"]
    text = rejection_from(500, b"500 Internal Server Error\n\nServer got itself in trouble")
    assert text.message == ("ComfyUI could not take the workflow (HTTP 500): 500 Internal Server Error Server got "
                            "itself in trouble")
    assert describe_rejection(None, {}) == "ComfyUI rejected the workflow: no reason given"


def test_binary_frames():
    meta = json.dumps({"node_id": "1", "prompt_id": PID, "display_node_id": "1", "parent_node_id": None,
                       "real_node_id": "1", "image_type": "image/jpeg"}).encode()
    jpeg = b"\xff\xd8\xff\xe0 jpeg bytes"
    frame = struct.pack(">II", 4, len(meta)) + meta + jpeg
    assert parse_binary(frame) == (4, PID, jpeg, "image/jpeg")
    assert parse_binary(struct.pack(">II", 1, 1) + jpeg) == (1, None, jpeg, "image/jpeg")
    assert parse_binary(struct.pack(">II", 1, 2) + b"png") == (1, None, b"png", "image/png")
    text = struct.pack(">II", 3, 1) + b"1" + b"step 1/4"
    assert parse_binary(text) is None
    assert parse_binary(b"\x00\x00") is None
    assert parse_binary(struct.pack(">II", 4, 50) + b"{not json") is None
    assert parse_binary(struct.pack(">II", 99, 0)) is None
