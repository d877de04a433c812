"""config/nginx-t2i.conf as shipped: ``nginx -t`` accepts it, and with nginx (Debian's package) in front of two
scheduler processes, one killed mid-run, every job is still placed and answered, over HTTPS, and images come
through nginx from the worker with their immutable caching.

Only addresses, ports and certificate paths of the file are rewritten (to loopback and a throw-away
self-signed certificate); every other line is the operator's.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from support.cluster import WorkerCluster, write_workers_yaml
from support.net import free_port
from support.timing import until

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "config" / "nginx-t2i.conf"
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
OPENSSL = shutil.which("openssl")

pytestmark = [
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian: apt-get install nginx; .ci/run does)"),
    pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed (for a throw-away certificate)"),
]

# The example's addresses, by role.
SCHEDULERS = ("10.0.0.5:8000", "10.0.0.6:8000")
WORKERS = {"gpu-a": "10.0.0.11:8001", "gpu-b": "10.0.0.12:8001"}


def site_for_test(tmp: Path, https_port: int, http_port: int, addresses: dict[str, str]) -> Path:
    """The shipped file with loopback addresses, free ports and a self-signed certificate."""
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    if not cert.exists():
        subprocess.run([OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True, timeout=30)
    text = SITE.read_text()
    replaced = {
        r"ssl_certificate\s+\S+;": f"ssl_certificate {cert};",
        r"ssl_certificate_key\s+\S+;": f"ssl_certificate_key {key};",
        r"listen 443 ssl http2;": f"listen 127.0.0.1:{https_port} ssl http2;",
        r"listen 80;": f"listen 127.0.0.1:{http_port};",
        r"listen \[::\]:\d+[^;]*;": "",
    }
    for pattern, replacement in replaced.items():
        text, count = re.subn(pattern, replacement, text)
        assert count, f"{pattern!r} is no longer in {SITE.name}: update this test"
    for example, actual in addresses.items():
        text, count = re.subn(rf"\bserver {re.escape(example)}\b", f"server {actual}", text)
        assert count == 1, example
    left = re.findall(r"\bserver 10\.\S+", text)
    assert not left, f"addresses this test does not replace: {left}"
    site = tmp / "t2i.conf"
    site.write_text(text)
    main = tmp / "nginx.conf"
    temp = "\n".join(f"    {kind}_temp_path {tmp / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                           "scgi"))
    main.write_text(f"""daemon off;
master_process off;
pid {tmp / 'nginx.pid'};
error_log {tmp / 'error.log'} info;
events {{ worker_connections 256; }}
http {{
    access_log {tmp / 'access.log'};
{temp}
    include {site};
}}
""")
    return main


def nginx(main: Path, *args: str) -> list[str]:
    return [NGINX, "-p", str(main.parent), "-c", str(main), "-e", str(main.parent / "error.log"), *args]


def test_the_shipped_config_passes_nginx_t(tmp_path):
    addresses = {address: f"127.0.0.1:{free_port()}" for address in (*SCHEDULERS, *WORKERS.values())}
    main = site_for_test(tmp_path, free_port(), free_port(), addresses)
    result = subprocess.run(nginx(main, "-t"), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr and "test is successful" in result.stderr


# --- two schedulers behind nginx, one killed ----------------------------------------------

async def fetch(method: str, url: str, body=None):
    request = HTTPRequest(url, method=method, body=json.dumps(body) if body is not None else None,
                          headers={"Content-Type": "application/json"} if body is not None else None,
                          validate_cert=False, connect_timeout=5, request_timeout=30, follow_redirects=False)
    try:
        response = await AsyncHTTPClient().fetch(request, raise_error=False)
    except OSError as exc:  # refused: not listening (yet, or any more)
        raise ConnectionError(f"{method} {url}: {exc}") from None
    if response.code == 599:
        raise ConnectionError(f"{method} {url}: {response.error}")
    return response


class SchedulerProcess:
    def __init__(self, directory: Path, port: int):
        self.directory, self.port = directory, port
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> "SchedulerProcess":
        config = self.directory / f"scheduler-{self.port}.yaml"  # the replicas share workers.yaml
        config.write_text(yaml.safe_dump({"listen": f"127.0.0.1:{self.port}", "workers_file": "workers.yaml",
                                          "health_interval": 0.5, "reload_interval": 0.5}))
        with open(self.directory / f"scheduler-{self.port}.log", "wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "t2i.scheduler", "--config", str(config), cwd=self.directory,
                stdout=log, stderr=asyncio.subprocess.STDOUT)
        return self

    async def routable(self) -> bool:
        assert self.proc.returncode is None, (self.directory / f"scheduler-{self.port}.log").read_text()
        try:
            response = await fetch("GET", f"http://127.0.0.1:{self.port}/health")
        except ConnectionError:
            return False
        return response.code == 200

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.mark.gen_test(timeout=90)
async def test_nginx_fails_over_between_two_schedulers(tmp_path):
    https_port = free_port()
    base = f"https://127.0.0.1:{https_port}"
    schedulers: list[SchedulerProcess] = []
    server = None
    async with WorkerCluster(tmp_path / "gpu-a", name="gpu-a", public_url=f"{base}/gpu-a") as c:
        try:
            shared = tmp_path / "schedulers"
            shared.mkdir()
            write_workers_yaml(shared / "workers.yaml", [{"name": "gpu-a", "url": c.url,
                                                          "public_url": f"{base}/gpu-a"}])
            schedulers = [await SchedulerProcess(shared, free_port()).start() for _ in range(2)]
            addresses = {SCHEDULERS[0]: f"127.0.0.1:{schedulers[0].port}",
                         SCHEDULERS[1]: f"127.0.0.1:{schedulers[1].port}",
                         WORKERS["gpu-a"]: c.url.removeprefix("http://"),
                         WORKERS["gpu-b"]: f"127.0.0.1:{free_port()}"}  # listed, never started
            (tmp_path / "nginx").mkdir()
            http_port = free_port()
            main = site_for_test(tmp_path / "nginx", https_port, http_port, addresses)
            server = await asyncio.create_subprocess_exec(*nginx(main), stdout=asyncio.subprocess.DEVNULL,
                                                          stderr=asyncio.subprocess.DEVNULL)
            for scheduler in schedulers:
                await until(scheduler.routable, timeout=30, interval=0.05, what="a scheduler that can place jobs")

            async def nginx_up() -> bool:
                assert server.returncode is None, (tmp_path / "nginx" / "error.log").read_text()
                try:
                    return (await fetch("GET", base + "/health")).code == 200
                except ConnectionError:
                    return False

            await until(nginx_up, timeout=30, interval=0.05, what="nginx")

            async def place(n: int) -> list[str]:
                ids = []
                for i in range(n):
                    response = await fetch("POST", base + "/generate", {"prompt": f"fox {len(ids)} {i}", "steps": 2})
                    assert response.code == 200, response.body
                    ids.append(json.loads(response.body)["prompt_id"])
                return ids

            placed = await place(4)
            for scheduler in schedulers:  # round robin: each replica placed some, and the survivor answers all
                metrics = (await fetch("GET", f"http://127.0.0.1:{scheduler.port}/metrics")).body.decode()
                routed = re.search(r'^t2i_scheduler_routed_total\{worker="gpu-a"\} (\S+)$', metrics, re.M)
                assert routed and float(routed.group(1)) > 0, metrics
            schedulers[0].proc.send_signal(signal.SIGKILL)
            await schedulers[0].proc.wait()
            placed += await place(4)

            for prompt_id in placed:
                async def done() -> dict | None:
                    response = await fetch("GET", f"{base}/status/{prompt_id}?wait=5")
                    assert response.code == 200, response.body
                    state = json.loads(response.body)
                    return state if state["status"] in ("completed", "failed", "cancelled") else None

                state = await until(done, timeout=30, what=f"job {prompt_id} to end")
                assert state["status"] == "completed", state
                assert state["image_url"].startswith(f"{base}/gpu-a/images/"), state
            image = await fetch("GET", state["image_url"])
            assert image.code == 200 and image.headers["Content-Type"] == "image/png"
            assert image.headers["Cache-Control"] == "public, max-age=31536000, immutable"
            assert image.headers.get("ETag")
            assert image.body.startswith(b"\x89PNG")
            # Only images and previews of a worker are public; the rest of the path space is the schedulers'.
            assert (await fetch("GET", f"{base}/gpu-a/jobs")).code == 404
            page = await fetch("GET", base + "/")
            assert page.code == 200 and page.headers["Content-Type"].startswith("text/html")
            assert page.headers["Strict-Transport-Security"] == "max-age=31536000"
            redirect = await fetch("GET", f"http://127.0.0.1:{http_port}/status/x?wait=1")
            assert redirect.code == 301
            assert redirect.headers["Location"] == f"https://127.0.0.1/status/x?wait=1"
        finally:
            if server is not None and server.returncode is None:
                server.send_signal(signal.SIGQUIT)
                try:
                    await asyncio.wait_for(server.wait(), 10)
                except asyncio.TimeoutError:
                    server.kill()
                    await server.wait()
            for scheduler in schedulers:
                await scheduler.close()
