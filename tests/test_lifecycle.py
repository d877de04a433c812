"""The job lifecycle (t2i.worker.lifecycle) as the pure function it is: no I/O, no sleeps, no servers.

Three parts:

* the table of ``TRANSITIONS`` cell by cell (every phase x event that has a rule, and the ones that
  must be ignored), asserting the exact fields changed and the exact effects asked for;
* the three races the lifecycle was written to settle, as named step-by-step stories;
* real ComfyUI 0.3.64 traffic (``tests/recordings``) replayed through ``event_of`` and ``advance``,
  checking that the job ends the way the recorded prompt really ended.

Time is fake: ``lc.Now`` values built here, far from 0 on the monotonic side so that a timer left
at its 0.0 default would fire at once and show up.
"""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from t2i.comfyui import ImageRef, Outcome, images_of, outcome_of, parse_queue
from t2i.jobstate import PENDING, RUNNING
from t2i.worker import lifecycle as lc
from t2i.worker.jobs import (BACKLOG, CANCELLED, COLLECTING, COMPLETED, FAILED, FINISHED, FINISHING, QUEUED,
                             STARTED, SUBMITTING, Job)

RECORDINGS = Path(__file__).resolve().parent / "recordings"

MONO0 = 50_000.0            # the fake monotonic clock at t=0
WALL0 = 1_795_805_000.0     # the fake wall clock at t=0 (the recordings' era)
T = 10.0                    # when a table cell's event happens
M, W = MONO0 + T, WALL0 + T
LIMITS = lc.Limits(job_timeout=600, stall_timeout=120, max_resubmits=1)

CLIENT = "c-1"
REF = ImageRef("t2i_00001_.png")
OLD_REF = ImageRef("t2i_00000_.png")
STOPPING = (CANCELLED, lc.CANCELLED_BY_REQUEST)  # the ending a cancel puts on a followed job
DOWN = lc.down_sentence("Connection refused")
BOOM = "SlowNoiseImage failed: boom"

JOURNAL, FINISHED_EFFECT, WITHDRAW = lc.JOURNAL, lc.FINISHED_EFFECT, lc.WITHDRAW
FETCH_HISTORY, SUBMIT, DROP, STALLED = lc.FETCH_HISTORY, lc.SUBMIT, lc.DROP, lc.STALLED

SUCCESS = Outcome("success", [REF])
SUCCESS_NO_IMAGES = Outcome("success", [])
ERROR = Outcome("error", [], BOOM)
INTERRUPTED = Outcome("interrupted", [])


# --- helpers ---------------------------------------------------------------------------------------

def now_at(t: float) -> lc.Now:
    return lc.Now(MONO0 + t, WALL0 + t)


def make_job(phase: str, **fields: Any) -> Job:
    """A job in ``phase`` as the lifecycle would have left it: accepted once unless still submitting,
    its graph kept until it ends, every timer at t=0."""
    prompt_id = fields.pop("prompt_id", "p-1")
    created_at = fields.pop("created_at", WALL0)
    values: dict[str, Any] = dict(client_id=CLIENT, attempt=0 if phase == SUBMITTING else 1,
                                  graph={"1": {"class_type": "SlowNoiseImage"}},
                                  queued_at=MONO0, running_at=MONO0, active_at=MONO0)
    if phase in FINISHED:
        values.update(graph=None, finished_at=WALL0)
    values.update(fields)
    values.setdefault("accepted", values["attempt"] >= 1)  # a job ComfyUI took once was answered 200
    return Job(prompt_id, created_at, phase=phase, **values)


def step(job: Job, event: Any, t: float = T, limits: lc.Limits = LIMITS) -> tuple[Job, tuple]:
    return lc.advance(job, event, now_at(t), limits)


def snapshot(job: Job) -> tuple:
    return tuple(getattr(job, name) for name in Job.__slots__)


def changes(old: Job, new: Job) -> dict[str, Any]:
    """The fields ``new`` has that ``old`` had not: what a step really did."""
    return {name: getattr(new, name) for name in Job.__slots__ if getattr(old, name) != getattr(new, name)}


def assert_step(job: Job, event: Any, expect: dict[str, Any], effects, t: float = T,
                limits: lc.Limits = LIMITS) -> Job:
    """``event`` changes exactly the fields of ``expect`` (those that differ from the job's) and asks
    exactly ``effects``; the original job is left as it was, and is returned as is when nothing changed."""
    before = snapshot(job)
    new, got = step(job, event, t, limits)
    assert got == tuple(effects)
    wanted = {name: value for name, value in expect.items() if getattr(job, name) != value}
    assert changes(job, new) == wanted
    assert snapshot(job) == before, "advance changed the job in place"
    if not wanted:
        assert new is job, "nothing changed, yet advance made a copy"
    return new


def ended(phase: str, error: str | None, **more: Any) -> dict[str, Any]:
    """What every final step sets (lifecycle._end), plus ``more``."""
    return {"phase": phase, "error": error, "queue_position": None, "ending": None, "graph": None,
            "finished_at": W, **more}


# What a job that starts running at T looks like (lifecycle._start).
STARTS = {"phase": STARTED, "started_at": W, "running_at": M, "active_at": M, "queue_position": None, "error": None}
TIMERS = {"queued_at": M, "running_at": M, "active_at": M}


# --- the table -------------------------------------------------------------------------------------

def case(label: str, phase: str, event: Any, expect: dict | None = None, effects=(), *, t: float = T,
         limits: lc.Limits = LIMITS, **fields: Any):
    """One cell: ``event`` at ``t`` to a ``phase`` job with ``fields``. ``expect``: the fields after it;
    ``effects``: exactly what the Runner must do. No ``expect`` and no ``effects``: the event is ignored."""
    return pytest.param(phase, fields, event, expect or {}, tuple(effects), t, limits,
                        id=f"{type(event).__name__}:{phase}:{label}")


CASES = [
    # The worker's own queue (backlog): accepted, waiting for room in ComfyUI's.
    case("room in ComfyUI", BACKLOG, lc.Dispatch(), {"phase": SUBMITTING, "queue_position": None},
         [JOURNAL, lc.DISPATCH], accepted=True, queue_position=3),
    case("moved up", BACKLOG, lc.Waiting(2), {"queue_position": 2}, accepted=True, queue_position=3),
    case("cancelled while waiting: nothing to undo", BACKLOG, lc.CancelRequested(),
         ended(CANCELLED, lc.CANCELLED_BY_REQUEST), [JOURNAL, FINISHED_EFFECT], accepted=True),
    case("read back after a restart", BACKLOG, lc.Restored(), {"queue_position": None}, accepted=True,
         queue_position=4),
    case("dispatch refused: it was accepted, so it fails with the reason", SUBMITTING,
         lc.SubmitRefused("ComfyUI rejected the workflow: x"), ended(FAILED, "ComfyUI rejected the workflow: x"),
         [JOURNAL, FINISHED_EFFECT], accepted=True),
    case("dispatch found ComfyUI away: back in the worker's queue", SUBMITTING,
         lc.SubmitRefused("Connection refused", unavailable=True), {"phase": BACKLOG, "error": DOWN}, [JOURNAL],
         accepted=True),
    case("dispatch killed before ComfyUI had it: queued again", QUEUED, lc.Absent(),
         {"phase": BACKLOG, "queue_position": None}, [JOURNAL], accepted=True, attempt=0),
    case("a dispatch cancelled while its POST was out", CANCELLED, lc.SubmitRefused("x", unavailable=True,
                                                                                     maybe_queued=True),
         {}, [WITHDRAW], accepted=True, attempt=0),
    case("no timers in the worker's own queue", BACKLOG, lc.Tick(CLIENT), t=10 ** 6, accepted=True),

    # Submitted: ComfyUI answered POST /prompt with 200.
    case("accepted", SUBMITTING, lc.Submitted(),
         {"phase": QUEUED, "attempt": 1, "accepted": True, "queued_at": M, "active_at": M, "error": None},
         [JOURNAL]),
    case("resubmit accepted", SUBMITTING, lc.Submitted(),
         {"phase": QUEUED, "attempt": 2, "queued_at": M, "active_at": M}, [JOURNAL], attempt=1),
    case("reply after a queue snapshot", QUEUED, lc.Submitted(), {"attempt": 1, "accepted": True}, [JOURNAL], attempt=0),
    case("reply after its messages", STARTED, lc.Submitted(), {"attempt": 1, "accepted": True}, [JOURNAL], attempt=0),
    case("reply after the run ended", FINISHING, lc.Submitted(), {"attempt": 1, "accepted": True}, [JOURNAL], attempt=0),
    case("reply while collecting", COLLECTING, lc.Submitted(), {"attempt": 1, "accepted": True}, [JOURNAL], attempt=0),
    case("cancelled during the POST", CANCELLED, lc.Submitted(), {}, [WITHDRAW], attempt=0),
    case("finished before the reply", COMPLETED, lc.Submitted(), attempt=0),
    case("failed before the reply", FAILED, lc.Submitted(), attempt=0),

    # SubmitRefused: POST /prompt failed.
    case("first submission rejected", SUBMITTING, lc.SubmitRefused("bad workflow"), {}, [DROP]),
    case("first submission, ComfyUI away", SUBMITTING, lc.SubmitRefused("Connection refused", unavailable=True),
         {}, [DROP]),
    case("first submission timed out", SUBMITTING,
         lc.SubmitRefused("timed out", unavailable=True, maybe_queued=True), {}, [DROP, WITHDRAW]),
    case("resubmit rejected", SUBMITTING, lc.SubmitRefused("bad workflow"),
         ended(FAILED, "ComfyUI refused the job when it was submitted again: bad workflow"),
         [JOURNAL, FINISHED_EFFECT], attempt=1),
    case("resubmit, ComfyUI away", SUBMITTING, lc.SubmitRefused("Connection refused", unavailable=True),
         {"phase": QUEUED, "queued_at": M, "error": DOWN}, [JOURNAL], attempt=1),
    case("resubmit timed out", SUBMITTING,
         lc.SubmitRefused("Connection refused", unavailable=True, maybe_queued=True),
         {"phase": QUEUED, "queued_at": M, "error": DOWN}, [JOURNAL, WITHDRAW], attempt=1),
    case("cancelled during the first POST", CANCELLED, lc.SubmitRefused("bad workflow"), {}, [DROP], attempt=0),
    case("cancelled during a resubmit", CANCELLED, lc.SubmitRefused("bad workflow"), attempt=1),
    # Its first messages beat the answer (running while still unaccepted): refused all the same.
    case("first, partly refused, already running", STARTED, lc.SubmitRefused("only part"), {}, [DROP],
         attempt=0),
    case("first, timed out, already queued", QUEUED, lc.SubmitRefused("timed out", unavailable=True,
                                                                      maybe_queued=True), {}, [DROP, WITHDRAW],
         attempt=0),
    case("resubmit timed out, its messages came", STARTED, lc.SubmitRefused("timed out", unavailable=True)),
    case("resubmit partly refused, already running", STARTED, lc.SubmitRefused("only part"),
         ended(FAILED, "ComfyUI refused the job when it was submitted again: only part"),
         [JOURNAL, FINISHED_EFFECT]),
    case("after the run ended", FINISHING, lc.SubmitRefused("bad workflow")),

    # Started: execution_start, execution_cached, executing a node.
    case("messages beat the reply", SUBMITTING, lc.Started(), STARTS, [JOURNAL]),
    case("leaves the queue", QUEUED, lc.Started(), STARTS, [JOURNAL], queue_position=3, error=DOWN),
    case("a resubmit keeps its first start", QUEUED, lc.Started(), {**STARTS, "started_at": WALL0 - 100},
         [JOURNAL], started_at=WALL0 - 100),
    case("already running", STARTED, lc.Started(), {"active_at": M}, started_at=WALL0),
    case("after the run ended", FINISHING, lc.Started()),
    case("while collecting", COLLECTING, lc.Started()),

    # Progress
    case("before the reply", SUBMITTING, lc.Progress(2, 5), {**STARTS, "progress_value": 2, "progress_max": 5},
         [JOURNAL]),
    case("first step", QUEUED, lc.Progress(2, 5), {**STARTS, "progress_value": 2, "progress_max": 5}, [JOURNAL]),
    case("next step", STARTED, lc.Progress(2, 5), {"active_at": M, "progress_value": 2, "progress_max": 5},
         progress_value=1, progress_max=5, started_at=WALL0),
    case("after the run ended", FINISHING, lc.Progress(2, 5)),

    # Preview
    case("a frame", STARTED, lc.Preview(), {"preview_version": 3, "active_at": M}, preview_version=2),
    case("not started yet", QUEUED, lc.Preview()),
    case("after the run ended", FINISHING, lc.Preview()),

    # Executed: an output node reported its files.
    case("first output", STARTED, lc.Executed((REF,)), {"outputs": (REF,), "active_at": M}),
    case("another output", STARTED, lc.Executed((REF,)), {"outputs": (OLD_REF, REF), "active_at": M},
         outputs=(OLD_REF,)),
    case("cached run", QUEUED, lc.Executed((REF,)), {"outputs": (REF,), "active_at": M}),
    case("before the reply", SUBMITTING, lc.Executed((REF,)), {"outputs": (REF,), "active_at": M}),
    case("after the run ended", FINISHING, lc.Executed((REF,))),

    # RunEnded: executing {node: null}.
    case("the run is over", STARTED, lc.RunEnded(), {"phase": FINISHING, "active_at": M}, [JOURNAL, FETCH_HISTORY]),
    case("never heard running", QUEUED, lc.RunEnded(), {"phase": FINISHING, "queue_position": None, "active_at": M},
         [JOURNAL, FETCH_HISTORY], queue_position=2),
    case("before the reply", SUBMITTING, lc.RunEnded(), {"phase": FINISHING, "active_at": M},
         [JOURNAL, FETCH_HISTORY]),
    case("twice", FINISHING, lc.RunEnded()),
    case("while collecting", COLLECTING, lc.RunEnded()),

    # RunFailed: execution_error.
    case("node failed", STARTED, lc.RunFailed(BOOM), ended(FAILED, BOOM), [JOURNAL, FINISHED_EFFECT]),
    case("failed at once", QUEUED, lc.RunFailed(BOOM), ended(FAILED, BOOM), [JOURNAL, FINISHED_EFFECT],
         queue_position=1),
    case("before the reply", SUBMITTING, lc.RunFailed(BOOM), ended(FAILED, BOOM), [JOURNAL, FINISHED_EFFECT]),
    case("after the run ended", FINISHING, lc.RunFailed(BOOM)),

    # RunSucceeded: execution_success. The `executed` reports named the files: copy them at once.
    case("files named", STARTED, lc.RunSucceeded(), {"phase": COLLECTING, "started_at": W, "active_at": M},
         [JOURNAL, lc.collect((REF,))], outputs=(REF,)),
    case("files named, messages beat the reply", SUBMITTING, lc.RunSucceeded(),
         {"phase": COLLECTING, "started_at": W, "active_at": M}, [JOURNAL, lc.collect((REF,))], outputs=(REF,)),
    case("cached, from the queue", QUEUED, lc.RunSucceeded(),
         {"phase": COLLECTING, "started_at": W, "active_at": M, "queue_position": None},
         [JOURNAL, lc.collect((REF,))], outputs=(REF,), queue_position=1),
    case("nothing named: wait for the history", STARTED, lc.RunSucceeded()),
    case("after the run ended", FINISHING, lc.RunSucceeded(), outputs=(REF,)),

    # RunInterrupted: execution_interrupted.
    case("someone else's interrupt", STARTED, lc.RunInterrupted(), ended(FAILED, lc.INTERRUPTED),
         [JOURNAL, FINISHED_EFFECT]),
    case("our cancel", STARTED, lc.RunInterrupted(), ended(CANCELLED, lc.CANCELLED_BY_REQUEST),
         [JOURNAL, FINISHED_EFFECT], ending=STOPPING),
    case("our cancel, not started", QUEUED, lc.RunInterrupted(), ended(CANCELLED, lc.CANCELLED_BY_REQUEST),
         [JOURNAL, FINISHED_EFFECT], ending=STOPPING),
    case("before the reply", SUBMITTING, lc.RunInterrupted(), ended(FAILED, lc.INTERRUPTED),
         [JOURNAL, FINISHED_EFFECT]),
    case("after the run ended", FINISHING, lc.RunInterrupted()),

    # InQueue: a GET /queue snapshot shows the prompt.
    case("pending", QUEUED, lc.InQueue(False, 2), {"queue_position": 2}),
    case("running", QUEUED, lc.InQueue(True), STARTS, [JOURNAL], queue_position=1),
    case("running, known", STARTED, lc.InQueue(True), started_at=WALL0),
    case("pending, yet heard running", STARTED, lc.InQueue(False, 1)),
    case("during the POST", SUBMITTING, lc.InQueue(False, 1)),
    case("after the run ended", FINISHING, lc.InQueue(True)),

    # HistoryRead: the prompt's history entry.
    case("success", FINISHING, lc.HistoryRead(SUCCESS), {"phase": COLLECTING, "started_at": W},
         [JOURNAL, lc.collect((REF,))]),
    case("success, images from executed", FINISHING, lc.HistoryRead(SUCCESS_NO_IMAGES),
         {"phase": COLLECTING, "started_at": W},
         [JOURNAL, lc.collect((OLD_REF,))], outputs=(OLD_REF,)),
    case("success without images", FINISHING, lc.HistoryRead(SUCCESS_NO_IMAGES), ended(FAILED, lc.NO_IMAGE),
         [JOURNAL, FINISHED_EFFECT]),
    case("error", FINISHING, lc.HistoryRead(ERROR), ended(FAILED, BOOM), [JOURNAL, FINISHED_EFFECT]),
    case("interrupted", FINISHING, lc.HistoryRead(INTERRUPTED), ended(FAILED, lc.INTERRUPTED),
         [JOURNAL, FINISHED_EFFECT]),
    case("interrupted by our cancel", FINISHING, lc.HistoryRead(INTERRUPTED),
         ended(CANCELLED, lc.CANCELLED_BY_REQUEST), [JOURNAL, FINISHED_EFFECT], ending=STOPPING),
    case("reconcile found it done", QUEUED, lc.HistoryRead(SUCCESS),
         {"phase": COLLECTING, "queue_position": None, "started_at": W},
         [JOURNAL, lc.collect((REF,))], queue_position=1),
    case("reconcile found it done", STARTED, lc.HistoryRead(SUCCESS), {"phase": COLLECTING, "started_at": W},
         [JOURNAL, lc.collect((REF,))]),
    case("reconcile found it failed", STARTED, lc.HistoryRead(ERROR), ended(FAILED, BOOM),
         [JOURNAL, FINISHED_EFFECT]),
    case("already collecting", COLLECTING, lc.HistoryRead(SUCCESS)),
    case("during the POST", SUBMITTING, lc.HistoryRead(SUCCESS)),

    # HistoryUnreadable: GET /history failed after the run ended.
    case("the websocket named images", FINISHING, lc.HistoryUnreadable("HTTP 500"), {"phase": COLLECTING},
         [JOURNAL, lc.collect((REF,))], outputs=(REF,)),
    case("nothing named", FINISHING, lc.HistoryUnreadable("HTTP 500"), ended(FAILED, lc.NO_IMAGE_REPORTED),
         [JOURNAL, FINISHED_EFFECT]),
    case("still running", STARTED, lc.HistoryUnreadable("HTTP 500"), outputs=(REF,)),

    # Absent: neither in the queue nor in the history.
    case("lost, resubmitted", QUEUED, lc.Absent(),
         {"phase": SUBMITTING, "queue_position": None, "progress_value": None, "progress_max": None, "outputs": (),
          "error": None}, [JOURNAL, SUBMIT], queue_position=2, error=DOWN),
    case("lost mid-run, resubmitted", STARTED, lc.Absent(),
         {"phase": SUBMITTING, "progress_value": None, "progress_max": None, "outputs": ()}, [JOURNAL, SUBMIT],
         progress_value=3, progress_max=5, outputs=(REF,)),
    case("lost again", STARTED, lc.Absent(), ended(FAILED, lc.lost_sentence(1)), [JOURNAL, FINISHED_EFFECT],
         attempt=2),
    case("lost, no resubmits allowed", STARTED, lc.Absent(), ended(FAILED, lc.lost_sentence(0)),
         [JOURNAL, FINISHED_EFFECT], limits=lc.Limits(max_resubmits=0)),
    case("gone as our cancel wanted", QUEUED, lc.Absent(), ended(CANCELLED, lc.CANCELLED_BY_REQUEST),
         [JOURNAL, FINISHED_EFFECT], ending=STOPPING),
    case("after the run ended", FINISHING, lc.Absent()),
    case("during the POST", SUBMITTING, lc.Absent()),

    # Collected: the images are copied.
    case("done", COLLECTING, lc.Collected(("a.png",)), ended(COMPLETED, None, images=("a.png",)),
         [JOURNAL, FINISHED_EFFECT], progress_value=5, progress_max=5),
    case("progress shown full", COLLECTING, lc.Collected(("a.png",)),
         ended(COMPLETED, None, images=("a.png",), progress_value=5), [JOURNAL, FINISHED_EFFECT],
         progress_value=3, progress_max=5),
    case("no progress bar", COLLECTING, lc.Collected(("a.png",)),
         ended(COMPLETED, None, images=("a.png",), progress_value=1, progress_max=1), [JOURNAL, FINISHED_EFFECT]),
    case("the outage notice goes", COLLECTING, lc.Collected(("a.png",)),
         ended(COMPLETED, None, images=("a.png",), progress_value=1, progress_max=1), [JOURNAL, FINISHED_EFFECT],
         error=DOWN),
    *[case("ended meanwhile", phase, lc.Collected(("a.png",)), {}, [lc.Effect("discard", ("a.png",))])
      for phase in sorted(FINISHED)],
    case("not collecting", STARTED, lc.Collected(("a.png",))),

    # CollectFailed
    case("ComfyUI went away", COLLECTING, lc.CollectFailed("Connection refused", retry=True),
         {"phase": STARTED, "running_at": M, "active_at": M, "error": DOWN}, [JOURNAL]),
    case("for good", COLLECTING, lc.CollectFailed("No space left on device"),
         ended(FAILED, "No space left on device"), [JOURNAL, FINISHED_EFFECT]),
    case("not collecting", FINISHING, lc.CollectFailed("x", retry=True)),

    # CancelRequested (the races have their own tests below)
    case("during the POST", SUBMITTING, lc.CancelRequested(), ended(CANCELLED, lc.CANCELLED_BY_REQUEST),
         [JOURNAL, FINISHED_EFFECT]),
    case("queued", QUEUED, lc.CancelRequested(), {"ending": STOPPING}, [JOURNAL, WITHDRAW]),
    case("running", STARTED, lc.CancelRequested(), {"ending": STOPPING}, [JOURNAL, WITHDRAW]),
    case("asked again", STARTED, lc.CancelRequested(), {}, [WITHDRAW], ending=STOPPING),

    # StopDone / StopFailed: the withdraw of a stop answered.
    case("cancelled", STARTED, lc.StopDone(), ended(CANCELLED, lc.CANCELLED_BY_REQUEST), [JOURNAL, FINISHED_EFFECT],
         ending=STOPPING),
    case("cancelled", QUEUED, lc.StopDone(), ended(CANCELLED, lc.CANCELLED_BY_REQUEST), [JOURNAL, FINISHED_EFFECT],
         ending=STOPPING, queue_position=2),
    case("no stop asked", STARTED, lc.StopDone()),
    case("the run ended first", FINISHING, lc.StopDone(), ending=STOPPING),
    case("the job carries on", STARTED, lc.StopFailed("HTTP 500"), {"ending": None}, [JOURNAL], ending=STOPPING),
    case("the job carries on", QUEUED, lc.StopFailed("HTTP 500"), {"ending": None}, [JOURNAL], ending=STOPPING),
    case("no stop asked", STARTED, lc.StopFailed("HTTP 500")),
    case("the run ended first", FINISHING, lc.StopFailed("HTTP 500"), ending=STOPPING),

    # Tick: the timers. Queue timeout = job_timeout * queue_timeout_factor, measured from queued_at.
    case("queue timeout not yet", QUEUED, lc.Tick(CLIENT), t=2400),
    case("queue timeout", QUEUED, lc.Tick(CLIENT),
         ended(FAILED, "Timed out after 2400 s in ComfyUI's queue without starting.", finished_at=WALL0 + 2400.5),
         [JOURNAL, FINISHED_EFFECT, WITHDRAW], t=2400.5),
    case("queue timeout, own factor", QUEUED, lc.Tick(CLIENT),
         ended(FAILED, "Timed out after 30 s in ComfyUI's queue without starting.", finished_at=WALL0 + 30.5),
         [JOURNAL, FINISHED_EFFECT, WITHDRAW], t=30.5, limits=lc.Limits(job_timeout=10, queue_timeout_factor=3)),
    case("queued, a stop in flight", QUEUED, lc.Tick(CLIENT), t=3000, ending=STOPPING),
    case("queued, ComfyUI away", QUEUED, lc.Tick(None), t=3000),
    case("run timeout not yet", STARTED, lc.Tick(CLIENT), t=600, active_at=MONO0 + 500),
    case("run timeout", STARTED, lc.Tick(CLIENT), ended(FAILED, "Timed out after 600 s.", finished_at=WALL0 + 600.5),
         [JOURNAL, FINISHED_EFFECT, WITHDRAW], t=600.5, active_at=MONO0 + 500),
    case("stall not yet", STARTED, lc.Tick(CLIENT), t=120),
    case("stall", STARTED, lc.Tick(CLIENT), ended(FAILED, lc.stall_sentence(120), finished_at=WALL0 + 120.5),
         [JOURNAL, FINISHED_EFFECT, WITHDRAW, STALLED], t=120.5),
    case("silent under an older clientId", STARTED, lc.Tick("c-0"), t=300),
    case("ComfyUI away", STARTED, lc.Tick(None), t=1000),
    case("a stop in flight", STARTED, lc.Tick(CLIENT), t=1000, ending=STOPPING),
    case("reading the history", FINISHING, lc.Tick(CLIENT), t=10_000),
    case("collecting", COLLECTING, lc.Tick(CLIENT), t=10_000),
    case("POST in flight", SUBMITTING, lc.Tick(CLIENT), t=10_000),

    # ComfyDown / ComfyUp: the notice while ComfyUI is away.
    *[case("notice", phase, lc.ComfyDown("Connection refused"), {"error": DOWN})
      for phase in (QUEUED, STARTED, FINISHING, COLLECTING)],
    case("POST in flight", SUBMITTING, lc.ComfyDown("Connection refused")),
    *[case("notice cleared, watchdog restarted", phase, lc.ComfyUp(), {"error": None, "active_at": M}, error=DOWN)
      for phase in (QUEUED, STARTED, FINISHING, COLLECTING)],
    case("POST in flight", SUBMITTING, lc.ComfyUp(), error=DOWN),

    # Restored: read back from the journal at start-up.
    case("killed during its first POST", SUBMITTING, lc.Restored(), {}, [WITHDRAW, DROP]),
    case("killed during a resubmit", SUBMITTING, lc.Restored(), {"phase": QUEUED, **TIMERS, "error": None},
         attempt=1, error=DOWN),
    # A cancel in flight is journaled and survives: once the prompt is gone, the job ends cancelled.
    case("queued, its stop kept", QUEUED, lc.Restored(), TIMERS, ending=STOPPING),
    case("running", STARTED, lc.Restored(), TIMERS),
    case("reading the history", FINISHING, lc.Restored(), {"phase": STARTED, **TIMERS}),
    case("collecting", COLLECTING, lc.Restored(), {"phase": STARTED, **TIMERS}),
]


@pytest.mark.parametrize("phase, fields, event, expect, effects, t, limits", CASES)
def test_transition(phase, fields, event, expect, effects, t, limits):
    assert_step(make_job(phase, **fields), event, expect, effects, t=t, limits=limits)


def test_the_table_covers_every_cell_of_transitions():
    """A rule added to TRANSITIONS without a row above would be untested: fail instead."""
    covered = {(type(param.values[2]), param.values[0]) for param in CASES}
    cells = {(event_type, phase) for event_type, row in lc.TRANSITIONS.items() for phase in row}
    assert cells - covered == set()


# Everything that can happen to a job, but for the three events that still matter once it ended
# (Submitted, SubmitRefused and Collected: the table has them).
RUN_EVENTS = [lc.Started(), lc.Progress(1, 5), lc.Preview(), lc.Executed((REF,)), lc.RunEnded(), lc.RunFailed(BOOM),
              lc.RunInterrupted(), lc.InQueue(True), lc.InQueue(False, 1), lc.HistoryRead(SUCCESS),
              lc.HistoryRead(ERROR), lc.HistoryUnreadable("HTTP 500"), lc.Absent(), lc.CollectFailed("x", retry=True),
              lc.CancelRequested(), lc.StopDone(), lc.StopFailed("x"), lc.Tick(CLIENT), lc.ComfyDown("x"),
              lc.ComfyUp(), lc.Restored()]


@pytest.mark.parametrize("phase", sorted(FINISHED))
@pytest.mark.parametrize("event", RUN_EVENTS, ids=lambda event: type(event).__name__)
def test_a_final_phase_ignores_everything_else(phase, event):
    job = make_job(phase, error=BOOM if phase == FAILED else None)
    new, effects = step(job, event, t=10_000)
    assert new is job and effects == ()


@pytest.mark.parametrize("job, event", [
    (make_job(QUEUED, queue_position=2), lc.InQueue(False, 2)),
    (make_job(STARTED, error=DOWN), lc.ComfyDown("Connection refused")),
    (make_job(STARTED, active_at=M), lc.Started()),
    (make_job(COLLECTING, active_at=M), lc.ComfyUp()),
], ids=["same queue position", "same outage", "same instant", "nothing to clear"])
def test_a_step_that_changes_no_field_returns_the_same_job(job, event):
    """The Runner stores (and versions, and wakes long-polls for) a job only when it is a new object."""
    new, effects = step(job, event)
    assert new is job and effects == ()


def test_the_same_job_comes_back_with_its_effects_when_only_effects_are_asked():
    job = make_job(STARTED, ending=STOPPING)
    new, effects = step(job, lc.CancelRequested())
    assert new is job and effects == (WITHDRAW,)


# --- event_of: ComfyUI messages as events -------------------------------------------------------------

@pytest.mark.parametrize("msg_type, data, event", [
    ("execution_start", {"prompt_id": "p"}, lc.Started()),
    ("execution_cached", {"nodes": ["1", "2"], "prompt_id": "p"}, lc.Started()),
    ("executing", {"node": "1", "display_node": "1", "prompt_id": "p"}, lc.Started()),
    ("executing", {"node": None, "prompt_id": "p"}, lc.RunEnded()),
    ("progress", {"value": 2, "max": 5, "prompt_id": "p", "node": "1"}, lc.Progress(2, 5)),
    ("progress", {"value": 2.0, "max": 5.0, "prompt_id": "p"}, lc.Progress(2, 5)),
    ("progress", {"value": 0, "max": 0, "prompt_id": "p"}, None),
    ("progress", {"value": None, "max": 5, "prompt_id": "p"}, None),
    ("executed", {"node": "2", "output": {"images": [{"filename": "t2i_00001_.png", "subfolder": "",
                                                      "type": "output"}]}, "prompt_id": "p"}, lc.Executed((REF,))),
    ("executed", {"node": "3", "output": {"text": ["hello"]}, "prompt_id": "p"}, None),
    ("execution_error", {"node_type": "SlowNoiseImage", "exception_message": "boom\n", "prompt_id": "p"},
     lc.RunFailed(BOOM)),
    ("execution_interrupted", {"node_type": "SlowNoiseImage", "prompt_id": "p"}, lc.RunInterrupted()),
    ("execution_success", {"prompt_id": "p"}, lc.RunSucceeded()),
    ("progress_state", {"prompt_id": "p", "nodes": {}}, None),
], ids=lambda value: value if isinstance(value, str) else None)
def test_event_of(msg_type, data, event):
    assert lc.event_of(msg_type, data) == event


# --- the three races ---------------------------------------------------------------------------------

def test_a_timeout_never_fires_while_the_images_are_collected():
    """The old runner failed jobs whose copy was slow; the images then arrived for a failed job."""
    late = 100 * LIMITS.job_timeout
    job = make_job(COLLECTING, progress_value=5, progress_max=5)
    failed, _ = step(job.evolve(phase=STARTED), lc.Tick(CLIENT), t=late)
    assert failed.phase == FAILED  # the same tick does end a running job: it is late enough
    assert_step(job, lc.Tick(CLIENT), {}, [], t=late)
    done = assert_step(job, lc.Collected(("a.png",)),
                       ended(COMPLETED, None, images=("a.png",), finished_at=WALL0 + late),
                       [JOURNAL, FINISHED_EFFECT], t=late)
    assert done.status == COMPLETED and done.progress_value == done.progress_max == 5


def test_a_cancel_racing_the_end_of_the_run_loses_honestly():
    """The run ended before the withdraw took effect: the job completes, it is not called cancelled."""
    job = make_job(STARTED, progress_value=5, progress_max=5, outputs=(REF,))
    job = assert_step(job, lc.CancelRequested(), {"ending": STOPPING}, [JOURNAL, WITHDRAW])
    job = assert_step(job, lc.RunEnded(), {"phase": FINISHING, "active_at": M}, [JOURNAL, FETCH_HISTORY])
    assert job.ending == STOPPING and job.status == RUNNING
    job = assert_step(job, lc.StopDone(), {}, [])  # the withdraw answered: too late, the run is over
    job = assert_step(job, lc.HistoryRead(SUCCESS), {"phase": COLLECTING, "started_at": W}, [JOURNAL, lc.collect((REF,))])
    job = assert_step(job, lc.Collected(("a.png",)), ended(COMPLETED, None, images=("a.png",)),
                      [JOURNAL, FINISHED_EFFECT])
    assert job.ending is None and job.error is None


@pytest.mark.parametrize("phase", [FINISHING, COLLECTING])
def test_a_cancel_after_the_run_ended_waits_for_the_real_end(phase):
    job = make_job(phase, outputs=(REF,))
    new, effects = step(job, lc.CancelRequested())
    assert new is job and effects == ()


def test_a_cancel_during_post_prompt_ends_the_job_and_withdraws_the_prompt():
    """ComfyUI accepts the prompt after the job was cancelled: take it back, or it runs for nobody."""
    job = make_job(SUBMITTING)
    job = assert_step(job, lc.CancelRequested(), ended(CANCELLED, lc.CANCELLED_BY_REQUEST), [JOURNAL, FINISHED_EFFECT])
    assert job.status == CANCELLED
    job = assert_step(job, lc.Submitted(), {}, [WITHDRAW])
    assert job.phase == CANCELLED and job.error == lc.CANCELLED_BY_REQUEST
    new, effects = step(job, lc.Started())
    assert new is job and effects == ()  # its messages, should any come, change nothing


def test_a_cancel_during_a_post_prompt_that_timed_out_withdraws_the_prompt():
    job, _ = step(make_job(SUBMITTING), lc.CancelRequested())
    _, effects = step(job, lc.SubmitRefused("timed out", unavailable=True, maybe_queued=True))
    assert WITHDRAW in effects


# --- recordings of a real ComfyUI, replayed ------------------------------------------------------------

STATUS_RANK = {PENDING: 0, RUNNING: 1, COMPLETED: 2, FAILED: 2, CANCELLED: 2}


@functools.lru_cache(maxsize=None)
def recording(name: str) -> dict[str, Any]:
    return json.loads((RECORDINGS / f"{name}.json").read_text())


def requests_of(rec: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {event["req"]: event for event in rec["events"] if event["kind"] == "http_request"}


def accepted_prompts(rec: dict[str, Any], client_id: str) -> dict[int, str]:
    """POST /prompt request number -> prompt_id, for the prompts ComfyUI took from ``client_id``."""
    requests = requests_of(rec)
    accepted = {}
    for event in rec["events"]:
        if event["kind"] != "http_response" or event["status"] != 200:
            continue
        request = requests[event["req"]]
        if request["method"] == "POST" and request["path"] == "/prompt" and \
                (request.get("json") or {}).get("client_id") == client_id:
            accepted[event["req"]] = event["json"]["prompt_id"]
    return accepted


def prompts_of(name: str, label: str = "A") -> list[str]:
    rec = recording(name)
    return list(accepted_prompts(rec, rec["clients"][label]).values())


def history_entries(rec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """prompt_id -> its entry, from every recorded answer to GET /history..."""
    requests = requests_of(rec)
    entries = {}
    for event in rec["events"]:
        if event["kind"] == "http_response" and isinstance(event.get("json"), dict):
            request = requests[event["req"]]
            if request["method"] == "GET" and request["path"].startswith("/history"):
                entries.update({key: value for key, value in event["json"].items() if isinstance(value, dict)})
    return entries


def request_of(rec: dict[str, Any], **match: Any) -> dict[str, Any]:
    """The first recorded request with these fields (method, path, json)."""
    return next(event for event in rec["events"]
                if event["kind"] == "http_request" and all(event.get(k) == v for k, v in match.items()))


def before_request(name: str, prompt_id: str, event: Any, **match: Any) -> tuple[int, str, Any]:
    """Inject ``event`` just before the request that carries it out was sent."""
    return request_of(recording(name), **match)["seq"], prompt_id, event


def after_answer(name: str, prompt_id: str, event: Any, **match: Any) -> tuple[int, str, Any]:
    """Inject ``event`` just after the answer to that request arrived."""
    rec = recording(name)
    req = request_of(rec, **match)["req"]
    answer = next(e for e in rec["events"] if e["kind"] == "http_response" and e["req"] == req)
    return answer["seq"] + 1, prompt_id, event


@dataclass
class Replay:
    """The Runner's part, played from a recording: jobs, what the lifecycle asked, what came back."""
    limits: lc.Limits
    history: dict[str, dict[str, Any]]
    jobs: dict[str, Job] = field(default_factory=dict)
    fed: dict[str, list] = field(default_factory=lambda: defaultdict(list))  # the events that did something
    effects: dict[str, list] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[str, list] = field(default_factory=lambda: defaultdict(list))  # (each trace: repeats dropped)
    positions: dict[str, list] = field(default_factory=lambda: defaultdict(list))  # queue positions shown
    progress: dict[str, list] = field(default_factory=lambda: defaultdict(list))  # (value, max) while unfinished
    errors: dict[str, list] = field(default_factory=lambda: defaultdict(list))  # notices shown while unfinished
    entered: dict[str, dict] = field(default_factory=lambda: defaultdict(dict))  # phase -> wall time first in it
    collected: dict[str, tuple] = field(default_factory=dict)  # the refs of the collect effect
    running_id: str | None = None  # the prompt last heard running (where a legacy preview belongs)

    def add(self, job: Job, now: lc.Now) -> None:
        self.jobs[job.prompt_id] = job
        self._note(job, now)

    def apply(self, prompt_id: str, event: Any, now: lc.Now) -> None:
        """``event`` and, at once, what the Runner's I/O for the effects would bring back."""
        pending = [event]
        while pending:
            event = pending.pop(0)
            old = self.jobs[prompt_id]
            job, effects = lc.advance(old, event, now, self.limits)
            if job is old and not effects:
                continue  # ignored in this phase (most Ticks, messages after the end)
            self.jobs[prompt_id] = job
            self.fed[prompt_id].append(event)
            self.effects[prompt_id].extend(effects)
            self._note(job, now)
            pending.extend(answer for answer in (self._answer(prompt_id, e) for e in effects) if answer)

    def broadcast(self, event: Any, now: lc.Now) -> None:
        for prompt_id in list(self.jobs):
            self.apply(prompt_id, event, now)

    def _answer(self, prompt_id: str, effect: lc.Effect) -> Any:
        if effect == FETCH_HISTORY:
            entry = self.history.get(prompt_id)
            return lc.HistoryRead(outcome_of(entry)) if entry else lc.HistoryUnreadable("not in the recording")
        if effect.kind == "collect":
            self.collected[prompt_id] = effect.refs
            return lc.Collected(("x.png",))
        return None  # withdraw, submit, ...: the recording shows what ComfyUI did, if anything

    def _note(self, job: Job, now: lc.Now) -> None:
        pid = job.prompt_id
        _append_new(self.statuses[pid], job.status)
        self.entered[pid].setdefault(job.phase, now.wall)
        if not job.finished:
            if job.queue_position is not None:
                _append_new(self.positions[pid], job.queue_position)
            if job.progress_max:
                _append_new(self.progress[pid], (job.progress_value, job.progress_max))
            if job.error:
                _append_new(self.errors[pid], job.error)


def _append_new(seen: list, value: Any) -> None:
    """Keep a trace of what was shown: a value again right after itself is no news."""
    if not seen or seen[-1] != value:
        seen.append(value)


def replay(name: str, label: str, *, via_submit: bool = False, inject=(),
           limits: lc.Limits = LIMITS) -> Replay:
    """Feed a recording through the lifecycle, for the prompts that the client ``label`` submitted.

    Each job appears when its POST /prompt is sent: queued and accepted once, or (``via_submit``)
    submitting until the recorded 200 answer gives it ``Submitted``. Then, in recorded order: the
    websocket messages naming it (on any connection with that clientId), preview frames, GET /queue
    snapshots (InQueue), a GET /history/{id} answer of ``{}`` (Absent), connection errors (ComfyDown),
    reconnects (ComfyUp), and a Tick after every recorded event. ``inject``: (seq, prompt_id, event)
    applied just before the recorded event ``seq``.
    """
    rec = recording(name)
    client_id = rec["clients"][label]
    conns = {conn for conn, cid in rec["clients"].items() if cid == client_id}
    accepted = accepted_prompts(rec, client_id)
    requests = requests_of(rec)
    injected = defaultdict(list)
    for seq, prompt_id, event in inject:
        injected[seq].append((prompt_id, event))
    r = Replay(limits, history_entries(rec))
    ws_up = was_up = False
    for ev in rec["events"]:
        now, kind = now_at(ev["t"]), ev["kind"]
        for prompt_id, event in injected[ev["seq"]]:
            r.apply(prompt_id, event, now)
        if kind == "http_request" and ev["req"] in accepted:
            pid = accepted[ev["req"]]
            if via_submit:
                r.add(Job(pid, now.wall, client_id=client_id, phase=SUBMITTING, graph=ev["json"]["prompt"]), now)
            else:
                r.add(make_job(QUEUED, prompt_id=pid, created_at=now.wall, client_id=client_id,
                               graph=ev["json"]["prompt"], queued_at=now.mono, running_at=0.0, active_at=now.mono),
                      now)
        elif kind == "http_response":
            _on_answer(r, requests[ev["req"]], ev, now, submitted=via_submit and ev["req"] in accepted)
        elif kind in ("http_error", "ws_connect_error"):
            r.broadcast(lc.ComfyDown(ev["error"]), now)
        elif ev.get("conn") in conns:
            if kind == "ws_open":
                if was_up:
                    r.broadcast(lc.ComfyUp(), now)
                ws_up = was_up = True
            elif kind == "ws_close":
                ws_up = False
            elif kind == "ws_text":
                _on_message(r, ev["json"]["type"], ev["json"]["data"], now)
            elif kind == "ws_binary" and ev["event_type_name"].startswith("PREVIEW_IMAGE"):
                pid = (ev["decoded"].get("metadata") or {}).get("prompt_id") or r.running_id
                if pid in r.jobs:
                    r.apply(pid, lc.Preview(), now)
        r.broadcast(lc.Tick(client_id if ws_up else None), now)
    for pid in r.jobs:
        ranks = [STATUS_RANK[status] for status in r.statuses[pid]]
        if SUBMIT not in r.effects[pid]:  # only a resubmit may take a job back to pending
            assert ranks == sorted(set(ranks)), f"{pid}: status went back: {r.statuses[pid]}"
    return r


def _on_message(r: Replay, msg_type: str, data: dict[str, Any], now: lc.Now) -> None:
    prompt_id = data.get("prompt_id")
    if prompt_id not in r.jobs:
        return
    event = lc.event_of(msg_type, data)
    if event is None:
        return
    if isinstance(event, (lc.Started, lc.Progress)):
        r.running_id = prompt_id
    r.apply(prompt_id, event, now)


def _on_answer(r: Replay, request: dict[str, Any], answer: dict[str, Any], now: lc.Now, submitted: bool) -> None:
    body = answer.get("json")
    if submitted:
        r.apply(body["prompt_id"], lc.Submitted(), now)
    elif request["method"] == "GET" and request["path"] == "/queue" and answer["status"] == 200:
        queue = parse_queue(body)
        for pid in list(r.jobs):
            if pid in queue.running:
                r.apply(pid, lc.InQueue(True), now)
            elif queue.position(pid) is not None:
                r.apply(pid, lc.InQueue(False, queue.position(pid)), now)
    elif request["method"] == "GET" and request["path"].startswith("/history/") and body == {}:
        pid = request["path"][len("/history/"):]
        if pid in r.jobs:
            r.apply(pid, lc.Absent(), now)


COMPLETED_RUNS = [
    # (recording, client, [(the file ComfyUI saved, progress max or None) for each prompt it submitted])
    ("a_success", "A", [("t2i_00001_.png", 5)]),
    ("b_cached_rerun", "A", [("t2i_00001_.png", None), ("t2i_b_00001_.png", None), ("t2i_00002_.png", 5)]),
    ("b2_cache_alternation", "A", [("t2i_00021_.png", 2), ("t2i_00022_.png", 2), ("t2i_00023_.png", 2),
                                   ("t2i_00023_.png", None)]),
    ("f_back_to_back", "A", [("t2i_00004_.png", 5), ("t2i_00005_.png", 5)]),
    ("i_previews_and_text", "A_flags", [("t2i_00014_.png", 4)]),
    ("i_previews_and_text", "C_noflags", [("t2i_00015_.png", 4)]),
    ("k_reconnect_midrun", "A", [("t2i_00017_.png", 16)]),
    ("n_builtin_only", "A", [("t2i_empty_00002_.png", None)]),
]


@pytest.mark.parametrize("via_submit", [False, True], ids=["queued", "via-submit"])
@pytest.mark.parametrize("name, label, expected", COMPLETED_RUNS, ids=[f"{n}-{c}" for n, c, _ in COMPLETED_RUNS])
def test_a_recorded_successful_run_completes(name, label, expected, via_submit):
    r = replay(name, label, via_submit=via_submit)
    assert len(r.jobs) == len(expected)
    for (pid, job), (filename, steps) in zip(r.jobs.items(), expected):
        assert (job.phase, job.error, job.images, job.attempt) == (COMPLETED, None, ("x.png",), 1), pid
        assert [ref.filename for ref in r.collected[pid]] == [filename]
        assert r.statuses[pid] == [PENDING, RUNNING, COMPLETED]
        assert {effect.kind for effect in r.effects[pid]} <= {"journal", "fetch_history", "collect", "finished"}
        assert r.effects[pid].count(FINISHED_EFFECT) == 1
        if steps:
            assert max(maximum for _, maximum in r.progress[pid]) == steps
            assert job.progress_value == job.progress_max == steps
        else:
            assert r.progress[pid] == []  # no progress bar in this run: none was shown
            assert job.progress_value == job.progress_max == 1


def test_a_success_completes_with_the_file_comfyui_served():
    view = next(e["path"] for e in recording("a_success")["events"]
                if e["kind"] == "http_request" and e["path"].startswith("/view?"))
    served = parse_qs(urlsplit(view).query)["filename"][0]
    r = replay("a_success", "A")
    (pid, job), = r.jobs.items()
    assert served in [ref.filename for ref in r.collected[pid]]
    assert job.phase == COMPLETED and job.progress_value == job.progress_max == 5
    assert [value for value, _ in r.progress[pid]] == [1, 2, 3, 4, 5]
    assert job.started_at is not None and job.finished_at >= job.started_at


def test_b_cached_rerun_completes_with_the_earlier_file_and_no_progress():
    earlier = images_of(history_entries(recording("a_success"))[prompts_of("a_success")[0]]["outputs"])
    r = replay("b_cached_rerun", "A")
    cached = prompts_of("b_cached_rerun")[0]
    assert r.collected[cached] == tuple(earlier) and earlier[0].filename == "t2i_00001_.png"
    assert r.progress[cached] == [] and r.jobs[cached].phase == COMPLETED


def test_b_cached_rerun_whose_messages_beat_the_post_reply():
    """execution_start came before the 200: the job was running while still submitting, then accepted."""
    r = replay("b_cached_rerun", "A", via_submit=True)
    cached = prompts_of("b_cached_rerun")[0]
    fed = [type(event) for event in r.fed[cached]]
    assert fed.index(lc.Started) < fed.index(lc.Submitted) < fed.index(lc.RunSucceeded)
    assert r.jobs[cached].phase == COMPLETED and r.jobs[cached].attempt == 1


def test_c_failure_fails_with_the_node_type_and_the_exception():
    rec = recording("c_failure")
    reported = {e["json"]["data"]["prompt_id"]: e["json"]["data"] for e in rec["events"]
                if e["kind"] == "ws_text" and e["json"]["type"] == "execution_error"}
    r = replay("c_failure", "A")
    assert len(r.jobs) == 2  # the same failing workflow, submitted twice: failures are not cached
    for pid, job in r.jobs.items():
        data = reported[pid]
        assert job.phase == FAILED
        assert data["node_type"] in job.error and data["exception_message"].strip() in job.error
        assert job.error == outcome_of(r.history[pid]).error  # the websocket and the history agree
        assert FETCH_HISTORY not in r.effects[pid]  # it ended at execution_error, before executing null
        assert r.statuses[pid] == [PENDING, RUNNING, FAILED]
        assert (job.progress_value, job.progress_max) == (2, 5)  # where it stopped


def test_e_interrupt_by_someone_else_fails_the_job():
    r = replay("e_interrupt", "A")
    (pid, job), = r.jobs.items()
    assert (job.phase, job.error) == (FAILED, lc.INTERRUPTED)
    assert r.statuses[pid] == [PENDING, RUNNING, FAILED]
    assert FETCH_HISTORY not in r.effects[pid]
    assert outcome_of(r.history[pid]).status == "interrupted"  # as ComfyUI's history says


def test_e_interrupt_with_our_cancel_in_flight_cancels_the_job():
    pid = prompts_of("e_interrupt")[0]
    cancel = before_request("e_interrupt", pid, lc.CancelRequested(), method="POST", path="/interrupt")
    r = replay("e_interrupt", "A", inject=[cancel])
    job = r.jobs[pid]
    assert (job.phase, job.error) == (CANCELLED, lc.CANCELLED_BY_REQUEST)
    assert WITHDRAW in r.effects[pid] and isinstance(r.fed[pid][-1], lc.RunInterrupted)
    assert r.statuses[pid] == [PENDING, RUNNING, CANCELLED]


def test_e2_prompts_deleted_by_someone_else_are_lost_and_resubmitted():
    running, deleted, cleared, last = prompts_of("e2_targeted_interrupt_and_delete")
    r = replay("e2_targeted_interrupt_and_delete", "A")
    assert (r.jobs[running].phase, r.jobs[running].error) == (FAILED, lc.INTERRUPTED)
    assert r.positions[deleted] == [1] and r.positions[cleared] == [2, 1]
    for pid in (deleted, cleared):
        assert r.jobs[pid].phase == SUBMITTING and r.effects[pid][-2:] == [JOURNAL, SUBMIT]
    assert r.jobs[last].phase == COMPLETED  # an idle interrupt does not touch the next prompt
    assert [ref.filename for ref in r.collected[last]] == ["t2i_empty_00001_.png"]


def test_e2_with_our_cancels_the_stopped_prompts_end_cancelled():
    name = "e2_targeted_interrupt_and_delete"
    running, deleted, cleared, last = prompts_of(name)
    delete = dict(method="POST", path="/queue", json={"delete": [deleted]})
    interrupt = dict(method="POST", path="/interrupt", json={"prompt_id": running})
    r = replay(name, "A", inject=[
        before_request(name, deleted, lc.CancelRequested(), **delete),
        after_answer(name, deleted, lc.StopDone(), **delete),
        before_request(name, running, lc.CancelRequested(), **interrupt),
        after_answer(name, running, lc.StopDone(), **interrupt),
    ])
    for pid in (running, deleted):
        assert (r.jobs[pid].phase, r.jobs[pid].error) == (CANCELLED, lc.CANCELLED_BY_REQUEST)
        assert SUBMIT not in r.effects[pid]  # its empty history later is what the cancel wanted
    assert r.statuses[running] == [PENDING, RUNNING, CANCELLED] and r.statuses[deleted] == [PENDING, CANCELLED]
    assert r.jobs[cleared].phase == SUBMITTING  # cleared by someone else: lost, so submitted again
    assert r.jobs[last].phase == COMPLETED


def test_f_back_to_back_both_complete_one_after_the_other():
    first, second = prompts_of("f_back_to_back")
    r = replay("f_back_to_back", "A")
    assert r.jobs[first].phase == r.jobs[second].phase == COMPLETED
    assert r.positions[first] == [] and r.positions[second] == [1]  # behind the running one
    assert r.entered[first][STARTED] < r.entered[second][STARTED]
    assert r.entered[second][STARTED] >= r.entered[first][COLLECTING]  # ComfyUI runs one prompt at a time
    assert r.jobs[first].started_at < r.jobs[second].started_at <= r.jobs[second].finished_at


@pytest.mark.parametrize("label, frames", [("A_flags", 4), ("C_noflags", 4)])
def test_i_previews_are_counted_and_the_websocket_report_replaces_the_history(label, frames):
    """Type 4 previews name their prompt, type 1 belong to the running one; the images come from the
    `executed` report at execution_success, no GET /history needed (none was recorded)."""
    r = replay("i_previews_and_text", label)
    (pid, job), = r.jobs.items()
    assert job.preview_version == frames
    assert not any(isinstance(event, (lc.HistoryRead, lc.HistoryUnreadable)) for event in r.fed[pid])
    assert FETCH_HISTORY not in r.effects[pid]
    assert job.phase == COMPLETED and r.collected[pid] == job.outputs


def test_h_restart_loses_both_prompts_and_submits_them_again():
    running, pending, after = prompts_of("h_restart")
    r = replay("h_restart", "A")
    for pid in (running, pending):
        job = r.jobs[pid]
        assert (job.phase, job.attempt, job.error) == (SUBMITTING, 1, None)
        assert r.effects[pid][-2:] == [JOURNAL, SUBMIT]
        assert any("Connection refused" in error for error in r.errors[pid])  # told while ComfyUI was down
    assert r.progress[running] and r.jobs[running].progress_value is None  # the new run starts from nothing
    assert r.statuses[running] == [PENDING, RUNNING, PENDING]  # the one way back: a resubmit
    assert r.statuses[pending] == [PENDING]
    assert r.jobs[after].phase == COMPLETED
    assert [ref.filename for ref in r.collected[after]] == ["t2i_00020_.png"]


def test_h_restart_without_resubmits_fails_the_lost_prompts():
    running, pending, _ = prompts_of("h_restart")
    r = replay("h_restart", "A", limits=lc.Limits(job_timeout=600, stall_timeout=120, max_resubmits=0))
    for pid in (running, pending):
        assert (r.jobs[pid].phase, r.jobs[pid].error) == (FAILED, lc.lost_sentence(0))
