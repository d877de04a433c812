"""Prometheus metrics of both servers, and the ``GET /metrics`` handler.

Metrics live in prometheus-client's default registry; several workers in one
process (the demo, the tests) are told apart by the ``worker`` label.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from t2i.web import JSONHandler

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


class MetricsHandler(JSONHandler):
    """``GET /metrics`` in the Prometheus text format (its errors are JSON, like every other route's)."""

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest())
