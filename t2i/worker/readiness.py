"""Which of this worker's workflows its ComfyUI can run now, kept fresh.

Checked at start, after every websocket (re)connect and every ``interval`` seconds
against ``GET /object_info/{class}`` (only the classes the templates use: the full
list is megabytes). A template ComfyUI refused although it passed (a rejection that
is the worker's, not the user's) stays not ready for ``interval`` seconds whatever
the next check says. ``GET /workflows`` shows the result; the scheduler routes by it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from tornado.ioloop import PeriodicCallback

from t2i.comfyui import ComfyUIClient, ComfyUIError
from t2i.config import WorkerConfig
from t2i.passes import SerialPass
from t2i.readiness import classes_of, combo_options, problems_of

log = logging.getLogger(__name__)


class WorkflowReadiness:
    interval = 300.0  # seconds between checks (models get installed and removed while we run)

    def __init__(self, config: WorkerConfig, comfy: ComfyUIClient, monotonic: Callable[[], float] = time.monotonic):
        self.config = config
        self.comfy = comfy
        self.monotonic = monotonic
        self.checked_at: float | None = None  # wall clock of the last complete check
        self._state: dict[str, tuple[bool | None, str | None]] = {name: (None, None) for name in config.workflows}
        self._rejected: dict[str, tuple[float, str]] = {}  # workflow -> (monotonic until, why)
        # workflow -> enum parameter -> the values ComfyUI lists for its input (object_info), when no
        # `choices` are configured: GET /workflows shows them and requests are checked against them.
        self.choices: dict[str, dict[str, list[Any]]] = {}
        self._pass = SerialPass(self.check, "checking the workflows against ComfyUI")
        self._callback: PeriodicCallback | None = None

    def start(self) -> None:
        self._callback = PeriodicCallback(self.request_check, self.interval * 1000, jitter=0.1)
        self._callback.start()

    def stop(self) -> None:
        if self._callback is not None:
            self._callback.stop()
        self._pass.cancel()

    # --- reading --------------------------------------------------------------------

    def of(self, workflow: str) -> tuple[bool | None, str | None]:
        """(ready, why not): ready None until the first check could ask ComfyUI."""
        rejected = self._rejected.get(workflow)
        if rejected is not None:
            if self.monotonic() < rejected[0]:
                return False, rejected[1]
            del self._rejected[workflow]
        return self._state.get(workflow, (None, None))

    def catalogue(self, catalogue: dict[str, Any]) -> dict[str, Any]:
        """``GET /workflows``: the catalogue with each workflow's readiness."""
        workflows = {}
        for name, spec in catalogue["workflows"].items():
            ready, reason = self.of(name)
            workflows[name] = {**spec, "ready": ready, "reason": reason}
            listed = self.choices.get(name)
            if listed:
                params = spec.get("params", {})
                workflows[name]["params"] = {p: {**params[p], "choices": listed[p]} if p in listed
                                             and "choices" not in params[p] else params[p] for p in params}
        return {**catalogue, "workflows": workflows, "checked_at": self.checked_at}

    # --- changing -------------------------------------------------------------------

    def mark_rejected(self, workflow: str, reason: str) -> None:
        log.warning("workflow %s: ComfyUI refused it, so it is not ready here for %g s: %s", workflow,
                    self.interval, reason)
        self._rejected[workflow] = (self.monotonic() + self.interval, reason)

    def request_check(self) -> None:
        self._pass.request()

    async def check(self) -> bool:
        """One check of every workflow; False when ComfyUI could not be asked (nothing changes)."""
        classes = sorted(set().union(*(classes_of(wf.template) for wf in self.config.workflows.values())))
        try:
            infos = await asyncio.gather(*(self.comfy.object_info(name) for name in classes))
        except ComfyUIError as exc:
            log.info("cannot check the workflows yet: %s", exc)
            return False
        object_info = dict(zip(classes, infos))
        for name, workflow in self.config.workflows.items():
            skip = [(param.node, param.input) for param in workflow.params.values()]
            self.choices[name] = _listed_choices(workflow, object_info)
            problems = problems_of(workflow.template, object_info, skip)
            state = (not problems, "; ".join(problems) or None)
            if state != self._state.get(name):
                (log.info if state[0] else log.warning)(
                    "workflow %s: %s", name, "ready" if state[0] else f"not ready: {state[1]}")
            self._state[name] = state
        self.checked_at = time.time()
        return True


def _listed_choices(workflow: Any, object_info: dict[str, Any]) -> dict[str, list[Any]]:
    """The options ComfyUI lists for each enum parameter without configured ``choices``."""
    found = {}
    for pname, param in workflow.params.items():
        if param.type != "enum" or param.choices is not None:
            continue
        info = object_info.get(workflow.template[param.node].get("class_type")) or {}
        declared = {**((info.get("input") or {}).get("optional") or {}),
                    **((info.get("input") or {}).get("required") or {})}
        options = combo_options(declared.get(param.input))
        if options is not None:
            found[pname] = options
    return found
