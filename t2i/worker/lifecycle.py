"""A job's lifecycle on a worker, as data and one pure function. No I/O happens here.

``advance(job, event, now, limits)`` returns the job as it should be after
``event`` and the effects the :class:`~t2i.worker.runner.Runner` must carry out
(talk to ComfyUI, copy images, write the journal). Every state and every
transition is in :data:`TRANSITIONS`: a row per event, a cell per phase; an
event with no cell for the job's phase changes nothing.

Phases (``t2i.worker.jobs``), and the public status each shows::

    backlog ─▶ submitting ─▶ queued ─▶ running ─▶ finishing ─▶ collecting ─▶ completed
    (pending:  (pending)     (pending)  (running)  (reading      (copying       failed
     this worker's                                  history)      images)       cancelled
     own queue)
        ▲            │          │
        └────────────┴──────────┘  ComfyUI lost it (restarted): submitted again,
                                   at most ``max_resubmits`` times

Time comes in through ``now`` (monotonic and wall clock), so tests use a fake one.
The races of the old runner are cells here: a timeout never fires while images are
being collected; a cancel after the run ended waits for the real end; a cancel
during ``POST /prompt`` ends the job and withdraws the prompt once ComfyUI answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from t2i.comfyui import error_sentence, images_of
from t2i.worker.jobs import (BACKLOG, CANCELLED, COLLECTING, COMPLETED, FAILED, FINISHED, FINISHING, QUEUED,
                             STARTED, SUBMITTING, Job)

# --- the sentences a job can end (or wait) with -------------------------------------------

INTERRUPTED = "The job was interrupted in ComfyUI (not by t2i)."
CANCELLED_BY_REQUEST = "Cancelled by request."
NO_IMAGE = "ComfyUI finished the job without saving any image."
NO_IMAGE_REPORTED = "ComfyUI finished the job without reporting any image."
QUEUE_TIMEOUT_FACTOR = 4  # a job may wait in ComfyUI's queue this many job_timeouts


def lost_sentence(resubmits: int) -> str:
    if resubmits == 0:
        return "ComfyUI lost this job (it restarted or its queue was cleared)."
    return (f"ComfyUI lost this job again (it restarted or its queue was cleared) after it was "
            f"submitted {resubmits + 1} times; giving up.")


def stall_sentence(seconds: float) -> str:
    return f"ComfyUI made no progress for {seconds:g} s."


def down_sentence(reason: str) -> str:
    return f"ComfyUI is not reachable ({reason}); the job carries on when it is back."


class Now(NamedTuple):
    mono: float  # for timers (a clock step must not fail every job)
    wall: float  # for the timestamps users see


@dataclass(frozen=True)
class Limits:
    job_timeout: float = 600.0
    stall_timeout: float = 120.0
    max_resubmits: int = 1
    queue_timeout_factor: float = QUEUE_TIMEOUT_FACTOR


# --- events: what happened -----------------------------------------------------------------

@dataclass(frozen=True)
class Dispatch:
    """ComfyUI has room: a job of the worker's own queue goes to it now."""


@dataclass(frozen=True)
class Waiting:
    """A job of the worker's own queue is now ``position`` prompts from the front."""
    position: int


@dataclass(frozen=True)
class Submitted:
    """ComfyUI accepted ``POST /prompt``."""


@dataclass(frozen=True)
class SubmitRefused:
    """``POST /prompt`` failed: ComfyUI rejected the workflow (``unavailable`` False) or could
    not be reached (True); ``maybe_queued`` when it timed out and may have taken it anyway."""
    error: str
    unavailable: bool = False
    maybe_queued: bool = False


@dataclass(frozen=True)
class Started:
    """execution_start, execution_cached, or executing a node."""


@dataclass(frozen=True)
class Progress:
    value: int
    maximum: int


@dataclass(frozen=True)
class Preview:
    """A live preview frame arrived (the Runner keeps the bytes)."""


@dataclass(frozen=True)
class Executed:
    """An output node reported its files."""
    refs: tuple


@dataclass(frozen=True)
class RunSucceeded:
    """``execution_success``: every node ran; the `executed` messages named the outputs already."""


@dataclass(frozen=True)
class RunEnded:
    """``executing`` with ``node: null``: the run is over and its history is written."""


@dataclass(frozen=True)
class RunFailed:
    error: str


@dataclass(frozen=True)
class RunInterrupted:
    pass


@dataclass(frozen=True)
class InQueue:
    """A ``GET /queue`` snapshot shows the prompt: running, or pending at ``position``."""
    running: bool
    position: int | None = None


@dataclass(frozen=True)
class HistoryRead:
    """Its history entry, read as an :class:`~t2i.comfyui.Outcome`."""
    outcome: Any


@dataclass(frozen=True)
class HistoryUnreadable:
    """After the run ended, ``GET /history`` failed: the websocket's report has to do."""
    error: str


@dataclass(frozen=True)
class Absent:
    """Neither in ComfyUI's queue nor in its history: ComfyUI lost it."""


@dataclass(frozen=True)
class Collected:
    images: tuple


@dataclass(frozen=True)
class CollectFailed:
    error: str
    retry: bool = False  # ComfyUI was unreachable: look again once it is back


@dataclass(frozen=True)
class CancelRequested:
    pass


@dataclass(frozen=True)
class StopDone:
    """The withdraw (queue delete + targeted interrupt) of a stop went through."""


@dataclass(frozen=True)
class StopFailed:
    error: str


@dataclass(frozen=True)
class Tick:
    """Time passed. ``client_id``: the websocket we hear now (None while it is down)."""
    client_id: str | None


@dataclass(frozen=True)
class ComfyDown:
    reason: str


@dataclass(frozen=True)
class ComfyUp:
    pass


@dataclass(frozen=True)
class Restored:
    """Read back from the journal at start-up; nothing of the old process's I/O survives."""


# --- effects: what the Runner must do ------------------------------------------------------

@dataclass(frozen=True)
class Effect:
    kind: str
    refs: tuple = field(default=())


WITHDRAW = Effect("withdraw")            # delete from ComfyUI's queue + targeted interrupt
FETCH_HISTORY = Effect("fetch_history")
SUBMIT = Effect("submit")                # POST /prompt with the job's graph (a resubmit)
DISPATCH = Effect("dispatch")            # POST /prompt with the job's graph (from the worker's own queue)
JOURNAL = Effect("journal")              # write the job's row
FINISHED_EFFECT = Effect("finished")     # log, metrics, free the preview
STALLED = Effect("stalled")              # the worker is unhealthy until ComfyUI moves
DROP = Effect("drop")                    # ComfyUI never took it: forget the job
# Effect("discard", names): images collected for a job that had ended meanwhile


def collect(refs: tuple) -> Effect:
    return Effect("collect", tuple(refs))


Step = tuple[dict[str, Any], tuple[Effect, ...]]
NOTHING: Step = ({}, ())


# --- the rules -------------------------------------------------------------------------------

UNFINISHED_PHASES = (BACKLOG, SUBMITTING, QUEUED, STARTED, FINISHING, COLLECTING)
BEFORE_RUN_END = (SUBMITTING, QUEUED, STARTED)  # ComfyUI still has it, as far as we know
FOLLOWED = (QUEUED, STARTED)  # what reconcile and the timers look at


def _end(job: Job, phase: str, now: Now, error: str | None, *extra: Effect, **changes: Any) -> Step:
    changes.update(phase=phase, error=error, queue_position=None, ending=None, graph=None,
                   finished_at=now.wall)
    return changes, (JOURNAL, FINISHED_EFFECT, *extra)


def _start(job: Job, now: Now, **changes: Any) -> Step:
    if job.phase == STARTED:
        return dict(active_at=now.mono, **changes), ()
    return dict(phase=STARTED, started_at=job.started_at or now.wall, running_at=now.mono, active_at=now.mono,
                queue_position=None, error=None, **changes), (JOURNAL,)


def _stopped_end(job: Job, now: Now) -> Step:
    """The run ended interrupted: as the stop we asked for says, or as someone else's interrupt."""
    phase, error = job.ending or (FAILED, INTERRUPTED)
    return _end(job, phase, now, error)


def _on_dispatch(job: Job, event: Dispatch, now: Now, limits: Limits) -> Step:
    return {"phase": SUBMITTING, "queue_position": None}, (JOURNAL, DISPATCH)


def _on_waiting(job: Job, event: Waiting, now: Now, limits: Limits) -> Step:
    return {"queue_position": event.position}, ()


def _on_submitted(job: Job, event: Submitted, now: Now, limits: Limits) -> Step:
    changes: dict[str, Any] = {"attempt": job.attempt + 1, "accepted": True}
    if job.phase == SUBMITTING:
        changes.update(phase=QUEUED, queued_at=now.mono, active_at=now.mono, error=None)
    return changes, (JOURNAL,)


def _on_submitted_after_end(job: Job, event: Submitted, now: Now, limits: Limits) -> Step:
    return {}, (WITHDRAW,)  # cancelled during POST /prompt: take the prompt back, nobody wants it


def _on_submit_refused(job: Job, event: SubmitRefused, now: Now, limits: Limits) -> Step:
    extra = (WITHDRAW,) if event.maybe_queued else ()
    if not job.accepted:
        # Never accepted (even if its first messages beat the answer): the client gets the
        # error, no job remains.
        return {}, (DROP, *extra)
    if job.attempt == 0:  # from the worker's own queue: it was accepted, so it ends with a reason
        if event.unavailable:
            if job.phase != SUBMITTING:
                return NOTHING
            return {"phase": BACKLOG, "error": down_sentence(event.error)}, (JOURNAL, *extra)
        return _end(job, FAILED, now, event.error, *extra)
    if event.unavailable:
        if job.phase != SUBMITTING:
            return NOTHING  # its messages came: ComfyUI has it, whatever the POST said
        # A resubmit found ComfyUI gone again: wait in the queue phase; reconcile tries again.
        return {"phase": QUEUED, "queued_at": now.mono, "error": down_sentence(event.error)}, (JOURNAL, *extra)
    return _end(job, FAILED, now, f"ComfyUI refused the job when it was submitted again: {event.error}", *extra)


def _on_started(job: Job, event: Started, now: Now, limits: Limits) -> Step:
    return _start(job, now)


def _on_progress(job: Job, event: Progress, now: Now, limits: Limits) -> Step:
    return _start(job, now, progress_value=event.value, progress_max=event.maximum)


def _on_preview(job: Job, event: Preview, now: Now, limits: Limits) -> Step:
    return {"preview_version": job.preview_version + 1, "active_at": now.mono}, ()


def _on_executed(job: Job, event: Executed, now: Now, limits: Limits) -> Step:
    return {"outputs": job.outputs + tuple(event.refs), "active_at": now.mono}, ()


def _on_run_succeeded(job: Job, event: RunSucceeded, now: Now, limits: Limits) -> Step:
    # The files named by `executed` are on disk: copy them now, not after `executing null` and a
    # GET /history (one round trip less between the run's end and the image on screen). With
    # nothing named, wait for the run's end: the history is written only after this message.
    if not job.outputs:
        return NOTHING
    return ({"phase": COLLECTING, "queue_position": None, "started_at": job.started_at or now.wall,
             "active_at": now.mono}, (JOURNAL, collect(job.outputs)))


def _on_run_ended(job: Job, event: RunEnded, now: Now, limits: Limits) -> Step:
    return {"phase": FINISHING, "queue_position": None, "active_at": now.mono}, (JOURNAL, FETCH_HISTORY)


def _on_run_failed(job: Job, event: RunFailed, now: Now, limits: Limits) -> Step:
    return _end(job, FAILED, now, event.error)


def _on_run_interrupted(job: Job, event: RunInterrupted, now: Now, limits: Limits) -> Step:
    return _stopped_end(job, now)


def _on_in_queue(job: Job, event: InQueue, now: Now, limits: Limits) -> Step:
    if event.running:
        return _start(job, now) if job.phase == QUEUED else NOTHING
    if job.phase == QUEUED:
        return {"queue_position": event.position}, ()
    return NOTHING


def _on_history(job: Job, event: HistoryRead, now: Now, limits: Limits) -> Step:
    outcome = event.outcome
    if outcome.status == "success":
        refs = tuple(outcome.images) or job.outputs
        if not refs:
            return _end(job, FAILED, now, NO_IMAGE)
        return ({"phase": COLLECTING, "queue_position": None, "started_at": job.started_at or now.wall},
                (JOURNAL, collect(refs)))
    if outcome.status == "interrupted":
        return _stopped_end(job, now)
    return _end(job, FAILED, now, outcome.error)


def _on_history_unreadable(job: Job, event: HistoryUnreadable, now: Now, limits: Limits) -> Step:
    if not job.outputs:
        return _end(job, FAILED, now, NO_IMAGE_REPORTED)
    return {"phase": COLLECTING}, (JOURNAL, collect(job.outputs))


def _on_absent(job: Job, event: Absent, now: Now, limits: Limits) -> Step:
    if job.ending is not None:
        return _end(job, job.ending[0], now, job.ending[1])  # gone, as the stop wanted
    if job.attempt == 0:  # its dispatch never reached ComfyUI (the worker died meanwhile): queue it again
        return {"phase": BACKLOG, "queue_position": None}, (JOURNAL,)
    resubmits = max(job.attempt - 1, 0)
    if resubmits >= limits.max_resubmits:
        return _end(job, FAILED, now, lost_sentence(resubmits))
    # Same prompt_id, same graph: ComfyUI runs it as if it were the first time.
    return {"phase": SUBMITTING, "queue_position": None, "progress_value": None, "progress_max": None,
            "outputs": (), "error": None}, (JOURNAL, SUBMIT)


def _on_collected(job: Job, event: Collected, now: Now, limits: Limits) -> Step:
    steps = max(job.progress_max or 1, 1)
    return _end(job, COMPLETED, now, None, images=tuple(event.images), progress_value=steps, progress_max=steps)


def _on_collected_after_end(job: Job, event: Collected, now: Now, limits: Limits) -> Step:
    return {}, (Effect("discard", tuple(event.images)),)


def _on_collect_failed(job: Job, event: CollectFailed, now: Now, limits: Limits) -> Step:
    if event.retry:
        # ComfyUI went away mid-copy: its files are still there; reconcile looks again once it is back.
        return {"phase": STARTED, "running_at": now.mono, "active_at": now.mono,
                "error": down_sentence(event.error)}, (JOURNAL,)
    return _end(job, FAILED, now, event.error)


def _on_cancel_before_accepted(job: Job, event: CancelRequested, now: Now, limits: Limits) -> Step:
    # In the worker's own queue: nothing to undo. During POST /prompt: Submitted will withdraw it.
    return _end(job, CANCELLED, now, CANCELLED_BY_REQUEST)


def _on_cancel(job: Job, event: CancelRequested, now: Now, limits: Limits) -> Step:
    if job.ending is not None:
        return {}, (WITHDRAW,)  # a stop is in flight: try again, the first one may have failed
    # Journaled: a worker killed right after the withdraw must still end the job cancelled.
    return {"ending": (CANCELLED, CANCELLED_BY_REQUEST)}, (JOURNAL, WITHDRAW)


def _on_stop_done(job: Job, event: StopDone, now: Now, limits: Limits) -> Step:
    if job.ending is None:
        return NOTHING
    return _end(job, job.ending[0], now, job.ending[1])


def _on_stop_failed(job: Job, event: StopFailed, now: Now, limits: Limits) -> Step:
    return ({"ending": None}, (JOURNAL,)) if job.ending is not None else NOTHING


def _on_tick(job: Job, event: Tick, now: Now, limits: Limits) -> Step:
    if job.ending is not None or event.client_id is None:
        return NOTHING  # a stop is in flight, or ComfyUI is away: nothing here is its fault
    if job.phase == QUEUED:
        allowed = limits.job_timeout * limits.queue_timeout_factor
        if now.mono - job.queued_at > allowed:
            return _end(job, FAILED, now, f"Timed out after {allowed:g} s in ComfyUI's queue without starting.",
                        WITHDRAW)
        return NOTHING
    if now.mono - job.running_at > limits.job_timeout:
        return _end(job, FAILED, now, f"Timed out after {limits.job_timeout:g} s.", WITHDRAW)
    # Only a job whose messages reach us can be watched: one under an older clientId is silent.
    if job.client_id == event.client_id and now.mono - job.active_at > limits.stall_timeout:
        return _end(job, FAILED, now, stall_sentence(limits.stall_timeout), WITHDRAW, STALLED)
    return NOTHING


def _on_comfy_down(job: Job, event: ComfyDown, now: Now, limits: Limits) -> Step:
    return {"error": down_sentence(event.reason)}, ()


def _on_comfy_up(job: Job, event: ComfyUp, now: Now, limits: Limits) -> Step:
    # The outage is not the job's time: its watchdog starts again (reconcile follows).
    return {"error": None, "active_at": now.mono}, ()


def _on_restored(job: Job, event: Restored, now: Now, limits: Limits) -> Step:
    if job.phase == SUBMITTING and not job.accepted:
        # Killed during its first POST /prompt: the client never had a 200. ComfyUI may have
        # queued it; take it back so a retry elsewhere does not make it run twice.
        return {}, (WITHDRAW, DROP)
    if job.phase == BACKLOG:
        return {"queue_position": None, "error": None}, ()
    # Whatever I/O the old process had in flight is gone: reconcile finds where it is now
    # (the queue, the history, or lost), as after a websocket reconnect.
    phase = QUEUED if job.phase == SUBMITTING else STARTED if job.phase in (FINISHING, COLLECTING) else job.phase
    return {"phase": phase, "queued_at": now.mono, "running_at": now.mono, "active_at": now.mono,
            "error": None}, ()


Rule = Callable[[Job, Any, Now, Limits], Step]


def _cells(rule: Rule, phases: tuple[str, ...]) -> dict[str, Rule]:
    return {phase: rule for phase in phases}


# event type -> {phase: rule}. A missing cell: the event changes nothing in that phase.
TRANSITIONS: dict[type, dict[str, Rule]] = {
    Dispatch: _cells(_on_dispatch, (BACKLOG,)),
    Waiting: _cells(_on_waiting, (BACKLOG,)),
    Submitted: {**_cells(_on_submitted, UNFINISHED_PHASES[1:]), **_cells(_on_submitted_after_end, (CANCELLED,))},
    SubmitRefused: {**_cells(_on_submit_refused, BEFORE_RUN_END),
                    CANCELLED: lambda job, event, now, limits: (
                        {}, ((DROP,) if not job.accepted else ()) + ((WITHDRAW,) if event.maybe_queued else ()))},
    Started: _cells(_on_started, BEFORE_RUN_END),
    Progress: _cells(_on_progress, BEFORE_RUN_END),
    Preview: _cells(_on_preview, (STARTED,)),
    Executed: _cells(_on_executed, BEFORE_RUN_END),
    RunSucceeded: _cells(_on_run_succeeded, BEFORE_RUN_END),
    RunEnded: _cells(_on_run_ended, BEFORE_RUN_END),
    RunFailed: _cells(_on_run_failed, BEFORE_RUN_END),
    RunInterrupted: _cells(_on_run_interrupted, BEFORE_RUN_END),
    InQueue: _cells(_on_in_queue, FOLLOWED),
    HistoryRead: _cells(_on_history, (QUEUED, STARTED, FINISHING)),
    HistoryUnreadable: _cells(_on_history_unreadable, (FINISHING,)),
    Absent: _cells(_on_absent, FOLLOWED),
    Collected: {COLLECTING: _on_collected, **_cells(_on_collected_after_end, tuple(FINISHED))},
    CollectFailed: _cells(_on_collect_failed, (COLLECTING,)),
    CancelRequested: {BACKLOG: _on_cancel_before_accepted, SUBMITTING: _on_cancel_before_accepted,
                      **_cells(_on_cancel, FOLLOWED)},
    StopDone: _cells(_on_stop_done, FOLLOWED),
    StopFailed: _cells(_on_stop_failed, FOLLOWED),
    Tick: _cells(_on_tick, FOLLOWED),
    ComfyDown: _cells(_on_comfy_down, FOLLOWED + (FINISHING, COLLECTING)),
    ComfyUp: _cells(_on_comfy_up, FOLLOWED + (FINISHING, COLLECTING)),
    Restored: _cells(_on_restored, UNFINISHED_PHASES),
}


def event_of(msg_type: str, data: dict[str, Any]) -> Any:
    """A ComfyUI websocket message that names a prompt, as a lifecycle event (None: not one we need)."""
    if msg_type in ("execution_start", "execution_cached"):
        return Started()
    if msg_type == "executing":
        return RunEnded() if data.get("node") is None else Started()
    if msg_type == "progress":
        value, maximum = data.get("value"), data.get("max")
        if isinstance(value, (int, float)) and isinstance(maximum, (int, float)) and maximum > 0:
            return Progress(int(value), int(maximum))
        return None
    if msg_type == "executed":
        refs = images_of(data.get("output"))
        return Executed(tuple(refs)) if refs else None
    if msg_type == "execution_success":
        return RunSucceeded()
    if msg_type == "execution_error":
        return RunFailed(error_sentence(data))
    if msg_type == "execution_interrupted":
        return RunInterrupted()
    return None



def changes_of(job: Job, event: Any, now: Now, limits: Limits) -> Step:
    """The fields ``event`` changes on ``job`` (some may keep their value), and the effects to carry out."""
    rule = TRANSITIONS.get(type(event), {}).get(job.phase)
    if rule is None:
        return NOTHING
    return rule(job, event, now, limits)


def advance(job: Job, event: Any, now: Now, limits: Limits) -> tuple[Job, tuple[Effect, ...]]:
    """The job after ``event``, and the effects to carry out. The same ``job`` when nothing changed."""
    changes, effects = changes_of(job, event, now, limits)
    if not changes or not job.differs(changes):
        return job, effects
    return job.evolve(**changes), effects
