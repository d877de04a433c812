"""The scheduler process: wiring, start/stop, and ``main()``.

``Scheduler(config)`` reads workers.yaml (a ConfigError propagates), and
``start()`` checks the workers once, starts one feed follower per worker and
the periodic health / reload callbacks, then listens. ``stop()`` undoes it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from typing import Any, Callable

from tornado import web
from tornado.httpclient import AsyncHTTPClient
from tornado.simple_httpclient import SimpleAsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop, PeriodicCallback
from tornado.netutil import bind_sockets

from t2i.check import check_scheduler
from t2i.cli import (build_parser, install_shutdown_handlers, load_or_exit, port_problem, report_port_problem,
                     setup_logging)
from t2i.config import SchedulerConfig, load_scheduler_config, load_workers_file
from t2i.gcpolicy import GCPolicy
from t2i.httpclient import MAX_CLIENTS, configure_http_client
from t2i.resolver import LiteralFirstResolver
from t2i.scheduler.clients import Clients
from t2i.scheduler.fastpath import StatusFastPath
from t2i.scheduler.forward import JobRouter
from t2i.scheduler.handlers import (MetricsHandler, NotFoundHandler, OpenAPIHandler, StaticHandler,
                                    default_handlers)
from t2i.scheduler.mirror import Mirror
from t2i.scheduler.placement import Placement
from t2i.scheduler.registry import HEALTH_TICK, Registry
from t2i.serve import LISTEN_BACKLOG, serve
from t2i.web import body_size_limit, log_request

log = logging.getLogger(__name__)

STARTUP_FEED_WAIT = 3.0   # start() waits this long at most for the first checks and listings
SHUTDOWN_GRACE = 2.0
POOL_CONNECTIONS = 100_000  # feeds and health checks: one long-poll per followed worker, never queued


def make_app(config: SchedulerConfig, registry: Registry, mirror: Mirror, placement: Placement, router: JobRouter,
             *, simulated: bool = False, **settings: Any) -> web.Application:
    """The API routes first, then the page from ``config.static_dir`` (``/`` is index.html)."""
    deps = {"registry": registry, "mirror": mirror, "placement": placement, "router": router,
            "clients": router.clients,
            "max_body_bytes": config.max_body_bytes, "simulated": simulated, "poll_interval": config.poll_interval}
    static = str(config.static_dir)
    handlers: list[Any] = [(pattern, handler, deps) for pattern, handler in default_handlers]
    handlers += [
        (r"/metrics", MetricsHandler),
        (r"/openapi.json", OpenAPIHandler, {"server": "scheduler"}),
        (r"/static/(.*)", StaticHandler, {"path": static}),
        (r"/(.*)", StaticHandler, {"path": static, "default_filename": "index.html"}),
    ]
    settings.setdefault("log_function", log_request)
    settings.setdefault("default_handler_class", NotFoundHandler)
    return web.Application(handlers, **settings)


class Scheduler:
    """One scheduler: the pool registry, the job mirror, and the HTTP server."""

    def __init__(self, config: SchedulerConfig, *, simulated: bool = False,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.simulated = simulated  # the demo's workers drive simulated ComfyUIs (GET /health says so)
        self.mirror = Mirror(auth_token=config.auth_token)
        self.registry = Registry(config.workers_file, self.mirror, auth_token=config.auth_token,
                                 health_interval=config.health_interval)
        self.registry.load_initial()
        self.placement = Placement(self.registry, self.mirror, clock=clock)
        self.clients = Clients(config.clients, self.mirror.clients)  # API keys and each client's share
        self.router = JobRouter(self.registry, self.mirror, self.placement, auth_token=config.auth_token,
                                clients=self.clients)
        self.client: AsyncHTTPClient | None = None
        self.pool_client: AsyncHTTPClient | None = None
        self.server: HTTPServer | None = None
        self.port: int | None = None
        self._callbacks: list[PeriodicCallback] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        # Clients owned (and closed) by this scheduler: the process-wide AsyncHTTPClient() would be
        # shared with, and closed by, in-process workers. Following the pool (a long-poll held per
        # worker, a health check per worker every health_interval) has a client of its own, so it
        # never takes the slots placing and forwarding use: the simple client, which opens a
        # connection per request and keeps nothing per slot (its cap can be as large as the pool),
        # where curl's connection cache, cycled through a thousand workers, cost more than it saved
        # (bench/scheduler_scale_bench.py). Placing and forwarding keep curl's kept-alive connections.
        self.client = AsyncHTTPClient(force_instance=True, max_clients=MAX_CLIENTS)
        # Workers listed by address (the usual) are resolved in place, not on getaddrinfo's thread pool.
        self.pool_client = SimpleAsyncHTTPClient(force_instance=True, max_clients=POOL_CONNECTIONS,
                                                 resolver=LiteralFirstResolver())
        self.registry.client = self.mirror.client = self.pool_client
        self.router.client = self.client
        checked = self.registry.start()
        feeds = [self.mirror.feed(name) for name in self.registry.workers]
        listed = asyncio.ensure_future(_all_tried(feeds))
        # Listen soon whatever the pool does: unreachable workers are still being checked (each
        # up to its timeouts) and their feeds retried after this.
        await asyncio.wait([checked, listed], timeout=STARTUP_FEED_WAIT)
        listed.cancel()
        self._periodic(self.registry.check_due, min(HEALTH_TICK, self.config.health_interval / 4))
        self._periodic(self.reload, self.config.reload_interval)
        app = make_app(self.config, self.registry, self.mirror, self.placement, self.router,
                       simulated=self.simulated)
        sockets = bind_sockets(self.config.listen_port, self.config.listen_host, backlog=LISTEN_BACKLOG,
                               family=socket.AF_INET if ":" not in self.config.listen_host else socket.AF_UNSPEC)
        # Every route's body is capped, not only the JSON ones (Tornado's default is 100 MB). Plain
        # /status polls the mirror can answer are answered before the Application (t2i.scheduler.fastpath).
        self.server = serve(StatusFastPath(app, self.mirror, self.router), sockets,
                            max_body_size=body_size_limit(self.config.max_body_bytes))
        self.port = sockets[0].getsockname()[1]
        log.info("scheduler listening on %s:%d with %d workers", self.config.listen_host, self.port,
                 len(self.registry.workers))

    def _periodic(self, fn, interval: float) -> None:
        callback = PeriodicCallback(fn, interval * 1000, jitter=0.1)
        callback.start()
        self._callbacks.append(callback)

    def reload(self, force: bool = False) -> None:
        """Apply an edited workers.yaml and clients' keys_file (every reload_interval; forced on SIGHUP)."""
        try:
            self.registry.reload_if_changed(force)
            self.registry.drop_drained()
        except Exception:
            log.exception("reloading %s failed", self.registry.workers_file)
        try:
            self.clients.reload_if_changed(force)
        except Exception:
            log.exception("reloading %s failed", self.clients.keys_file)

    async def stop(self) -> None:
        """Stop listening, stop the periodic work and the followers, close the client."""
        self.router.closing = True
        if self.server is not None:
            self.server.stop()
        for callback in self._callbacks:
            callback.stop()
        self._callbacks.clear()
        self.registry.stop()
        await self.mirror.stop()
        if self.server is not None:
            try:
                await asyncio.wait_for(self.server.close_all_connections(), SHUTDOWN_GRACE)
            except asyncio.TimeoutError:
                log.warning("some connections did not close within %.0fs", SHUTDOWN_GRACE)
        for client in (self.client, self.pool_client):
            if client is not None:
                close_client(client)
        self.client = self.pool_client = None


async def _all_tried(feeds) -> None:
    for feed in feeds:
        if feed is not None:
            await feed.tried.wait()


def close_client(client: AsyncHTTPClient) -> None:
    """Close our client even with feed long-polls in flight.

    The curl client's close() re-arms its timer while closing busy handles, and the timer
    then fails on the closed multi handle with a logged traceback (tornado#3289): drop it.
    """
    client.close()
    timeout = getattr(client, "_timeout", None)
    if timeout is not None:
        IOLoop.current().remove_timeout(timeout)
        client._timeout = None


async def main(argv: list[str] | None = None) -> int:
    parser = build_parser("t2i-scheduler", "Route text-to-image jobs to a pool of t2i workers.",
                          "config/scheduler.yaml")
    # curl keeps connections to workers alive; bench/poll_bench.py measured the forwarding hop
    # ~1.7x faster with it than with the simple client (which connects per request).
    parser.add_argument("--http-client", choices=["curl", "simple"], default="curl",
                        help="outbound HTTP client (default curl when pycurl is installed, else simple)")
    parser.add_argument("--check", action="store_true",
                        help="check the config, the page's files and every worker (reachable, token accepted, "
                             "workflows ready), print one line each and exit: 0 ready, 1 not, 2 config error")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    config = load_or_exit(load_scheduler_config, args.config)
    if args.check:
        workers = load_or_exit(load_workers_file, config.workers_file)
        configure_http_client(prefer_curl=False)
        return await check_scheduler(config, workers)
    problem = port_problem(config.listen_host, config.listen_port)
    if problem:
        report_port_problem(config.listen_host, config.listen_port, problem, f"Change `listen` in {args.config}.")
        return 1
    scheduler = load_or_exit(lambda _: Scheduler(config), config.workers_file)
    impl = configure_http_client(prefer_curl=args.http_client == "curl")
    log.debug("outbound HTTP client: %s", impl)
    stop = asyncio.Event()
    install_shutdown_handlers(stop)
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, scheduler.reload, True)
    # From before start-up on, what lives on is frozen out of the collector's full passes, which held
    # the loop ~0.1 s at 1,000 workers (t2i.gcpolicy); start-up's own passes stay short too.
    collector = GCPolicy()
    collector.start()
    # SIGTERM while starting (a large pool, workers slow to answer) stops at once too.
    log.info("starting with %d workers", len(scheduler.registry.workers))
    starting = asyncio.ensure_future(scheduler.start())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        await asyncio.wait([starting])
        log.info("shutting down while starting")
        collector.stop()
        await scheduler.stop()
        return 0
    stopping.cancel()
    try:
        starting.result()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.listen_host, config.listen_port, exc)
        collector.stop()
        await scheduler.stop()
        return 1
    await stop.wait()
    log.info("shutting down")
    collector.stop()
    await scheduler.stop()
    return 0
