"""Observability: what /metrics exposes, and config/grafana-dashboard.json asks only for metrics that exist.

A live pool (scheduler, two workers, ComfyUI doubles; the second without the model) does some work,
then both servers' /metrics are read: every metric a dashboard query names must be there, and the
new series (request latency, 503s by reason, queue wait and run time, the scheduler's pool gauges)
carry the values that work implies.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.cluster import SchedulerCluster, call, wait_status
from support.timing import until

DASHBOARD = Path(__file__).resolve().parents[1] / "config" / "grafana-dashboard.json"
# PromQL words that look like metric names but are not.
PROMQL_WORDS = {"sum", "max", "min", "count", "by", "rate", "increase", "histogram_quantile", "le", "without",
                "avg", "on", "ignoring"}


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [target["expr"] for panel in panels for target in panel.get("targets", [])]
    assert len(exprs) > 20
    return exprs


def metric_names(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_labels = re.sub(r"\{[^}]*\}|\bby \([^)]*\)|\[[^\]]*\]", "", without_strings)
    return {name for name in re.findall(r"\b[a-z_][a-z0-9_]*\b", without_labels) if name not in PROMQL_WORDS}


def exposed(text: str) -> dict[str, list]:
    """Every series name /metrics declares (histogram parts and counters' _total included), with its samples."""
    names: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        parts = {"histogram": ("_bucket", "_count", "_sum", "_created"), "counter": ("_total", "_created")}
        for suffix in parts.get(family.type, ("",)):
            names.setdefault(family.name + suffix, [])
        for sample in family.samples:
            names.setdefault(sample.name, []).append(sample)
    return names


def value(names: dict[str, list], name: str, **labels: str) -> float | None:
    for sample in names.get(name, []):
        if all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    return None


@pytest.mark.gen_test(timeout=60)
async def test_dashboard_queries_name_only_metrics_the_servers_expose_and_they_carry_the_work_done(tmp_path):
    async with SchedulerCluster(tmp_path, n=2, sims=[{}, {"checkpoints": ("other.safetensors",)}]) as c:
        await _exercise_and_check(c)


async def _exercise_and_check(c: SchedulerCluster) -> None:
    scheduler, ready, unready = c.scheduler, c.workers[0], c.workers[1]

    async def pool_known():
        names = exposed((await call("GET", scheduler.url + "/metrics")).body.decode())
        known = (value(names, "t2i_scheduler_worker_ready_workflows", worker="gpu-0") or 0) >= 1 \
            and value(names, "t2i_scheduler_worker_ready_workflows", worker="gpu-1") == 0
        return names if known else None

    await until(pool_known, what="the scheduler to know which worker can run txt2img")
    # Work: a job through the scheduler, the page, and a 503 from the worker without the model.
    submitted = await call("POST", scheduler.url + "/generate", {"prompt": "a red fox", "steps": 2})
    assert submitted.code == 200 and submitted.json["worker"] == "gpu-0", submitted
    assert (await wait_status(scheduler.url, submitted.json["prompt_id"]))["status"] == "completed"
    assert (await call("GET", scheduler.url + "/")).code == 200
    refused = await call("POST", unready.url + "/generate", {"prompt": "a red fox", "workflow": "txt2img"})
    assert refused.code == 503 and refused.json.get("workflow_not_ready"), refused

    on_scheduler = exposed((await call("GET", scheduler.url + "/metrics")).body.decode())
    on_worker = exposed((await call("GET", ready.url + "/metrics")).body.decode())
    missing = {name: expr for expr in dashboard_queries() for name in metric_names(expr)
               if name not in on_scheduler and name not in on_worker}
    assert not missing, f"dashboard queries name metrics no server exposes: {missing}"

    # The pool, as the scheduler sees it.
    assert value(on_scheduler, "t2i_scheduler_worker_up", worker="gpu-0") == 1
    assert value(on_scheduler, "t2i_scheduler_worker_routable", worker="gpu-0") == 1
    assert value(on_scheduler, "t2i_scheduler_worker_queue", worker="gpu-0", state="pending") is not None
    assert "t2i_scheduler_worker_up" not in on_worker  # a worker has no pool
    # Request latency per route and status class, on each server.
    for server, route, status_class in (("scheduler", "/generate", "2xx"), ("worker", "/generate", "2xx"),
                                        ("scheduler", "page", "2xx"), ("worker", "/generate", "5xx")):
        assert value(on_scheduler, "t2i_http_request_duration_seconds_count", server=server, route=route,
                     status_class=status_class), (server, route, status_class)
    # The 503 by the reason behind it.
    assert value(on_worker, "t2i_http_rejections_total", server="worker", route="/generate", status="503",
                 reason="workflow_not_ready")
    # Queue wait and run time of the job, from its record.
    assert value(on_worker, "t2i_job_queue_wait_seconds_count", worker="gpu-0")
    assert value(on_worker, "t2i_job_run_seconds_count", worker="gpu-0", status="completed")


def test_metric_names_are_read_from_queries_without_functions_or_labels():
    expr = ('histogram_quantile(0.95, sum by (le, route) (rate(t2i_http_request_duration_seconds_bucket'
            '{route!~"/status/.*|jobs"}[5m]))) / sum(t2i_scheduler_worker_up)')
    assert metric_names(expr) == {"t2i_http_request_duration_seconds_bucket", "t2i_scheduler_worker_up"}
