"""worker.yaml / scheduler.yaml / workers.yaml loading: defaults, and one clear line per mistake."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from t2i.config import (ConfigError, load_scheduler_config, load_worker_config, load_workers_file)

REPO = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_example_worker_yaml_loads_with_every_documented_key():
    config = load_worker_config(REPO / "config" / "worker.yaml")
    assert config.name == "gpu-a"
    assert (config.listen_host, config.listen_port) == ("0.0.0.0", 8001)
    assert config.public_url == "http://gpu-a.lan:8001"
    assert config.auth_token is None
    assert config.job_timeout == 600
    assert config.allow_raw_workflows is False
    assert config.comfyui.url == "http://127.0.0.1:8188"
    assert config.comfyui.output_dir is None
    assert config.images_dir == (REPO / "config" / "images").resolve()
    assert config.retention.task_ttl == 3600 and config.retention.image_max_bytes is None
    assert config.default_workflow == "txt2img"
    steps = config.workflows["txt2img"].params["steps"]
    assert (steps.node, steps.input, steps.default, steps.min, steps.max) == ("3", "steps", 20, 1, 150)
    assert config.workflows["txt2img"].template["9"]["class_type"] == "SaveImage"


def test_minimal_worker_yaml_gets_defaults_and_the_packaged_template(tmp_path):
    config = load_worker_config(write(tmp_path / "w.yaml", "listen: '127.0.0.1:9001'\n"))
    assert config.public_url == "http://127.0.0.1:9001"
    assert config.images_dir == tmp_path / "images"
    # 1 MiB plus one base64 image of max_image_bytes (8 MiB): the built-in img2img takes one
    assert config.job_timeout == 600 and config.max_body_bytes == 1_048_576 + 11_184_812
    assert config.comfyui.connect_timeout == 5 and config.comfyui.request_timeout == 30
    assert set(config.workflows["txt2img"].params) == {"prompt", "negative_prompt", "seed", "steps", "width",
                                                       "height", "cfg", "sampler_name", "scheduler", "batch_size"}
    assert config.workflows["img2img"].params["image"].type == "image"


def test_empty_file_is_all_defaults(tmp_path):
    config = load_worker_config(write(tmp_path / "w.yaml", ""))
    assert config.listen_port == 8001


@pytest.mark.parametrize("text, line, key, problem", [
    ("listen: '127.0.0.1:1'\njob_timout: 5\n", 2, "job_timout", "unknown key (did you mean 'job_timeout'?)"),
    ("comfyui:\n  url: http://x:1\n  urll: 2\n", 3, "comfyui.urll", "unknown key (did you mean 'url'?)"),
    ("colour: blue\n", 1, "colour", "unknown key"),
    ("job_timeout: soon\n", 1, "job_timeout", "must be a number, got 'soon'"),
    ("allow_raw_workflows: 1\n", 1, "allow_raw_workflows", "must be true or false"),
    ("job_timeout: true\n", 1, "job_timeout", "must be a number"),
    ("listen: 8001\n", 1, "listen", "must be a string"),
    ("listen: 'nohost'\n", 1, "listen", "must be host:port"),
    ("\ncomfyui:\n  url: ftp://x\n", 3, "comfyui.url", "must be an http:// or https:// URL"),
    ("retention:\n  image_max_count: -1\n", 2, "retention.image_max_count", "must be at least 0"),
    ("default_workflow: nope\n", 1, "default_workflow", "names no workflow"),
    ("job_timeout: 1\njob_timeout: 2\n", 2, "job_timeout", "duplicate key"),
    ("job_timeout: .nan\n", 1, "job_timeout", "must be a finite number"),
    ("retention:\n  interval: .inf\n", 2, "retention.interval", "must be a finite number"),
])
def test_worker_yaml_mistakes_name_file_line_and_key(tmp_path, text, line, key, problem):
    path = write(tmp_path / "w.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_worker_config(path)
    err = info.value
    assert (err.line, err.key) == (line, key)
    assert problem in err.problem
    assert str(err).startswith(f"{path}:{line}: {key}: ")


def test_bad_yaml_is_a_config_error_with_a_line(tmp_path):
    path = write(tmp_path / "w.yaml", "listen: '127.0.0.1:1'\ncomfyui: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_worker_config(path)
    assert info.value.line is not None and "invalid YAML" in str(info.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_worker_config(tmp_path / "nope.yaml")


def test_workflow_mistakes(tmp_path):
    (tmp_path / "wf.json").write_text('{"3": {"class_type": "KSampler", "inputs": {"seed": 0}}}')
    base = "workflows:\n  mine:\n    file: wf.json\n    params:\n"
    cases = [
        (base + "      seed: {node: '9', input: seed}\n", "node '9' is not in the workflow file"),
        (base + "      seed: {node: '3', input: sed}\n", "has no input 'sed'"),
        (base + "      workflow: {node: '3', input: seed}\n", "is a request field of its own"),
        (base + "      steps: {node: '3', input: seed, min: 5, max: 1}\n", "greater than max"),
        ("workflows:\n  mine:\n    file: missing.json\n", "not found"),
        ("workflows: {}\n", "at least one workflow"),
    ]
    for text, problem in cases:
        with pytest.raises(ConfigError) as info:
            load_worker_config(write(tmp_path / "w.yaml", text))
        assert problem in str(info.value), text
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a ComfyUI API-format workflow"):
        load_worker_config(write(tmp_path / "w.yaml", "workflows:\n  mine:\n    file: bad.json\n"))


def test_scheduler_and_workers_files(tmp_path):
    config = load_scheduler_config(write(tmp_path / "s.yaml", "listen: '127.0.0.1:8000'\nreload_interval: 1\n"))
    assert config.workers_file == tmp_path / "workers.yaml" and config.reload_interval == 1
    workers = load_workers_file(write(tmp_path / "workers.yaml", (
        "workers:\n  - name: a\n    url: http://10.0.0.1:8001\n"
        "  - name: b\n    url: http://10.0.0.2:8001\n    public_url: http://b.lan:8001\n    max_queue: 2\n")))
    assert [(w.name, w.public_url, w.max_queue) for w in workers] == [
        ("a", "http://10.0.0.1:8001", None), ("b", "http://b.lan:8001", 2)]  # None: as many as the worker holds
    with pytest.raises(ConfigError, match="duplicate worker name"):
        load_workers_file(write(tmp_path / "workers.yaml", (
            "workers:\n  - name: a\n    url: http://x:1\n  - name: a\n    url: http://y:1\n")))


def run_worker_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "t2i.worker", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def test_cli_config_mistake_is_one_line_and_exit_code_2(tmp_path):
    path = write(tmp_path / "bad.yaml", "listen: '127.0.0.1:1'\njob_timeout: soon\n")
    result = run_worker_cli("--config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"config error: {path}:2: job_timeout: must be a number, got 'soon'"]
    missing = run_worker_cli("--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip() == f"config error: {tmp_path / 'nope.yaml'}: file not found"
    # An images folder that cannot be made is a config mistake too, found at start-up.
    (tmp_path / "a-file").write_text("not a folder")
    path = write(tmp_path / "images.yaml", f"listen: '127.0.0.1:0'\nimages:\n  dir: {tmp_path / 'a-file' / 'images'}\n")
    result = run_worker_cli("--config", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("config error")] == [
        f"config error: {path}: images.dir: cannot use {tmp_path / 'a-file' / 'images'} for images: Not a directory"]


def test_cli_help_and_version():
    result = run_worker_cli("--help")
    assert result.returncode == 0 and "--config" in result.stdout and "--log-level" in result.stdout
    version = run_worker_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("t2i-worker ")
