"""The worker process: one ComfyUI, its jobs, its images, and the HTTP API in front."""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any, Callable

from tornado import web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from t2i import cli
from t2i.check import check_worker
from t2i.config import ConfigError, WorkerConfig, load_worker_config
from t2i.gcpolicy import GCPolicy
from t2i.httpclient import configure_http_client
from t2i.serve import serve
from t2i.web import NotFoundHandler, body_size_limit, log_request
from t2i.worker.handlers import url_table
from t2i.worker.images import ImageStore
from t2i.worker.jobs import JobStore
from t2i.worker.journal import Journal
from t2i.worker.runner import Runner

log = logging.getLogger(__name__)


def make_app(config: WorkerConfig, store: JobStore, runner: Runner,
             prune_report: Callable[[], Any] | None = None, **settings: Any) -> web.Application:
    return web.Application(
        url_table(config, store, runner, prune_report),
        default_handler_class=NotFoundHandler,
        log_function=log_request,
        **settings,
    )


class Worker:
    """A running worker: ``await start()``, ``url``, ``await stop()``."""

    def __init__(self, config: WorkerConfig):
        self.config = config
        self.journal = Journal(config.state_dir)
        self.store = JobStore(on_remove=self.journal.forget)
        self.images = ImageStore(config.images_dir)
        self.runner = Runner(config, self.store, self.images, journal=self.journal)
        self.pruner: Any = None
        self.server: HTTPServer | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        host = self.config.listen_host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def prune_report(self) -> Any:
        return getattr(self.pruner, "last_report", None)

    async def start(self) -> None:
        """Raises ConfigError when images.dir or state_dir is unusable, OSError when the port is taken."""
        try:
            self.images.ensure_directory()
        except OSError as exc:
            raise ConfigError(self.config.file, f"cannot use {self.config.images_dir} for images: "
                              f"{exc.strerror or exc}", key="images.dir") from None
        try:
            jobs, tombstones = await self.journal.open()
        except OSError as exc:
            raise ConfigError(self.config.file, f"cannot keep the job journal in {self.config.state_dir}: "
                              f"{exc.strerror or exc}", key="state_dir") from None
        found = await self.images.take_stock()
        for job in jobs:
            # An image retention removed while we were down: the job says it expired.
            if job.images and not all(name in self.images.index for name in job.images):
                job.image_expired = True
        # Before the pruner's first pass: ComfyUI outputs of unfinished jobs must not go.
        self.store.restore(jobs, tombstones)
        app = make_app(self.config, self.store, self.runner, self.prune_report)
        sockets = bind_sockets(self.config.listen_port, address=self.config.listen_host)
        self.port = sockets[0].getsockname()[1]
        # Every route's body is capped, not only the JSON ones (Tornado's default is 100 MB).
        self.server = serve(app, sockets, max_body_size=body_size_limit(self.config.max_body_bytes))
        await self.runner.start()
        self.pruner = await _start_pruner(self)
        log.info("worker %s listening on %s (public %s), ComfyUI at %s, %d image(s) on disk, %d job(s) journaled",
                 self.config.name, self.url, self.config.public_url, self.config.comfyui.url, found, len(jobs))

    async def stop(self) -> None:
        """Stop taking jobs, let image collections in flight finish (bounded), write the journal.
        Jobs in ComfyUI carry on there; the next start picks them up."""
        if self.server is not None:
            self.server.stop()
        if self.pruner is not None:
            await _maybe_await(self.pruner.stop())
        await self.runner.stop()
        if self.server is not None:
            # Ends long-polls too: their on_connection_close cancels the waits.
            try:
                await asyncio.wait_for(self.server.close_all_connections(), 2.0)
            except asyncio.TimeoutError:
                log.warning("some HTTP connections did not close within 2 s")
            self.server = None
        await self.journal.close()


async def _maybe_await(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


async def _start_pruner(worker: Worker) -> Any:
    try:
        from t2i.worker.retention import Pruner
    except ImportError:
        log.info("retention module not available: images and finished jobs are not pruned")
        return None
    pruner = Pruner(worker.store, worker.images, worker.config.retention, worker.config.comfyui.output_dir,
                    worker.config.name, comfy_input_dir=worker.config.comfyui.input_dir,
                    record_removal=worker.journal.forget_now)
    await _maybe_await(pruner.start())
    return pruner


async def main(argv: list[str] | None = None) -> int:
    parser = cli.build_parser("t2i-worker", "Drive one ComfyUI: queue jobs, track them, serve their images.",
                              "config/worker.yaml")
    parser.add_argument("--check", action="store_true",
                        help="check the config, ComfyUI and every workflow (models, nodes), print one line "
                             "each and exit: 0 ready, 1 not, 2 config error; starts nothing")
    args = parser.parse_args(argv)
    cli.setup_logging(args.log_level)
    config = cli.load_or_exit(load_worker_config, args.config)
    if args.check:
        configure_http_client(prefer_curl=False)
        return await check_worker(config)
    problem = cli.port_problem(config.listen_host, config.listen_port)
    if problem:
        cli.report_port_problem(config.listen_host, config.listen_port, problem,
                                f"Change `listen` in {args.config}.")
        return 1
    configure_http_client()
    stop = asyncio.Event()
    cli.install_shutdown_handlers(stop)
    worker = Worker(config)
    # From before start-up on (the journal's jobs read back among them), what lives on is frozen out of
    # the collector's full passes (t2i.gcpolicy).
    collector = GCPolicy()
    collector.start()
    try:
        await worker.start()
    except ConfigError as exc:
        collector.stop()
        cli.report_config_error(exc)
        return 2
    except OSError as exc:
        collector.stop()
        log.error("cannot listen on %s:%s: %s", config.listen_host, config.listen_port, exc)
        return 1
    await stop.wait()
    log.info("shutting down")
    collector.stop()
    await worker.stop()
    log.info("stopped")
    return 0
