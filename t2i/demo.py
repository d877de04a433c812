"""``python -m t2i.demo``: the whole system in one process, on simulated GPUs.

Starts N simulated ComfyUI servers (``t2i.comfy_sim``), one worker in front of
each and a scheduler in front of the workers, all on 127.0.0.1, from YAML
files written to a temporary folder and loaded the way production loads them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import tempfile
from pathlib import Path

import yaml

from t2i.cli import build_parser, install_shutdown_handlers, port_problem, setup_logging

log = logging.getLogger("t2i.demo")


def _free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def parse_args(argv: list[str] | None):
    parser = build_parser("t2i-demo", "Run a scheduler, workers and simulated ComfyUI servers on this machine.",
                          default_config=None)
    parser.add_argument("--workers", type=int, default=2, metavar="N",
                        help="number of simulated GPU machines (worker + ComfyUI each; default 2)")
    parser.add_argument("--step-time", type=float, default=0.15, metavar="SECONDS",
                        help="simulated time per sampler step (default 0.15; 20 steps make an image in 3 s)")
    parser.add_argument("--port", type=int, default=8000, help="the scheduler's port (default 8000)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the scheduler and workers listen on (default 127.0.0.1, this machine only; "
                             "0.0.0.0 lets other machines open the page)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where configs and images go (default: a temporary folder, removed at exit)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.step_time < 0:
        parser.error("--step-time must not be negative")
    return args


def public_host(host: str) -> str:
    """The name browsers use for ``host``: a wildcard address means this machine's name."""
    if host in ("", "0.0.0.0", "::"):
        return socket.getfqdn() or "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def write_configs(data_dir: Path, workers: int, sim_urls: list[str], scheduler_port: int,
                  host: str = "127.0.0.1") -> tuple[list[Path], Path]:
    worker_files, entries = [], []
    listen_host = f"[{host}]" if ":" in host else host
    for index in range(workers):
        name = f"sim-gpu-{chr(ord('a') + index)}" if index < 26 else f"sim-gpu-{index}"
        port = _free_port(host)
        directory = data_dir / name
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "name": name,
            "listen": f"{listen_host}:{port}",
            # Browsers load images from the workers: the address they can reach.
            "public_url": f"http://{public_host(host)}:{port}",
            "comfyui": {"url": sim_urls[index]},
            "images": {"dir": "images"},
            "retention": {"interval": 60, "task_ttl": 3600, "image_max_age": 86400, "image_max_count": 500},
        }
        path = directory / "worker.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        worker_files.append(path)
        local = "127.0.0.1" if host in ("", "0.0.0.0") else "[::1]" if host == "::" else listen_host
        entries.append({"name": name, "url": f"http://{local}:{port}", "public_url": config["public_url"],
                        "enabled": True})  # no max_queue: each worker takes what it says it holds
    (data_dir / "workers.yaml").write_text(yaml.safe_dump({"workers": entries}, sort_keys=False))
    scheduler_file = data_dir / "scheduler.yaml"
    scheduler_file.write_text(yaml.safe_dump({
        "listen": f"{listen_host}:{scheduler_port}",
        "workers_file": "workers.yaml",
        "reload_interval": 2,
        "health_interval": 2,
    }, sort_keys=False))
    return worker_files, scheduler_file


async def run(args) -> int:
    from t2i.comfy_sim import ComfySim
    from t2i.config import load_scheduler_config, load_worker_config
    from t2i.httpclient import configure_http_client
    from t2i.scheduler.app import Scheduler
    from t2i.worker.app import Worker

    # A port in use is said before anything starts, with what to do about it.
    problem = port_problem(args.host, args.port)
    if problem:
        print(f"t2i demo: cannot listen on port {args.port} ({problem}): another program (another demo?) "
              f"has it. Pick another port with --port, e.g. --port {args.port + 1}.", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    install_shutdown_handlers(stop)
    configure_http_client()
    with tempfile.TemporaryDirectory(prefix="t2i-demo-") as tmp:
        data_dir = (args.data_dir or Path(tmp)).resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        sims, workers, scheduler = [], [], None
        try:
            for index in range(args.workers):
                sim = ComfySim(step_time=args.step_time, previews=True,
                               output_dir=str(data_dir / f"comfyui-{index}"))
                await sim.start(port=0, address="127.0.0.1")
                sims.append(sim)
            worker_files, scheduler_file = write_configs(data_dir, args.workers, [s.url for s in sims], args.port,
                                                         args.host)
            for path in worker_files:
                worker = Worker(load_worker_config(path))
                await worker.start()
                workers.append(worker)
            scheduler = Scheduler(load_scheduler_config(scheduler_file), simulated=True)
            await scheduler.start()
        except OSError as exc:
            print(f"t2i demo: cannot start: {exc}", file=sys.stderr)
            await _stop_all(scheduler, workers, sims)
            return 1
        print(f"t2i demo running at http://{public_host(args.host)}:{args.port}/  "
              f"({args.workers} simulated GPU workers; Ctrl-C stops)", flush=True)
        await stop.wait()
        log.info("stopping")
        await _stop_all(scheduler, workers, sims)
    return 0


async def _stop_all(scheduler, workers, sims) -> None:
    for server in [scheduler, *workers, *sims]:
        if server is None:
            continue
        try:
            await server.stop()
        except Exception:
            log.exception("error while stopping %s", server)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.log_level)
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
