"""The page ships with the package: a non-editable install serves it from any working directory.

The project is built into a wheel with this environment's setuptools (no build isolation, no
index: no network) and installed into a fresh virtualenv, which borrows this environment's
site-packages for tornado, pyyaml and prometheus-client. The installed ``t2i-scheduler``
then runs from an unrelated folder, where no ``static/`` exists.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.net import free_port

ROOT = Path(__file__).resolve().parents[1]
# What a build needs of the checkout; the rest (tests, .git, the CI venv) stays behind.
IGNORE = shutil.ignore_patterns(".git", ".ci", ".venv", "venv", ".pytest_cache", "__pycache__", "*.egg-info",
                                "build", "dist", "test-artifacts", "tests", "bench", "docs", "images", "state")


def _run(*args: str | os.PathLike, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, **kwargs)
    assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh virtualenv with t2i installed from a wheel (not editable)."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=IGNORE)
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--wheel-dir", tmp / "dist", source)
    wheel, = (tmp / "dist").glob("t2i-*.whl")
    venv = tmp / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index", wheel)
    # Dependencies from this environment, after the venv's own site-packages (where t2i now is).
    own = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    Path(own, "borrowed-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return venv


@pytest.fixture(scope="module")
def static(venv) -> Path:
    """The page's files as they were built (the checkout may change while the tests run)."""
    return venv.parent / "source" / "static"


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def test_the_installed_package_is_not_the_checkout(venv, static, tmp_path):
    found = _run(venv / "bin" / "python", "-c", "import t2i; print(t2i.__file__)", cwd=tmp_path,
                 env=_clean_env()).stdout.strip()
    assert Path(found).is_relative_to(venv), found
    installed = Path(found).parent / "static"
    assert sorted(p.name for p in installed.iterdir()) == sorted(p.name for p in static.iterdir())


def _get(port: int, path: str) -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()


def _wait_until_listening(process: subprocess.Popen, port: int, timeout: float = 30) -> None:
    """The deadline only bounds a failing start."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise AssertionError(f"t2i-scheduler exited with {process.returncode}: {process.stderr.read()}")
        try:
            http.client.HTTPConnection("127.0.0.1", port, timeout=1).connect()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError("t2i-scheduler never listened") from None
            time.sleep(0.05)


def test_installed_scheduler_serves_the_page_from_any_directory(venv, static, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "workers.yaml").write_text("workers: []\n")
    port = free_port()
    (elsewhere / "scheduler.yaml").write_text(f'listen: "127.0.0.1:{port}"\nworkers_file: workers.yaml\n')
    process = subprocess.Popen([venv / "bin" / "t2i-scheduler", "--config", "scheduler.yaml"], cwd=elsewhere,
                               env=_clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_until_listening(process, port)
        status, content_type, page = _get(port, "/")
        assert status == 200 and content_type.startswith("text/html"), (status, content_type, page[:200])
        assert page == (static / "index.html").read_bytes()
        # The page's stylesheet and scripts, and the modules those import, all from the installed copy.
        wanted = set(re.findall(r'(?:src|href)="\./([\w.-]+\.(?:js|css))"', page.decode()))
        assert "app.js" in wanted and "style.css" in wanted
        seen: set[str] = set()
        while wanted - seen:
            name = sorted(wanted - seen)[0]
            seen.add(name)
            status, content_type, body = _get(port, "/" + name)
            kind = "text/css" if name.endswith(".css") else "javascript"
            assert status == 200 and kind in content_type, (name, status, content_type)
            assert body == (static / name).read_bytes(), name
            if name.endswith(".js"):
                wanted |= set(re.findall(r'from\s+"\./([\w.-]+\.js)"', body.decode()))
        assert len(seen) > 3, seen
        status, content_type, body = _get(port, "/no-such-file.js")
        assert status == 404 and content_type.startswith("application/json"), (status, content_type, body)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stderr.close()


def test_installed_entry_points_answer_help(venv, tmp_path):
    for command in ("t2i-worker", "t2i-demo"):  # t2i-scheduler: served the page above
        result = _run(venv / "bin" / command, "--help", cwd=tmp_path, env=_clean_env())
        assert "usage:" in result.stdout, command
