"""The prompt queue and executor of the ComfyUI test double (ComfyUI 0.3.64 semantics).

One coroutine runs the queue, lowest ``number`` first. A prompt runs as in
ComfyUI's ``PromptExecutor.execute_async``: execution_start, execution_cached,
then the nodes in ``ExecutionList`` order, each with its progress_state /
executing / progress / executed messages, then execution_success or
execution_error / execution_interrupted; the history entry is written before
the final ``status`` and ``executing {node: null}``.

The output cache is keyed by each node's input signature (class, literal inputs,
upstream signatures, and the node id for nodes with a UNIQUE_ID input). Entries
whose signature is not in the new prompt are dropped when it starts, so only the
previous prompt's nodes stay cached.
"""

from __future__ import annotations

import asyncio
import copy
import heapq
import itertools
import json
import logging
import struct
import time
from typing import Any, NamedTuple

from .graph import ExecutionList, Signatures, is_link
from .nodes import NODE_CLASSES, NodeFailure

log = logging.getLogger("t2i.comfy_sim")

MAXIMUM_HISTORY_SIZE = 10000
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")


class Interrupted(Exception):
    pass


class CacheEntry(NamedTuple):
    ui: dict | None
    outputs: tuple


class ProgressState:
    """comfy_execution/progress.py: the per-prompt node registry behind ``progress_state``."""

    def __init__(self, executor: "Executor", prompt_id: str):
        self.executor, self.prompt_id, self.nodes = executor, prompt_id, {}

    def _entry(self, node_id: str) -> dict:
        return self.nodes.setdefault(node_id, {"value": 0, "max": 1, "state": "pending"})

    def start(self, node_id: str) -> None:
        self.nodes[node_id] = {"value": 0.0, "max": 1.0, "state": "running"}
        self._send()

    def update(self, node_id: str, value, maximum) -> None:
        entry = self._entry(node_id)
        entry.update(value=value, max=maximum, state="running")
        self._send()

    def finish(self, node_id: str) -> None:
        entry = self._entry(node_id)
        entry.update(state="finished", value=entry["max"])
        self._send()

    def _send(self) -> None:
        nodes = {
            node_id: {"value": e["value"], "max": e["max"], "state": e["state"], "node_id": node_id,
                      "prompt_id": self.prompt_id, "display_node_id": node_id, "parent_node_id": None,
                      "real_node_id": node_id}
            for node_id, e in self.nodes.items() if e["state"] != "pending"
        }
        self.executor.send("progress_state", {"prompt_id": self.prompt_id, "nodes": nodes},
                           self.executor.client_id)


class NodeContext:
    """What a running node may do: wait a step, report progress and text, work off the loop."""

    def __init__(self, executor: "Executor", node_id: str, class_type: str, progress: ProgressState, prompt: dict,
                 extra_data: dict):
        self.executor, self.node_id, self.class_type = executor, node_id, class_type
        self._progress, self.prompt, self.extra_data = progress, prompt, extra_data
        self.sim = executor.sim
        self.step_time = self.sim.step_time
        self.previews_enabled = self.sim.previews
        self.output_dir = self.sim.output_dir
        self.alive = executor.is_alive
        self.failure = executor.take_failure(class_type)
        self.steps_done = 0
        self._late = 0.0   # how much later than asked the last sleep ended

    async def step(self, seconds: float) -> None:
        """One unit of work: freeze while the sim is stalled, then sleep ``seconds``. A timer firing
        late (a busy loop, a loaded box) is taken off the next step's sleep, so a run of steps lasts
        what ``step_time`` says, as on a GPU, instead of ~5 % more; the work between steps
        (progress messages, previews) still adds its own time."""
        await self.executor.wait_unstalled()
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        loop = asyncio.get_running_loop()
        asked = max(0.0, seconds - self._late)
        started = loop.time()
        await asyncio.sleep(asked)
        self._late = min(seconds, max(0.0, loop.time() - started - asked))

    async def blocking(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def check_failure(self) -> None:
        failure = self.failure
        if failure is not None and self.steps_done >= failure["after_steps"]:
            self.failure = None
            cls = NODE_CLASSES[self.class_type]
            raise NodeFailure(failure["message"], failure["exception_type"], cls.frames())

    def progress_text(self, text: str) -> None:
        node = self.node_id.encode("utf-8")
        self.executor.send_binary(3, struct.pack(">I", len(node)) + node + text.encode("utf-8"), None)

    async def progress(self, value, maximum, preview: bytes | None = None) -> None:
        """ComfyUI's ProgressBar hook: interrupt check, progress_state (+type 4), progress (+type 1)."""
        await self.executor.wait_unstalled()  # a stall set during the step holds its report back too
        self.executor.check_interrupt()
        self.check_failure()
        self.steps_done = value
        ex = self.executor
        self._progress.update(self.node_id, value, maximum)
        metadata = preview is not None and ex.sim.supports_preview_metadata(ex.client_id)
        if metadata:
            meta = json.dumps({"node_id": self.node_id, "prompt_id": ex.prompt_id, "display_node_id": self.node_id,
                               "parent_node_id": None, "real_node_id": self.node_id,
                               "image_type": "image/jpeg"}).encode("utf-8")
            ex.send_binary(4, struct.pack(">I", len(meta)) + meta + preview, ex.client_id)
        ex.send("progress", {"value": value, "max": maximum, "prompt_id": ex.prompt_id, "node": self.node_id},
                ex.client_id)
        if preview is not None and not metadata:
            ex.send_binary(1, struct.pack(">I", 1) + preview, ex.client_id)


def format_value(x: Any) -> Any:
    if x is None or isinstance(x, (int, float, bool, str)):
        return x
    return str(x)


class Executor:
    def __init__(self, sim):
        self.sim = sim
        self.heap: list = []
        self.running: dict[int, list] = {}
        self.history: dict[str, dict] = {}
        self.number = 0
        self.task_counter = 0
        self._seq = itertools.count()
        self.cache: dict[str, CacheEntry] = {}
        self.flush_cache = False
        self.interrupted = False
        self.client_id: str | None = None
        self.prompt_id: str | None = None
        self.last_node_id: str | None = None
        self.alive = True
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None

    # -- lifecycle
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def kill(self) -> None:
        self.alive = False
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None

    def is_alive(self) -> bool:
        return self.alive

    # -- messages
    def send(self, event: str, data: dict, sid: str | None) -> None:
        if self.alive:
            self.sim.send_json(event, data, sid)

    def send_binary(self, event_type: int, payload: bytes, sid: str | None) -> None:
        if self.alive:
            self.sim.send_bytes(event_type, payload, sid)

    # -- queue
    def tasks_remaining(self) -> int:
        return len(self.heap) + len(self.running)

    def put(self, item: tuple) -> None:
        heapq.heappush(self.heap, (item[0], item[1], next(self._seq), item))
        self.sim.queue_updated()
        self._wakeup.set()

    def pending_items(self) -> list[list]:
        return [list(entry[3][:5]) for entry in self.heap]

    def running_items(self) -> list[list]:
        return [list(item[:5]) for item in self.running.values()]

    def delete_pending(self, prompt_id: Any) -> bool:
        for i, entry in enumerate(self.heap):
            if entry[3][1] == prompt_id:
                self.heap.pop(i)
                heapq.heapify(self.heap)
                self.sim.queue_updated()
                return True
        return False

    def wipe_queue(self) -> None:
        self.heap = []
        self.sim.queue_updated()

    def get_history(self, prompt_id=None, max_items=None, offset=-1) -> dict:
        if prompt_id is None:
            out, i = {}, 0
            if offset < 0 and max_items is not None:
                offset = len(self.history) - max_items
            for key in self.history:
                if i >= offset:
                    out[key] = self.history[key]
                    if max_items is not None and len(out) >= max_items:
                        break
                i += 1
            return copy.deepcopy(out)
        if prompt_id in self.history:
            return {prompt_id: copy.deepcopy(self.history[prompt_id])}
        return {}

    # -- interrupt, stall, injected failures
    def interrupt(self) -> None:
        self.interrupted = True

    def check_interrupt(self) -> None:
        if self.interrupted:
            self.interrupted = False
            raise Interrupted()

    async def wait_unstalled(self) -> None:
        while self.sim.stall:
            await asyncio.sleep(0.01)

    def take_failure(self, class_type: str) -> dict | None:
        for i, failure in enumerate(self.sim.pending_failures):
            if failure["node_type"] == class_type:
                return self.sim.pending_failures.pop(i)
        return None

    # -- the worker loop (main.py prompt_worker)
    async def _run(self) -> None:
        while True:
            while not self.heap:
                self._wakeup.clear()
                await self._wakeup.wait()
            item = heapq.heappop(self.heap)[3]
            task_id = self.task_counter
            self.task_counter += 1
            self.running[task_id] = copy.deepcopy(item)
            self.sim.queue_updated()
            try:
                success, messages, result = await self._execute(item)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in the sim: keep serving, report it like ComfyUI's worker would log
                log.exception("comfy_sim: prompt %s crashed", item[1])
                success, messages, result = False, [], {"outputs": {}, "meta": {}}
            prompt = self.running.pop(task_id)[:5]
            if len(self.history) > MAXIMUM_HISTORY_SIZE:
                self.history.pop(next(iter(self.history)))
            self.history[prompt[1]] = {
                "prompt": list(prompt), "outputs": {},
                "status": {"status_str": "success" if success else "error", "completed": success,
                           "messages": [[event, data] for event, data in messages]},
            }
            self.history[prompt[1]].update(result)
            self.sim.queue_updated()
            if self.client_id is not None:
                self.send("executing", {"node": None, "prompt_id": prompt[1]}, self.client_id)

    def _add_message(self, messages: list, event: str, data: dict, broadcast: bool) -> None:
        data = {**data, "timestamp": int(time.time() * 1000)}
        messages.append((event, data))
        if self.client_id is not None or broadcast:
            self.send(event, data, self.client_id)

    async def _execute(self, item: tuple) -> tuple[bool, list, dict]:
        number, prompt_id, prompt, extra_data, execute_outputs = item[:5]
        self.interrupted = False
        self.client_id = extra_data.get("client_id") if "client_id" in extra_data else None
        self.prompt_id = prompt_id
        messages: list = []
        self._add_message(messages, "execution_start", {"prompt_id": prompt_id}, broadcast=False)
        if self.flush_cache:
            self.cache, self.flush_cache = {}, False
        signatures = Signatures(prompt, self.sim)
        keys = {signatures.get(node_id) for node_id in prompt}
        self.cache = {k: v for k, v in self.cache.items() if k in keys}
        cached_nodes = [node_id for node_id in prompt if signatures.get(node_id) in self.cache]
        self._add_message(messages, "execution_cached", {"nodes": cached_nodes, "prompt_id": prompt_id},
                          broadcast=False)
        progress = ProgressState(self, prompt_id)
        run = _PromptRun(self, prompt_id, prompt, extra_data, signatures, progress)
        execution_list = ExecutionList(prompt, lambda n: signatures.get(n) in self.cache)
        for node_id in list(execute_outputs):
            execution_list.add_node(node_id)
        success = True
        while not execution_list.is_empty():
            node_id = execution_list.stage()
            if node_id is None:  # a dependency cycle (validation lets some through, as ComfyUI's does)
                node_id = next(iter(execution_list.pending))
                error = {"node_id": node_id, "exception_message": "Dependency cycle detected\n",
                         "exception_type": "graph.DependencyCycleError", "traceback": [], "current_inputs": []}
                self._report_error(messages, run, error, None)
                success = False
                break
            error, exc = await run.execute(node_id)
            if error is not None:
                self._report_error(messages, run, error, exc)
                success = False
                break
            execution_list.complete(node_id)
        else:
            self._add_message(messages, "execution_success", {"prompt_id": prompt_id}, broadcast=False)
        result = {"outputs": {n: ui["output"] for n, ui in run.ui_outputs.items()},
                  "meta": {n: ui["meta"] for n, ui in run.ui_outputs.items()}}
        self.last_node_id = None
        return success, messages, result

    def _report_error(self, messages: list, run: "_PromptRun", error: dict, exc: Exception | None) -> None:
        node_id = error["node_id"]
        mes = {"prompt_id": run.prompt_id, "node_id": node_id, "node_type": run.prompt[node_id]["class_type"],
               "executed": list(run.executed)}
        if isinstance(exc, Interrupted):
            self._add_message(messages, "execution_interrupted", mes, broadcast=True)
        else:
            mes.update(exception_message=error["exception_message"], exception_type=error["exception_type"],
                       traceback=error["traceback"], current_inputs=error["current_inputs"],
                       current_outputs=list(run.prompt))
            self._add_message(messages, "execution_error", mes, broadcast=False)


class _PromptRun:
    """State of one prompt's execution: outputs so far, executed nodes, UI outputs for history."""

    def __init__(self, executor: Executor, prompt_id: str, prompt: dict, extra_data: dict, signatures: Signatures,
                 progress: ProgressState):
        self.ex, self.prompt_id, self.prompt, self.extra_data = executor, prompt_id, prompt, extra_data
        self.signatures, self.progress = signatures, progress
        self.values: dict[str, tuple] = {}
        self.executed: list[str] = []
        self.ui_outputs: dict[str, dict] = {}

    def _meta(self, node_id: str) -> dict:
        return {"node_id": node_id, "display_node": node_id, "parent_node": None, "real_node_id": node_id}

    def _inputs(self, node_id: str, cls) -> dict:
        types = cls.input_types(self.ex.sim)
        declared = {**types.get("required", {}), **types.get("optional", {})}
        data = {}
        for name, value in self.prompt[node_id]["inputs"].items():
            if is_link(value):
                source = self.values.get(value[0])
                if source is None:
                    entry = self.ex.cache.get(self.signatures.get(value[0]))
                    source = entry.outputs if entry is not None else None
                data[name] = source[value[1]] if source is not None and value[1] < len(source) else None
            elif name in declared:
                data[name] = value
        for name, kind in types.get("hidden", {}).items():
            if kind == "PROMPT":
                data[name] = self.prompt
            elif kind == "EXTRA_PNGINFO":
                data[name] = self.extra_data.get("extra_pnginfo")
            elif kind == "UNIQUE_ID":
                data[name] = node_id
        return data

    async def execute(self, node_id: str) -> tuple[dict | None, Exception | None]:
        ex = self.ex
        class_type = self.prompt[node_id]["class_type"]
        cls = NODE_CLASSES[class_type]
        signature = self.signatures.get(node_id)
        cached = ex.cache.get(signature)
        if cached is not None:
            if cached.ui is not None:
                if ex.client_id is not None:
                    ex.send("executed", {"node": node_id, "display_node": node_id, "output": cached.ui["output"],
                                         "prompt_id": self.prompt_id}, ex.client_id)
                self.ui_outputs[node_id] = cached.ui
            self.progress.finish(node_id)
            self.values[node_id] = cached.outputs
            return None, None
        await ex.wait_unstalled()
        await asyncio.sleep(0)
        self.progress.start(node_id)
        inputs = self._inputs(node_id, cls)
        if ex.client_id is not None:
            ex.last_node_id = node_id
            ex.send("executing", {"node": node_id, "display_node": node_id, "prompt_id": self.prompt_id},
                    ex.client_id)
        ctx = NodeContext(ex, node_id, class_type, self.progress, self.prompt, self.extra_data)
        try:
            ex.check_interrupt()
            ctx.check_failure()
            outputs, ui = await cls.run(ctx, **inputs)
            if not ex.alive:
                raise asyncio.CancelledError()
            ui_value = None
            if ui:
                ui_value = {"meta": self._meta(node_id), "output": ui}
                self.ui_outputs[node_id] = ui_value
                if ex.client_id is not None:
                    ex.send("executed", {"node": node_id, "display_node": node_id, "output": ui,
                                         "prompt_id": self.prompt_id}, ex.client_id)
            ex.cache[signature] = CacheEntry(ui=ui_value, outputs=outputs)
            self.values[node_id] = outputs
        except Interrupted as exc:
            return {"node_id": node_id}, exc
        except NodeFailure as exc:
            return self._failure(node_id, inputs, str(exc), exc.exception_type, exc.frames), exc
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, OSError) as exc:
            log.debug("comfy_sim: node %s failed", node_id, exc_info=True)
            return self._failure(node_id, inputs, str(exc), type(exc).__name__, cls.frames()), exc
        self.progress.finish(node_id)
        self.executed.append(node_id)
        return None, None

    def _failure(self, node_id: str, inputs: dict, message: str, exception_type: str, frames: list[str]) -> dict:
        return {"node_id": node_id, "exception_message": f"{message}\n", "exception_type": exception_type,
                "traceback": frames, "current_inputs": {k: [format_value(v)] for k, v in inputs.items()}}
