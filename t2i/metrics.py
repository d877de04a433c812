"""Prometheus metrics of both servers, and the ``GET /metrics`` handler.

Metrics live in prometheus-client's default registry; several workers in one
process (the demo, the tests) are told apart by the ``worker`` label.
"""

from __future__ import annotations

import logging
import re
import weakref
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from tornado import web

from t2i.gcpolicy import PAUSE_BUCKETS, PAUSES, STATS  # importing it starts timing every collection
from t2i.web import JSONHandler

log = logging.getLogger(__name__)

JOBS_SUBMITTED = Counter("t2i_jobs_submitted_total", "Jobs accepted by ComfyUI", ["worker"])
JOBS_FINISHED = Counter("t2i_jobs_finished_total", "Jobs that ended, by outcome",
                        ["worker", "status"])
JOB_DURATION = Histogram("t2i_job_duration_seconds", "Submit-to-finish time of completed jobs",
                         ["worker"], buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600))
QUEUE_DEPTH = Gauge("t2i_queue_depth", "Jobs waiting or running, by state", ["worker", "state"])
POLL_REQUESTS = Counter("t2i_poll_requests_total", "GET /status requests served", ["server"])
COMFYUI_RECONNECTS = Counter("t2i_comfyui_ws_reconnects_total",
                             "Websocket (re)connections to ComfyUI after the first", ["worker"])
COMFYUI_STALLS = Counter("t2i_comfyui_stalls_total",
                         "Jobs failed because ComfyUI made no progress for stall_timeout", ["worker"])
JOBS_RESUBMITTED = Counter("t2i_jobs_resubmitted_total",
                           "Jobs submitted again after ComfyUI lost them (it restarted)", ["worker"])
JOBS_REATTACHED = Counter("t2i_jobs_reattached_total",
                          "Unfinished jobs read back from the journal at start-up and followed again", ["worker"])
JOURNAL_WRITES = Counter("t2i_journal_writes_total", "Job rows written to the journal", ["worker"])
JOURNAL_ERRORS = Counter("t2i_journal_errors_total", "Journal commits that failed", ["worker"])
PRUNED = Counter("t2i_pruned_total", "Items removed by retention, by kind (tasks, images, comfyui_files)",
                 ["worker", "kind"])
PRUNED_BYTES = Counter("t2i_pruned_bytes_total", "Image bytes removed by retention", ["worker"])
CONFIG_RELOADS = Counter("t2i_config_reloads_total", "workers.yaml reloads, by result (ok, failed)",
                         ["result"])
SCHEDULER_ROUTED = Counter("t2i_scheduler_routed_total", "Jobs the scheduler placed, by worker", ["worker"])
# Per client name (all anonymous clients are "anonymous": an address each would be unbounded).
CLIENT_ACCEPTED = Counter("t2i_client_jobs_accepted_total", "Jobs the scheduler placed, by client", ["client"])
CLIENT_THROTTLED = Counter("t2i_client_throttled_total", "POST /generate answered 429 (the client held max_jobs "
                           "unfinished jobs), by client", ["client"])
# Where a job's time went, from its record: created_at -> started_at (waiting in ComfyUI's queue) ->
# finished_at (running, images copied). Observed when the job ends, for jobs that started.
_JOB_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
JOB_QUEUE_WAIT = Histogram("t2i_job_queue_wait_seconds", "Time from acceptance until ComfyUI started the job",
                           ["worker"], buckets=_JOB_BUCKETS)
JOB_RUN_TIME = Histogram("t2i_job_run_seconds", "Time from ComfyUI starting the job until it ended, by outcome",
                         ["worker", "status"], buckets=_JOB_BUCKETS)
# Every answer of both servers, by route template (t2i/openapi.yaml's; "page" for the page's files,
# "unknown" for paths no route claims) and status class; long-polls count their wait.
REQUEST_DURATION = Histogram("t2i_http_request_duration_seconds", "Time to answer a request",
                             ["server", "route", "method", "status_class"],
                             buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
REJECTIONS = Counter("t2i_http_rejections_total", "503 and 429 answers (try again later), by route and reason",
                     ["server", "route", "status", "reason"])


class MetricsHandler(JSONHandler):
    """``GET /metrics`` in the Prometheus text format (its errors are JSON, like every other route's)."""

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest() + pool_metrics(self.application) + client_metrics(self.application)
                    + gc_metrics())


# --- jobs ----------------------------------------------------------------------------------

def observe_job(worker: str, job: Any) -> None:
    """A job ended: its queue wait and run time (jobs that never started have neither)."""
    started, finished = getattr(job, "started_at", None), getattr(job, "finished_at", None)
    if started is None:
        return
    JOB_QUEUE_WAIT.labels(worker).observe(max(0.0, started - job.created_at))
    if finished is not None:
        JOB_RUN_TIME.labels(worker, job.status).observe(max(0.0, finished - started))


# --- requests ------------------------------------------------------------------------------

_SERVER_OF: "weakref.WeakKeyDictionary[web.Application, str]" = weakref.WeakKeyDictionary()


def server_of(application: web.Application) -> str:
    """"worker" or "scheduler": which of t2i's servers an application is (both may share a process)."""
    kind = _SERVER_OF.get(application)
    if kind is None:
        modules = {getattr(rule.target, "__module__", "") or "" for rule in application.wildcard_router.rules}
        kind = next((name for name in ("scheduler", "worker") if any(m.startswith(f"t2i.{name}") for m in modules)),
                    "other")
        _SERVER_OF[application] = kind
    return kind


def route_of(handler: web.RequestHandler) -> str:
    """The route template a request fell under: a bounded label, never the raw path."""
    from t2i.openapi import match_path

    template = match_path(handler.request.path)
    if template is not None:
        return template
    return "page" if isinstance(handler, web.StaticFileHandler) else "unknown"


def rejection_reason(handler: web.RequestHandler, route: str) -> str:
    """Why a 503/429 was answered, as a short label: the exception behind the API error when there is one
    (``workflow_not_ready``, ``comfyui_unavailable``, ``no_worker_available``, ``journal_error`` ...)."""
    exc = getattr(handler, "error_exc", None)
    cause = getattr(exc, "__cause__", None) or getattr(exc, "__context__", None)
    if cause is not None:
        return _snake(type(cause).__name__)
    if route == "/health":
        return "unhealthy"
    return "rate_limited" if handler.get_status() == 429 else "unavailable"


def _snake(name: str) -> str:
    name = name.replace("ComfyUI", "Comfyui")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def observe_request(handler: web.RequestHandler) -> None:
    """One answer: its latency, and a 503/429 by reason (called by t2i.web.log_request)."""
    try:
        status = handler.get_status()
        server = server_of(handler.application)
        route = route_of(handler)
        REQUEST_DURATION.labels(server, route, handler.request.method or "", f"{status // 100}xx").observe(
            handler.request.request_time())
        if status in (429, 503):
            REJECTIONS.labels(server, route, str(status), rejection_reason(handler, route)).inc()
    except Exception:  # metrics never break an answer
        log.exception("observing a request failed")


# --- the scheduler's pool, read at scrape time ---------------------------------------------

def pool_metrics(application: web.Application) -> bytes:
    """The scheduler's view of each worker, from the Placement its routes were given (nothing on a worker).

    Read when scraped, so it is never stale and several schedulers in one process (the demo,
    the tests) each report their own pool.
    """
    placement = next((rule.target_kwargs["placement"] for rule in application.wildcard_router.rules
                      if "placement" in (rule.target_kwargs or {})), None)
    if placement is None:
        return b""
    up = GaugeMetricFamily("t2i_scheduler_worker_up", "Worker answered its last health check (1) or not (0)",
                           labels=["worker"])
    routable = GaugeMetricFamily("t2i_scheduler_worker_routable", "Worker can be given new jobs now (1) or not (0)",
                                 labels=["worker"])
    ready = GaugeMetricFamily("t2i_scheduler_worker_ready_workflows",
                              "Workflows the worker's ComfyUI can run now", labels=["worker"])
    queue = GaugeMetricFamily("t2i_scheduler_worker_queue", "Worker's jobs waiting or running, as the scheduler "
                              "sees them", labels=["worker", "state"])
    for worker in placement.describe():
        if not worker.get("listed", True):
            continue
        name = worker["name"]
        up.add_metric([name], 1.0 if worker.get("reachable") else 0.0)
        routable.add_metric([name], 1.0 if worker.get("routable") else 0.0)
        ready.add_metric([name], float(sum(1 for w in (worker.get("workflows") or {}).values()
                                           if isinstance(w, dict) and w.get("ready") is True)))
        queue.add_metric([name, "pending"], float(worker.get("pending") or 0))
        queue.add_metric([name, "running"], float(worker.get("running") or 0))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed([up, routable, ready, queue]))
    return generate_latest(registry)


def client_metrics(application: web.Application) -> bytes:
    """Unfinished jobs per client, from the Clients the scheduler's routes were given (read when scraped)."""
    clients = next((rule.target_kwargs["clients"] for rule in application.wildcard_router.rules
                    if "clients" in (rule.target_kwargs or {})), None)
    if clients is None:
        return b""
    from t2i.scheduler.clients import metric_label

    unfinished = GaugeMetricFamily("t2i_client_unfinished_jobs", "Unfinished jobs each client holds, as this "
                                   "scheduler counts them for max_jobs", labels=["client"])
    totals: dict[str, float] = {name: 0.0 for name in clients.names}
    for client in clients.index.clients():
        label = metric_label(client)
        totals[label] = totals.get(label, 0.0) + clients.index.held(client)
    for label, value in sorted(totals.items()):
        unfinished.add_metric([label], value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed([unfinished]))
    return generate_latest(registry)


# --- the garbage collector (process-wide), read at scrape time --------------------------------

def gc_metrics() -> bytes:
    """Every collection's pause by generation (t2i.gcpolicy times them from start-up) and what the GC
    policy did: a long pause shows here first. (Not the frozen count: gc.get_freeze_count() walks
    the whole frozen list, tens of ms on the event loop.)"""
    pauses = HistogramMetricFamily("t2i_gc_pause_seconds", "Garbage collection passes by generation (2: full) "
                                   "and how long each held the process (wall clock)", labels=["generation"])
    for generation in range(3):
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, PAUSE_BUCKETS), "+Inf"], PAUSES.buckets[generation]):
            cumulative += count
            buckets.append((bound, cumulative))
        pauses.add_metric([str(generation)], buckets, PAUSES.seconds[generation])
    longest = GaugeMetricFamily("t2i_gc_longest_pause_seconds", "The longest garbage collection pass since "
                                "start-up, by generation", labels=["generation"])
    for generation in range(3):
        longest.add_metric([str(generation)], PAUSES.longest[generation])
    freezes = CounterMetricFamily("t2i_gc_freezes", "Young collections followed by gc.freeze (GC policy)",
                                  STATS.freezes)
    compactions = CounterMetricFamily("t2i_gc_compactions", "Compactions: unfreeze, full collection, freeze "
                                      "again (GC policy; each is a full pass over every object)", STATS.compactions)
    freed = GaugeMetricFamily("t2i_gc_compaction_freed_objects", "Cyclic garbage the last compaction freed "
                              "(frozen while alive, a cycle once dead)", STATS.last_compaction_freed)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed([pauses, longest, freezes, compactions, freed]))
    return generate_latest(registry)


class _Fixed:
    """A collector of metric families computed beforehand."""

    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)
