"""``t2i-worker --check`` and ``t2i-scheduler --check`` as an operator runs them: real processes, exit codes,
one line per thing checked, never a traceback; the ComfyUI test double with and without the model."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import yaml

from support.cluster import WorkerCluster, start_sim, write_worker_yaml, write_workers_yaml
from support.net import free_port
from support.timing import until

MODEL = "v1-5-pruned-emaonly.safetensors"
TEMPLATE = Path(__file__).resolve().parents[1] / "t2i" / "workflows" / "txt2img.json"
# One workflow, spelled out: what is checked does not depend on which built-ins this version has.
WORKFLOWS = {"txt2img": {"file": str(TEMPLATE), "params": {
    "prompt": {"node": "6", "input": "text"}, "seed": {"node": "3", "input": "seed"},
    "steps": {"node": "3", "input": "steps", "default": 20, "min": 1, "max": 150}}}}


async def run(*args: str) -> tuple[int, list[str], str]:
    """(exit code, stdout lines, stderr) of ``python -m <args>``."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    stderr = err.decode()
    assert "Traceback" not in stderr, stderr
    return proc.returncode, out.decode().splitlines(), stderr


def worker_yaml(tmp_path: Path, comfy_url: str, **overrides) -> Path:
    return write_worker_yaml(tmp_path, comfy_url, workflows=WORKFLOWS, state_dir=str(tmp_path / "state"),
                             **overrides)


# --- the worker -------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_worker_check_passes_when_comfyui_has_the_model(tmp_path):
    sim = await start_sim(checkpoints=(MODEL, "sd_xl_base_1.0.safetensors"))
    try:
        code, lines, _ = await run("t2i.worker", "--config", str(worker_yaml(tmp_path, sim.url)), "--check")
    finally:
        await sim.stop()
    assert code == 0, lines
    assert lines == [f"ComfyUI at {sim.url}: reachable (version 0.3.64)", "txt2img: ready"]
    # A check starts nothing: no journal, no image folder.
    assert not (tmp_path / "state").exists() and not (tmp_path / "images").exists()


@pytest.mark.gen_test(timeout=60)
async def test_worker_check_names_the_missing_model_and_what_comfyui_has(tmp_path):
    sim = await start_sim(checkpoints=("sd_xl_base_1.0.safetensors",))
    try:
        code, lines, _ = await run("t2i.worker", "--config", str(worker_yaml(tmp_path, sim.url)), "--check")
    finally:
        await sim.stop()
    assert code == 1, lines
    assert lines[1:] == [f"txt2img: ComfyUI has no checkpoint {MODEL} (it has: sd_xl_base_1.0.safetensors)"]


@pytest.mark.gen_test(timeout=60)
async def test_worker_check_says_comfyui_is_unreachable_and_config_errors_exit_2(tmp_path):
    port = free_port()
    config = worker_yaml(tmp_path, f"http://127.0.0.1:{port}")
    code, lines, _ = await run("t2i.worker", "--config", str(config), "--check")
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith(f"ComfyUI is not reachable at http://127.0.0.1:{port}"), lines

    config.write_text(config.read_text() + "job_timeot: 5\n")
    code, lines, stderr = await run("t2i.worker", "--config", str(config), "--check")
    assert code == 2 and lines == []
    assert stderr.strip().splitlines() == [stderr.strip()] and "job_timeot" in stderr, stderr


# --- the scheduler ----------------------------------------------------------------------

def scheduler_yaml(directory: Path, workers: list[dict], **overrides) -> Path:
    write_workers_yaml(directory / "workers.yaml", workers)
    config = {"listen": f"127.0.0.1:{free_port()}", "workers_file": "workers.yaml", **overrides}
    path = directory / "scheduler.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def checked(cluster: WorkerCluster) -> None:
    await until(lambda: cluster.worker.runner.readiness.checked_at, what="the worker's first readiness check")


@pytest.mark.gen_test(timeout=60)
async def test_scheduler_check_passes_with_ready_workers_and_skips_disabled_ones(tmp_path):
    async with WorkerCluster(tmp_path / "a", workflows=WORKFLOWS, auth_token="s3cret") as c:
        await checked(c)
        config = scheduler_yaml(tmp_path, [{"name": "gpu-a", "url": c.url},
                                           {"name": "gpu-off", "url": "http://127.0.0.1:9", "enabled": False}],
                                auth_token="s3cret")
        code, lines, _ = await run("t2i.scheduler", "--config", str(config), "--check")
    assert code == 0, lines
    assert lines[0].startswith("page: served from ") and lines[0].endswith("static")
    assert lines[1:] == [f"gpu-a: reachable at {c.url}, token accepted", "gpu-a: txt2img: ready",
                         "gpu-off: disabled in workers.yaml, not checked"]


@pytest.mark.gen_test(timeout=60)
async def test_scheduler_check_reports_a_missing_model_a_refused_token_and_an_unreachable_worker(tmp_path):
    down = f"http://127.0.0.1:{free_port()}"
    async with WorkerCluster(tmp_path / "a", sim={"checkpoints": ("other.safetensors",)}, name="gpu-a",
                             workflows=WORKFLOWS) as a, \
            WorkerCluster(tmp_path / "b", name="gpu-b", workflows=WORKFLOWS, auth_token="s3cret") as b:
        await checked(a)
        await checked(b)
        config = scheduler_yaml(tmp_path, [{"name": "gpu-a", "url": a.url}, {"name": "gpu-b", "url": b.url},
                                           {"name": "gpu-c", "url": down}], auth_token="wrong")
        code, lines, _ = await run("t2i.scheduler", "--config", str(config), "--check")
    assert code == 1, lines
    assert f"gpu-a: txt2img: ComfyUI has no checkpoint {MODEL} (it has: other.safetensors)" in lines
    assert "gpu-b: refused the scheduler's token: auth_token in scheduler.yaml differs from the worker's" in lines
    assert any(line.startswith(f"gpu-c: not reachable at {down} (") for line in lines), lines


@pytest.mark.gen_test(timeout=60)
async def test_scheduler_check_config_errors_exit_2(tmp_path):
    config = scheduler_yaml(tmp_path, [{"name": "gpu-a", "url": "http://127.0.0.1:9"}])
    (tmp_path / "workers.yaml").write_text("workers:\n  - {name: gpu-a}\n")
    code, lines, stderr = await run("t2i.scheduler", "--config", str(config), "--check")
    assert code == 2 and lines == [] and "workers.yaml" in stderr, stderr


@pytest.mark.gen_test(timeout=10)
async def test_a_check_that_fails_unforeseen_is_one_line_and_exit_1():
    from t2i.check import _guarded

    async def broken() -> int:
        raise RuntimeError("disk on fire")

    lines: list[str] = []
    assert await _guarded(broken(), lines.append) == 1
    assert lines == ["the check itself failed: RuntimeError: disk on fire"]
