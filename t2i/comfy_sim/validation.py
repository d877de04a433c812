"""POST /prompt validation, following ComfyUI 0.3.64's execution.validate_prompt / validate_inputs.

The same Python operations as ComfyUI's are applied to the submitted JSON, so
malformed prompts fail the same way: a TypeError escaping from here becomes the
500 text/plain answer, a KeyError on a dangling link becomes
``exception_during_validation`` with ``details`` "'99'", and so on. Literal
inputs are converted in place (``int``/``float``/``str``/``bool``), as ComfyUI
does before queueing the prompt.
"""

from __future__ import annotations

from typing import Any

from .nodes import NODE_CLASSES

VALIDATE_PROMPT_FRAME = ('  File "/opt/ComfyUI/execution.py", line 1010, in validate_prompt\n'
                         '    m = await validate_inputs(prompt_id, prompt, o, validated)\n'
                         '        ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n')
VALIDATE_INPUTS_FRAME = ('  File "/opt/ComfyUI/execution.py", line 788, in validate_inputs\n'
                         "    o_class_type = prompt[o_id]['class_type']\n"
                         '                   ~~~~~~^^^^^^\n')
INNER_FRAME = ('  File "/opt/ComfyUI/execution.py", line 797, in validate_inputs\n'
               '    r = await validate_inputs(prompt_id, prompt, o_id, validated, visiting)\n'
               '        ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n')


def full_type_name(klass: type) -> str:
    module = klass.__module__
    return klass.__qualname__ if module == "builtins" else f"{module}.{klass.__qualname__}"


def validate_node_input(received_type: Any, input_type: Any) -> bool:
    if not received_type != input_type:
        return True
    if not isinstance(received_type, str) or not isinstance(input_type, str):
        return False
    received = {t.strip() for t in received_type.split(",")}
    wanted = {t.strip() for t in input_type.split(",")}
    if "*" in received or "*" in wanted:
        return True
    return len(received & wanted) > 0


def _input_info(types: dict, name: str) -> tuple[Any, str | None, dict | None]:
    for category in ("required", "optional", "hidden"):
        if category in types and name in types[category]:
            info = types[category][name]
            if isinstance(info, str):  # hidden inputs are bare strings
                return info, category, {}
            return info[0], category, (info[1] if len(info) > 1 else {})
    return None, None, None


def validate_inputs(sim, prompt: dict, unique_id: str, validated: dict, visiting: list) -> tuple:
    if unique_id in validated:
        return validated[unique_id]
    if unique_id in visiting:  # a cycle: recorded as ComfyUI's newer versions do, rather than recursing forever
        path = visiting[visiting.index(unique_id):] + [unique_id]
        nodes = list(dict.fromkeys(path))
        details = " -> ".join(f"{n} ({prompt[n]['class_type']})" for n in path)
        for n in nodes:
            validated[n] = (False, [{"type": "dependency_cycle", "message": "Dependency cycle detected",
                                     "details": details, "extra_info": {"node_id": n, "cycle_nodes": nodes}}], n)
        return validated[unique_id]

    inputs = prompt[unique_id]["inputs"]
    class_type = prompt[unique_id]["class_type"]
    cls = NODE_CLASSES[class_type]
    types = cls.input_types(sim)
    errors: list[dict] = []
    valid = True
    required = types.get("required", {})
    names = list(required) + [n for n in types.get("optional", {}) if n not in required]

    validate_args = cls.validate_args  # VALIDATE_INPUTS' own inputs skip the min/max/list checks
    for x in names:
        input_type, category, extra = _input_info(types, x)
        if x not in inputs:
            if category == "required":
                errors.append({"type": "required_input_missing", "message": "Required input is missing",
                               "details": f"{x}", "extra_info": {"input_name": x}})
            continue
        val = inputs[x]
        info = [input_type, extra]
        if isinstance(val, list):
            if len(val) != 2:
                errors.append({"type": "bad_linked_input",
                               "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                               "details": f"{x}",
                               "extra_info": {"input_name": x, "input_config": info, "received_value": val}})
                continue
            o_id = val[0]
            o_class_type = prompt[o_id]["class_type"]
            received_type = NODE_CLASSES[o_class_type].return_types[val[1]]
            if not validate_node_input(received_type, input_type):
                errors.append({"type": "return_type_mismatch", "message": "Return type mismatch between linked nodes",
                               "details": f"{x}, received_type({received_type}) mismatch input_type({input_type})",
                               "extra_info": {"input_name": x, "input_config": info, "received_type": received_type,
                                              "linked_node": val}})
                continue
            try:
                visiting.append(unique_id)
                try:
                    r = validate_inputs(sim, prompt, o_id, validated, visiting)
                finally:
                    visiting.pop()
                if r[0] is False:
                    valid = False
                    continue
            except Exception as ex:
                valid = False
                validated[o_id] = (False, [{
                    "type": "exception_during_inner_validation", "message": "Exception when validating inner node",
                    "details": str(ex),
                    "extra_info": {"input_name": x, "input_config": info, "exception_message": str(ex),
                                   "exception_type": full_type_name(type(ex)),
                                   "traceback": [INNER_FRAME, VALIDATE_INPUTS_FRAME], "linked_node": val},
                }], o_id)
                continue
        else:
            try:
                if isinstance(val, dict) and "__value__" in val:
                    val = val["__value__"]
                    inputs[x] = val
                if input_type == "INT":
                    val = int(val)
                    inputs[x] = val
                if input_type == "FLOAT":
                    val = float(val)
                    inputs[x] = val
                if input_type == "STRING":
                    val = str(val)
                    inputs[x] = val
                if input_type == "BOOLEAN":
                    val = bool(val)
                    inputs[x] = val
            except Exception as ex:
                errors.append({"type": "invalid_input_type",
                               "message": f"Failed to convert an input value to a {input_type} value",
                               "details": f"{x}, {val}, {ex}",
                               "extra_info": {"input_name": x, "input_config": info, "received_value": val,
                                              "exception_message": str(ex)}})
                continue
            if x in validate_args:
                continue
            if "min" in extra and val < extra["min"]:
                errors.append({"type": "value_smaller_than_min",
                               "message": "Value {} smaller than min of {}".format(val, extra["min"]),
                               "details": f"{x}",
                               "extra_info": {"input_name": x, "input_config": info, "received_value": val}})
                continue
            if "max" in extra and val > extra["max"]:
                errors.append({"type": "value_bigger_than_max",
                               "message": "Value {} bigger than max of {}".format(val, extra["max"]),
                               "details": f"{x}",
                               "extra_info": {"input_name": x, "input_config": info, "received_value": val}})
                continue
            if isinstance(input_type, list) and val not in input_type:
                config, listing = info, str(input_type)
                if len(input_type) > 20:
                    config, listing = None, f"(list of length {len(input_type)})"
                errors.append({"type": "value_not_in_list", "message": "Value not in list",
                               "details": f"{x}: '{val}' not in {listing}",
                               "extra_info": {"input_name": x, "input_config": config, "received_value": val}})
                continue

    if validate_args:
        given = {x: inputs[x] for x in validate_args if x in inputs and not isinstance(inputs[x], list)}
        ret = cls.validate(sim, **given) if given else True
        if ret is not True:
            for x in given:
                details = f"{x}" if ret is False else f"{x} - {ret}"
                errors.append({"type": "custom_validation_failed", "message": "Custom validation failed for node",
                               "details": details, "extra_info": {"input_name": x}})

    result = (False, errors, unique_id) if errors or valid is not True else (True, [], unique_id)
    validated[unique_id] = result
    return result


def validate_prompt(sim, prompt: Any, partial_targets: list | None) -> tuple[bool, dict | None, list, dict]:
    """(ok, error, outputs to execute, node_errors), exactly as ComfyUI's validate_prompt returns them."""
    outputs = []
    for x in prompt:
        if "class_type" not in prompt[x]:
            return False, {"type": "invalid_prompt",
                           "message": "Cannot execute because a node is missing the class_type property.",
                           "details": f"Node ID '#{x}'", "extra_info": {}}, [], {}
        class_type = prompt[x]["class_type"]
        cls = NODE_CLASSES.get(class_type)
        if cls is None:
            return False, {"type": "invalid_prompt",
                           "message": f"Cannot execute because node {class_type} does not exist.",
                           "details": f"Node ID '#{x}'", "extra_info": {}}, [], {}
        if cls.output_node and (partial_targets is None or x in partial_targets):
            outputs.append(x)
    if not outputs:
        return False, {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "",
                       "extra_info": {}}, [], {}

    good_outputs, errors, node_errors, validated = [], [], {}, {}
    for o in outputs:
        try:
            valid, reasons, _ = validate_inputs(sim, prompt, o, validated, [])
        except Exception as ex:
            valid = False
            reasons = [{"type": "exception_during_validation", "message": "Exception when validating node",
                        "details": str(ex),
                        "extra_info": {"exception_type": full_type_name(type(ex)),
                                       "traceback": [VALIDATE_PROMPT_FRAME, VALIDATE_INPUTS_FRAME]}}]
            validated[o] = (False, reasons, o)
        if valid is True:
            good_outputs.append(o)
            continue
        errors.append((o, reasons))
        for node_id, result in validated.items():
            if result[0] is not True and len(result[1]) > 0:
                if node_id not in node_errors:
                    node_errors[node_id] = {"errors": result[1], "dependent_outputs": [],
                                            "class_type": prompt[node_id]["class_type"]}
                node_errors[node_id]["dependent_outputs"].append(o)

    if not good_outputs:
        details = "\n".join(f"{e['message']}: {e['details']}" for _, reasons in errors for e in reasons)
        return False, {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                       "details": details, "extra_info": {}}, [], node_errors
    return True, None, good_outputs, node_errors
