"""Command-line plumbing both servers share: flags, logging, signals."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Callable

from tornado.netutil import bind_sockets

from t2i import __version__
from t2i.config import ConfigError

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# "Authorization: Bearer abc", "Authorization: Basic abc", "Authorization: abc", "bearer abc": the credential.
_CREDENTIAL = re.compile(r"(?i)(\bauthorization:\s*(?:[a-z]+\s+(?=\S))?|\bbearer\s+)[^\s'\",;]+")


def build_parser(prog: str, description: str, default_config: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    if default_config is not None:
        parser.add_argument("--config", type=Path, default=Path(default_config),
                            help=f"YAML config file (default: {default_config})")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="log verbosity (default: info); per-request poll and health logs are debug")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


class RedactCredentials(logging.Filter):
    """Replaces bearer tokens and Authorization header values in a log line with ``[redacted]``."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging reports it itself
            return True
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def redact(text: str) -> str:
    return _CREDENTIAL.sub(lambda m: m.group(1) + "[redacted]", text)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format=LOG_FORMAT, stream=sys.stderr)
    # Tokens are never logged, whoever logs them: every line passes through the filter.
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactCredentials())
    # Tornado's own access log is replaced by t2i.web.log_request.
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
    # At debug, Tornado's curl client traces every request it sends, headers (the token) included.
    logging.getLogger("tornado.curl_httpclient").setLevel(logging.INFO)


def report_config_error(exc: ConfigError) -> None:
    """A config mistake: one line on stderr, no traceback (the caller exits with 2)."""
    print(f"config error: {exc}", file=sys.stderr)


def load_or_exit(loader: Callable, path: Path):
    """Load a config file; a mistake is one line on stderr and exit code 2."""
    try:
        return loader(path)
    except ConfigError as exc:
        report_config_error(exc)
        raise SystemExit(2) from None


def port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on right now (None: it can), found before anything starts."""
    try:
        sockets = bind_sockets(port, host or None)
    except OSError as exc:
        return exc.strerror or str(exc)
    for sock in sockets:
        sock.close()
    return None


def report_port_problem(host: str, port: int, problem: str, hint: str) -> None:
    """One line on stderr naming the address, the port and what to change (the caller exits with 1)."""
    where = f"[{host}]" if ":" in host else (host or "*")
    print(f"cannot listen on {where}:{port}: {problem}. Is another server on port {port}? {hint}",
          file=sys.stderr)


def install_shutdown_handlers(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stop``; the caller's main() does the orderly shutdown."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def run_main(coroutine, profile_variable: str) -> None:
    """``sys.exit(asyncio.run(coroutine))``; with the environment variable ``profile_variable`` set to a
    path, the event loop's thread runs under cProfile timed by that thread's CPU time (a wall-clock
    profile on a busy box charges waits for the CPU and the GIL to whatever ran then), and its stats
    are written there at exit (``python -m pstats <path>``). Nothing is profiled without it."""
    profile_path = os.environ.get(profile_variable)
    if not profile_path:
        sys.exit(asyncio.run(coroutine))
    import cProfile  # only when asked: profiling slows every call
    import time

    profiler = cProfile.Profile(time.thread_time)
    try:
        code = profiler.runcall(asyncio.run, coroutine)
    finally:
        profiler.dump_stats(profile_path)
    sys.exit(code)
