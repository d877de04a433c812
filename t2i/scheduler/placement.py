"""Where a job goes: load, workflow readiness and a breaker per (worker, workflow), in one class.

:class:`Placement` is given the pool (:class:`~t2i.scheduler.registry.Registry`:
health and each worker's ``GET /workflows`` catalogue) and the job mirror
(:class:`~t2i.scheduler.mirror.Mirror`: each worker's jobs, and the jobs seen
ending). ``choose()`` returns the worker for a job, or raises
:class:`NoWorkerAvailable` with a sentence naming why none can take it.

A worker gets a job when it is listed, enabled, reachable with its ComfyUI, and

- *ready* for the job's workflow: its catalogue does not say ``ready: false``
  (``null``, not checked yet, counts as ready) and it did not refuse that
  workflow lately (:meth:`Placement.refused`); a raw workflow only goes to a
  worker whose catalogue says ``allow_raw_workflows: true``;
- its *breaker* for that workflow is not open: :data:`BREAKER_FAILURES` jobs of
  the workflow failed there in a row while another worker completed it lately
  take it out of rotation for :data:`BREAKER_COOLDOWN` seconds; then one job is
  tried (half-open), and a completed job closes the breaker again;
- it has room: fewer unfinished jobs (placements on their way included) than its
  :meth:`~Placement.capacity`, what it says it holds (``/health`` ``load.capacity``:
  ComfyUI's ``ahead`` + its own ``backlog``), capped by workers.yaml ``max_queue`` when
  set. Of those, the job goes where it is expected to end first (the jobs and sampler
  steps ahead of it at the worker's measured seconds per job and per step), near-ties in turn.

When every worker that could take the job is full, the ``503``'s ``Retry-After`` is
when the first place is expected to free up (:meth:`Placement.first_free`).
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any, AsyncIterator, Callable, Iterable

from t2i.jobstate import COMPLETED, FAILED
from t2i.scheduler.registry import Registry, WorkerState

BREAKER_FAILURES = 5       # failed jobs of one workflow in a row on one worker ...
BREAKER_WINDOW = 600.0     # ... while another worker completed it within this many seconds
BREAKER_COOLDOWN = 60.0    # out of rotation for that workflow this long, then one job is tried
PROBE_TIMEOUT = 600.0      # a trial job that never ends lets another be tried after this long
REFUSED_HOLD = 30.0        # a worker that refused a template is not sent that workflow for this long
RAW = "(raw)"              # a raw workflow: the workers' status objects name it so
MAX_REASONS = 6            # per-worker reasons in one "no worker" sentence
DESCRIBE_SLICE = 100       # workers described between two turns of the event loop (GET /workers)
DEFAULT_STEPS = 20         # a job whose steps are unknown (a raw workflow) counts as a typical one
FALLBACK_CAPACITY = 8      # jobs for a worker that does not report its capacity (older, or not asked yet)
RETRY_AFTER_MIN = 1        # seconds: a Retry-After sooner than this only brings every waiting client back at once
RETRY_AFTER_MAX = 30       # seconds: a wait longer than this is a guess; ask again by then
FINISH_TIE = 0.15          # expected finishes within this share of the job's own run time are a tie


class NoWorkerAvailable(Exception):
    """No worker can take a job now; the message says why.

    ``ready`` is False when it is about the workflow (no worker ready, breakers
    open), which will not change in a moment, unlike full queues.
    """

    def __init__(self, message: str, *, ready: bool = True, others: bool = True, retry_after: int | None = None):
        super().__init__(message)
        self.ready = ready
        self.others = others   # False: every listed worker was tried already
        self.retry_after = retry_after  # seconds until a place is expected to free up (queues full)


class Breaker:
    """One worker's record with one workflow."""

    __slots__ = ("failures", "opened_at", "probe_at")

    def __init__(self) -> None:
        self.failures = 0                   # failed jobs in a row
        self.opened_at: float | None = None
        self.probe_at: float | None = None  # when the half-open trial job was placed


def _merge_workflow(workflows: dict[str, Any], name: str, spec: dict[str, Any]) -> None:
    """Add one worker's view of a workflow: the first one's parameters, with the choices of a
    list parameter (checkpoints, samplers…) joined over every worker, since each one's ComfyUI
    offers its own."""
    params = spec.get("params") or {}
    held = workflows.get(name)
    if held is None:
        workflows[name] = {"params": {key: dict(value) if isinstance(value, dict) else value
                                      for key, value in params.items()}}
        return
    for key, value in params.items():
        mine = held["params"].get(key)
        if isinstance(mine, dict) and isinstance(value, dict) and isinstance(mine.get("choices"), list) \
                and isinstance(value.get("choices"), list):
            mine["choices"] = mine["choices"] + [c for c in value["choices"] if c not in mine["choices"]]


def _health_load(state: WorkerState) -> dict[str, Any]:
    """The ``load`` object of a worker's last ``/health`` answer ({} when it has none)."""
    return (state.health or {}).get("load") or {}


def _speed(load: dict[str, Any]) -> float | None:
    """Seconds per step a worker measured (``load.seconds_per_step``), None when it has not yet."""
    value = load.get("seconds_per_step")
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _per_job(load: dict[str, Any]) -> float | None:
    """Seconds per job beyond its steps a worker measured (``load.seconds_per_job``), None when it has not
    (or is older and folds them into its seconds per step)."""
    value = load.get("seconds_per_job")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else None


def _median(speeds: list[float]) -> float:
    """The pool's median seconds per step: a worker not measured yet is taken to run at it (1.0 while
    none is measured: then only the steps ahead count)."""
    known = sorted(speeds)
    return known[len(known) // 2] if known else 1.0


def expected_finish(jobs_ahead: int, steps_ahead: int, steps: int, per_step: float, per_job: float) -> float:
    """Seconds until a new job of ``steps`` would end on a worker: each job ahead and its own cost their
    fixed part, each step its per-step part (a 1-step job is not 1/20 of a 20-step one)."""
    return (jobs_ahead + 1) * per_job + (steps_ahead + steps) * per_step


def _capacity(load: dict[str, Any], max_queue: int | None) -> int:
    reported = load.get("capacity")
    own = reported if isinstance(reported, int) and not isinstance(reported, bool) and reported > 0 \
        else FALLBACK_CAPACITY
    return own if max_queue is None else min(own, max_queue)


class Placement:
    """The scheduler's routing choice over a registry and a mirror."""

    def __init__(self, registry: Registry, mirror: Any, *, clock: Callable[[], float] = time.monotonic,
                 failures: int = BREAKER_FAILURES, cooldown: float = BREAKER_COOLDOWN,
                 window: float = BREAKER_WINDOW):
        self.registry = registry
        self.mirror = mirror
        self.clock = clock
        self.failures = failures
        self.cooldown = cooldown
        self.window = window
        self._succeeded: dict[Any, dict[str, float]] = {}   # workflow -> worker -> last completed job
        self._rr = 0
        self._specs: tuple[int, dict[str, Any] | None] | None = None

    # --- load -----------------------------------------------------------------

    def _seen(self, state: WorkerState) -> tuple[int, int, int, bool]:
        """(pending, running, placed here and not shown yet, feed up) of a worker now: the mirror's
        while its feed is up, else its last health answer."""
        mirror, name = self.mirror, state.name
        up = mirror.feed_up(name)
        pending, running = mirror.counts(name) if up else state.health_jobs()
        return pending, running, mirror.recent_unseen(name), up

    def counts(self, state: WorkerState) -> tuple[int, int]:
        """(pending, running) of a worker now, the jobs placed here that no feed has shown yet pending."""
        pending, running, recent, _ = self._seen(state)
        return pending + recent, running

    def load_and_steps(self, state: WorkerState) -> tuple[int, int]:
        """(jobs, sampler steps) ahead of a new job on this worker: its queue as its feed (else its
        last health answer) shows it, plus the jobs placed there that it has not shown yet and
        those on their way, each with its own steps. One look at the mirror for both: placement
        asks this of every worker for every job."""
        pending, running, recent, up = self._seen(state)
        if up:
            ahead = self.mirror.steps_ahead(state.name, DEFAULT_STEPS)
        else:
            ahead = int(_health_load(state).get("steps") or 0)
        if recent:
            ahead += self.mirror.recent_unseen_steps(state.name)
        return pending + recent + running + state.in_flight, ahead + state.in_flight_steps

    def load(self, state: WorkerState) -> int:
        """Jobs ahead of a new one on this worker, submissions on their way included."""
        return self.load_and_steps(state)[0]

    @staticmethod
    def capacity(state: WorkerState) -> int:
        """Jobs this worker may hold: what its ``/health`` says it holds (ComfyUI's ``ahead`` + its own
        ``backlog``), capped by workers.yaml ``max_queue`` when ops set one; :data:`FALLBACK_CAPACITY`
        for a worker that does not say."""
        return _capacity(_health_load(state), state.entry.max_queue)

    def steps_ahead(self, state: WorkerState) -> int:
        """Sampler steps this worker has to run before a new job (see :meth:`load_and_steps`)."""
        return self.load_and_steps(state)[1]

    @staticmethod
    def first_free(ahead: int, load: int, speed: float, per_job: float = 0.0) -> float:
        """Seconds until a full worker is expected to have a place again: its running job ends, taken as
        one of its queued jobs on average (the steps ahead over the jobs ahead) at its speed."""
        return expected_finish(0, 0, ahead / max(load, 1), speed, per_job)

    def steps_of(self, body: dict[str, Any]) -> int:
        """A job's sampler steps: as asked, else its workflow's default, else a typical job's."""
        steps = body.get("steps")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            specs = self.specs() or {}
            workflow = body.get("workflow")
            name = workflow if isinstance(workflow, str) else specs.get("default_workflow")
            spec = ((specs.get("workflows") or {}).get(name) or {}).get("params", {}).get("steps")
            steps = spec.get("default") if isinstance(spec, dict) else None
        return steps if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else DEFAULT_STEPS

    # --- readiness --------------------------------------------------------------

    @staticmethod
    def workflow_of(state: WorkerState, workflow: Any) -> Any:
        """The workflow a request's ``workflow`` value means on this worker: RAW, its name,
        or the worker's default (None while its catalogue is unknown)."""
        if isinstance(workflow, dict) or workflow == RAW:
            return RAW
        if isinstance(workflow, str):
            return workflow
        return (state.catalogue or {}).get("default_workflow")

    def readiness(self, state: WorkerState, workflow: Any) -> tuple[bool | None, str | None]:
        """(ready, why not) of a worker for a workflow: True/None (not checked yet) or False."""
        catalogue = state.catalogue
        name = self.workflow_of(state, workflow)
        if name == RAW:
            if catalogue is None:
                return False, "has not reported its workflows yet"
            if catalogue.get("allow_raw_workflows") is not True:
                return False, "does not allow raw workflows (allow_raw_workflows: false)"
            return True, None
        refused = state.unready.get(name) if name is not None else None
        if refused is not None:
            if refused[1] > self.clock():
                return False, refused[0]
            del state.unready[name]
        if catalogue is None or name is None:
            return None, None
        spec = catalogue.get("workflows", {}).get(name)
        if not isinstance(spec, dict):
            return False, f"has no workflow {name!r}"
        ready = spec.get("ready")
        if ready is False:
            return False, spec.get("reason") or f"is not ready for workflow {name!r}"
        return (True if ready is True else None), None

    def refused(self, state: WorkerState, workflow: Any, why: str) -> None:
        """The worker refused a template workflow (its ComfyUI rejected it, or it says it is not
        ready): not sent that workflow again for :data:`REFUSED_HOLD` seconds."""
        name = self.workflow_of(state, workflow)
        if name is not None and name != RAW:
            state.unready[name] = (why, self.clock() + REFUSED_HOLD)

    # --- breakers -----------------------------------------------------------------

    def absorb(self) -> None:
        """Feed the breakers with the job endings the mirror saw since last time."""
        now = self.clock()
        for worker, workflow, status in self.mirror.take_outcomes():
            if not isinstance(workflow, str) or workflow == RAW:
                continue  # a raw workflow failing is the client's own graph
            state = self.registry.workers.get(worker)
            breaker = state.breakers.setdefault(workflow, Breaker()) if state is not None else None
            if status == COMPLETED:
                self._succeeded.setdefault(workflow, {})[worker] = now
                if breaker is not None:
                    breaker.failures, breaker.opened_at, breaker.probe_at = 0, None, None
            elif status == FAILED and breaker is not None:
                breaker.failures += 1
                if breaker.opened_at is not None or breaker.failures >= self.failures:
                    if breaker.opened_at is not None or self._others_succeed(worker, workflow, now):
                        breaker.opened_at, breaker.probe_at = now, None

    def _others_succeed(self, worker: str, workflow: str, now: float) -> bool:
        return any(name != worker and now - at <= self.window
                   for name, at in self._succeeded.get(workflow, {}).items())

    def breaker_state(self, state: WorkerState, workflow: Any) -> tuple[str, float | None]:
        """("closed" | "open" | "half_open" | "trial", seconds until it may be tried or None)."""
        breaker = state.breakers.get(workflow) if isinstance(workflow, str) else None
        if breaker is None:
            return "closed", None
        now = self.clock()
        if breaker.opened_at is None:
            # Failures that came before any other worker had completed the workflow count now.
            if breaker.failures >= self.failures and self._others_succeed(state.name, workflow, now):
                breaker.opened_at = now
            else:
                return "closed", None
        left = breaker.opened_at + self.cooldown - now
        if left > 0:
            return "open", left
        if breaker.probe_at is not None and now - breaker.probe_at < PROBE_TIMEOUT:
            return "trial", None   # half-open, its one trial job placed and not ended yet
        return "half_open", None

    # --- choosing -----------------------------------------------------------------

    def choose(self, workflow: Any = None, exclude: Iterable[str] = (), steps: int | None = None) -> WorkerState:
        """The worker for a job of ``workflow`` (a name, a raw workflow object, or None for each
        worker's default): ready, breaker not open, room in its queue, and where a job of
        ``steps`` is expected to end first (jobs and steps ahead at each worker's measured seconds
        per job and per step)."""
        self.absorb()
        exclude = set(exclude)
        listed = [s for s in self.registry.workers.values() if s.listed and s.name not in exclude]
        best, why, frees = self._survey(listed, workflow, steps or DEFAULT_STEPS)
        if not best:
            raise self._none(listed, why, bool(exclude), workflow, frees)
        self._rr += 1
        chosen = best[self._rr % len(best)]
        name = self.workflow_of(chosen, workflow)
        if self.breaker_state(chosen, name)[0] == "half_open":
            chosen.breakers[name].probe_at = self.clock()  # the one trial job
        return chosen

    def _survey(self, listed: list[WorkerState], workflow: Any, steps: int = DEFAULT_STEPS
                ) -> tuple[list[WorkerState], list[tuple[str, str, str]], float | None]:
        """The workers where the job would end first, (worker, kind, why) of the others, and the
        seconds until the first full one is expected to have a place (None: none is full)."""
        # One pass, each worker's health read once, the pool's median speed sorted only when a worker
        # needs it: this runs for every job over every worker (1,000 in bench/scheduler_scale_bench.py).
        why: list[tuple[str, str, str]] = []
        room: list[tuple[WorkerState, int, int, float | None, float]] = []  # (state, load, steps ahead, speeds)
        full: list[tuple[int, int, float | None, float]] = []              # (load, steps ahead, speeds)
        known: list[float] = []                                       # every listed worker's measured speed
        known_per_job: list[float] = []                               # ... and seconds per job, where given
        unmeasured = False                                            # a worker that may take it has no speed yet
        for state in listed:
            health = _health_load(state)
            speed = _speed(health)
            per_job = _per_job(health) if speed is not None else None
            if speed is not None:
                known.append(speed)
                if per_job is not None:
                    known_per_job.append(per_job)
            if not state.entry.enabled:
                why.append((state.name, "disabled", "disabled in workers.yaml"))
                continue
            if not state.routable:
                why.append((state.name, "down", state.last_error or "down"))
                continue
            ready, reason = self.readiness(state, workflow)
            if ready is False:
                why.append((state.name, "unready", reason or "not ready"))
                continue
            if state.breakers:   # none recorded (most workers, most of the time): closed
                name = self.workflow_of(state, workflow)
                breaker, left = self.breaker_state(state, name)
                if breaker in ("open", "trial"):
                    why.append((state.name, "breaker", self._breaker_reason(name, breaker, left)))
                    continue
            load, ahead = self.load_and_steps(state)
            capacity = _capacity(health, state.entry.max_queue)
            unmeasured = unmeasured or speed is None
            if load >= capacity:
                why.append((state.name, "full", f"its queue is full ({load} of {capacity})"))
                full.append((load, ahead, speed, per_job or 0.0))
                continue
            room.append((state, load, ahead, speed, per_job or 0.0))
        # A worker not measured yet (speed None) runs at the median of those measured, per step and per job.
        # One measured without a per-job part (an older worker) has it folded into its seconds per step.
        fallback = _median(known) if unmeasured else 1.0
        fallback_per_job = _median(known_per_job) if unmeasured and known_per_job else 0.0

        def cost(speed: float | None, per_job: float) -> tuple[float, float]:
            return (speed, per_job) if speed is not None else (fallback, fallback_per_job)

        frees = min((self.first_free(ahead, load, *cost(speed, per_job)) for load, ahead, speed, per_job in full),
                    default=None)
        if not room:
            return [], why, frees
        finishes = []
        for state, load, ahead, speed, per_job in room:
            per_step, fixed = cost(speed, per_job)
            finishes.append((expected_finish(load, ahead, steps, per_step, fixed), state,
                             expected_finish(0, 0, steps, per_step, fixed)))
        # Within FINISH_TIE of the job's own run time (on the fastest of them) of the earliest finish
        # is a tie (round robin among them): two equal GPUs measure a little apart, and an idle pool
        # should still share the work. Not a share of the whole queue: behind a burst that would let
        # a slow GPU take jobs that end seconds later than elsewhere.
        earliest = min(finish for finish, _, _ in finishes)
        slack = FINISH_TIE * min(own for _, _, own in finishes)
        return [state for finish, state, _ in finishes if finish <= earliest + slack + 1e-9], why, frees

    def _breaker_reason(self, workflow: Any, breaker: str, left: float | None) -> str:
        if breaker == "trial":
            return f"on trial for {workflow!r} (one job placed, waiting for it to end)"
        return (f"out of rotation for {workflow!r} after {self.failures} failed jobs in a row while other "
                f"workers completed it (tried again in {max(1, round(left or 0))} s)")

    def _none(self, listed: list[WorkerState], why: list[tuple[str, str, str]], tried: bool,
              workflow: Any, frees: float | None = None) -> NoWorkerAvailable:
        if tried and not listed:
            return NoWorkerAvailable("every worker that could take the job refused it.", others=False)
        if not listed:
            return NoWorkerAvailable("No worker is configured (workers.yaml lists none).")
        kinds = {kind for _, kind, _ in why}
        if kinds == {"disabled"}:
            return NoWorkerAvailable("Every worker is disabled in workers.yaml.")
        if kinds <= {"disabled", "down"}:
            return NoWorkerAvailable("Every enabled worker is down or unreachable.")
        if kinds <= {"disabled", "down", "full"}:
            # The whole pool is full: come back when the first place is expected to free up.
            retry = min(max(math.ceil(frees or 0), RETRY_AFTER_MIN), RETRY_AFTER_MAX)
            return NoWorkerAvailable("Every available worker's queue is full; try again shortly.", retry_after=retry)
        shown = [f"{name}: {reason}" for name, kind, reason in why if kind != "disabled"]
        more = len(shown) - MAX_REASONS
        detail = "; ".join(shown[:MAX_REASONS]) + (f"; and {more} more" if more > 0 else "")
        if isinstance(workflow, dict) or workflow == RAW:
            return NoWorkerAvailable(f"No worker can run a raw workflow: {detail}.", ready=False)
        if workflow is None:
            workflow = (self.specs() or {}).get("default_workflow")
        named = f"workflow {workflow!r}" if isinstance(workflow, str) else "the default workflow"
        return NoWorkerAvailable(f"No worker is ready for {named}: {detail}.", ready=False)

    # --- views ----------------------------------------------------------------------

    def specs(self) -> dict[str, Any] | None:
        """The workflows the pool serves, for validating requests: the listed workers'
        catalogues merged (first wins); cached until the pool or a catalogue changes."""
        generation = self.registry.generation
        if self._specs is None or self._specs[0] != generation:
            merged: dict[str, Any] | None = None
            for state in self.registry.workers.values():
                cat = state.catalogue
                if not state.listed or not cat:
                    continue
                if merged is None:
                    merged = {"default_workflow": cat.get("default_workflow"),
                              "allow_raw_workflows": False, "workflows": {}}
                merged["allow_raw_workflows"] = merged["allow_raw_workflows"] or cat.get("allow_raw_workflows") is True
                hooks = (cat.get("webhooks") or {}).get("allowed_urls") or []
                if hooks:  # a webhook_url any worker accepts passes here; placement finds that worker
                    allowed = merged.setdefault("webhooks", {"allowed_urls": []})["allowed_urls"]
                    allowed.extend(url for url in hooks if url not in allowed)
                for name, spec in cat.get("workflows", {}).items():
                    if isinstance(spec, dict):
                        _merge_workflow(merged["workflows"], name, spec)
            self._specs = (generation, merged)
        return self._specs[1]

    def catalogue(self) -> dict[str, Any] | None:
        """``GET /workflows`` of the scheduler: :meth:`specs`, each workflow with ``ready`` (some
        worker can take it now), ``reason`` (why none can) and ``not_ready`` (worker -> why)."""
        specs = self.specs()
        if specs is None:
            return None
        self.absorb()
        workflows = {}
        for name, spec in specs["workflows"].items():
            not_ready: dict[str, str] = {}
            ready = False
            for state in self.registry.workers.values():
                if not state.listed or not state.entry.enabled or not state.catalogue \
                        or name not in state.catalogue.get("workflows", {}):
                    continue
                ok, reason = self.readiness(state, name)
                breaker, left = self.breaker_state(state, name)
                if ok is False:
                    not_ready[state.name] = reason or "not ready"
                elif breaker in ("open", "trial"):
                    not_ready[state.name] = self._breaker_reason(name, breaker, left)
                elif state.routable:
                    ready = True
            workflow = {**spec, "ready": ready, "reason": None, "not_ready": not_ready}
            if not ready:
                listed = [s for s in self.registry.workers.values() if s.listed]
                _, why, frees = self._survey(listed, name)
                workflow["reason"] = str(self._none(listed, why, False, name, frees))
            workflows[name] = workflow
        return {**specs, "workflows": workflows}

    def summary(self) -> list[dict[str, Any]]:
        """Each listed worker in short, for ``GET /health``."""
        out = []
        for state in self.registry.workers.values():
            if state.listed:
                pending, running = self.counts(state)
                out.append({"name": state.name, "ok": state.routable, "reachable": state.reachable,
                            "comfyui_reachable": state.comfyui_reachable, "enabled": state.entry.enabled,
                            "pending": pending, "running": running})
        return out

    async def describe_in_slices(self, size: int = DESCRIBE_SLICE) -> AsyncIterator[list[dict[str, Any]]]:
        """:meth:`describe`, ``size`` workers at a time, yielding to the event loop in between."""
        states = list(self.registry.workers.values())
        for start in range(0, len(states), size):
            yield self.describe(states[start:start + size])
            await asyncio.sleep(0)

    def describe(self, states: Iterable[WorkerState] | None = None) -> list[dict[str, Any]]:
        """Each worker for ``GET /workers``: config, health, load, feed, readiness and breakers."""
        self.absorb()
        mirror = self.mirror
        out = []
        for state in self.registry.workers.values() if states is None else states:
            pending, running = self.counts(state)
            feed = mirror.feed(state.name)
            catalogue = state.catalogue or {}
            workflows = {}
            for name in catalogue.get("workflows", {}) if isinstance(catalogue.get("workflows"), dict) else ():
                ready, reason = self.readiness(state, name)
                breaker, left = self.breaker_state(state, name)
                record = state.breakers.get(name)
                workflows[name] = {"ready": ready, "reason": reason, "breaker": breaker,
                                   "failures": record.failures if record else 0,
                                   "retry_in": round(left, 1) if left is not None else None}
            out.append({
                "name": state.name, "url": state.url, "public_url": state.entry.public_url,
                "enabled": state.entry.enabled, "max_queue": state.entry.max_queue,
                "capacity": self.capacity(state),
                "listed": state.listed, "routable": state.routable, "reachable": state.reachable,
                "comfyui_reachable": state.comfyui_reachable, "pending": pending, "running": running,
                "in_flight": state.in_flight, "jobs": mirror.jobs_of(state.name),
                "last_error": state.last_error, "last_checked": state.last_checked,
                "allow_raw_workflows": catalogue.get("allow_raw_workflows") is True if catalogue else None,
                "workflows": workflows,
                "feed": feed.to_json() if feed is not None else {"state": "stopped"},
            })
        return out
