"""The three YAML files of t2i, read into typed objects with defaults.

``config/worker.yaml``, ``config/scheduler.yaml`` and ``config/workers.yaml``;
their keys are documented in README.md and ``../shared/design.md``. Every
mistake raises :class:`ConfigError` naming file, line and key.
"""

from __future__ import annotations

import base64
import binascii
import importlib.resources
import json
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from t2i.params import (BUILTIN_WORKFLOWS, PARAM_KINDS, SEED_MAX, ImageLimits, ParamSpec, builtin_params,
                        builtin_spec, load_param)
from t2i.yamlfile import ConfigError, LineDict, Section, load_yaml

__all__ = [
    "ConfigError", "ParamSpec", "WorkflowConfig", "ComfyUIConfig", "RetentionConfig",
    "WorkerConfig", "SchedulerConfig", "ClientsConfig", "WorkerEntry", "load_worker_config",
    "load_scheduler_config", "load_workers_file", "load_keys_file", "parse_listen", "PARAM_KINDS", "SEED_MAX",
]

PACKAGE_WORKFLOWS = Path(__file__).parent / "workflows"


def default_static_dir() -> Path:
    """The page's files: package data ``t2i/static`` (setup.py maps the repository's ``static/`` there).

    An installed t2i has them in site-packages; a checkout (``pip install -e .``, or none) in
    ``static/`` beside the package.
    """
    installed = importlib.resources.files("t2i") / "static"
    if isinstance(installed, Path) and (installed / "index.html").is_file():
        return installed
    return Path(__file__).resolve().parent.parent / "static"



@dataclass(frozen=True)
class WorkflowConfig:
    name: str
    file: Path
    params: dict[str, ParamSpec]
    template: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True)
class ComfyUIConfig:
    url: str = "http://127.0.0.1:8188"
    output_dir: Path | None = None
    input_dir: Path | None = None  # ComfyUI's input folder: t2i's uploads (input/t2i/<job id>_…) are pruned
    connect_timeout: float = 5.0
    request_timeout: float = 30.0
    stall_timeout: float = 120.0
    max_resubmits: int = 1
    ahead: int = 2


@dataclass(frozen=True)
class WebhooksConfig:
    """Standard Webhooks sent when a job ends (off without a secret)."""

    secret: str | None = None      # "whsec_<base64>"
    allowed_urls: tuple[str, ...] = ()
    timeout: float = 10.0
    max_attempts: int = 8

    @property
    def key(self) -> bytes:
        return base64.b64decode(self.secret.removeprefix("whsec_")) if self.secret else b""


@dataclass(frozen=True)
class RetentionConfig:
    interval: float = 60.0
    task_ttl: float = 3600.0
    image_max_age: float = 86400.0
    image_max_count: int = 1000
    image_max_bytes: int | None = None


@dataclass(frozen=True)
class WorkerConfig:
    file: Path
    name: str
    listen_host: str
    listen_port: int
    public_url: str
    auth_token: str | None
    job_timeout: float
    allow_raw_workflows: bool
    max_body_bytes: int
    comfyui: ComfyUIConfig
    images_dir: Path
    retention: RetentionConfig
    default_workflow: str
    workflows: dict[str, WorkflowConfig]
    state_dir: Path = Path("state")
    backlog: int = 128
    webhooks: WebhooksConfig = WebhooksConfig()
    image_limits: ImageLimits = ImageLimits()


@dataclass(frozen=True)
class ClientsConfig:
    """scheduler.yaml ``clients``: API keys (name -> key, or a file of them) and each client's share."""

    keys: dict[str, str] = field(default_factory=dict, repr=False)   # never printed: they are secrets
    keys_file: Path | None = None
    allow_anonymous: bool = True
    max_jobs: int = 8


@dataclass(frozen=True)
class SchedulerConfig:
    file: Path
    listen_host: str
    listen_port: int
    workers_file: Path
    reload_interval: float
    health_interval: float
    auth_token: str | None
    static_dir: Path
    max_body_bytes: int
    poll_interval: float
    clients: ClientsConfig = ClientsConfig()


@dataclass(frozen=True)
class WorkerEntry:
    """One worker as ops listed it in workers.yaml."""

    name: str
    url: str
    public_url: str
    enabled: bool = True
    # Jobs (pending + running) above which it gets no more; None: as many as the worker says it
    # holds (its /health ``load.capacity``: comfyui.ahead + backlog).
    max_queue: int | None = None


def parse_listen(value: str, file: Path, key: str = "listen", line: int | None = None) -> tuple[str, int]:
    """``"0.0.0.0:8001"`` or ``"[::1]:8001"`` -> (host, port)."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(file, f"must be host:port, got {value!r}", key=key, line=line)
    return host or "0.0.0.0", int(port)


def check_url(value: str, section: Section, key: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise section.error(key, f"must be an http:// or https:// URL, got {value!r}")
    try:
        parts.port
    except ValueError:
        raise section.error(key, f"has a bad port: {value!r}") from None
    return value.rstrip("/")


def _listen_url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


# --- worker.yaml -------------------------------------------------------------

def load_worker_config(path: Path | str) -> WorkerConfig:
    path = Path(path).resolve()
    root = Section(path, load_yaml(path))
    host, port = parse_listen(root.get("listen", str, "0.0.0.0:8001"), path, line=root.line("listen"))
    public_url = root.get("public_url", str)
    public_url = check_url(public_url, root, "public_url") if public_url else _listen_url(host, port)
    auth_token = root.get("auth_token", str)

    comfy = root.section("comfyui")
    comfyui = ComfyUIConfig(
        url=check_url(comfy.get("url", str, "http://127.0.0.1:8188"), comfy, "url"),
        output_dir=comfy.path("output_dir"),
        input_dir=comfy.path("input_dir"),
        connect_timeout=comfy.get("connect_timeout", float, 5.0, minimum=0.1),
        request_timeout=comfy.get("request_timeout", float, 30.0, minimum=0.1),
        stall_timeout=comfy.get("stall_timeout", float, 120.0, minimum=0.1),
        max_resubmits=comfy.get("max_resubmits", int, 1, minimum=0),
        ahead=comfy.get("ahead", int, 2, minimum=1),
    )
    comfy.finish()

    images = root.section("images")
    images_dir = images.path("dir", "images")
    images.finish()
    state_dir = root.path("state_dir", "state")
    webhooks = _load_webhooks(root)

    ret = root.section("retention")
    retention = RetentionConfig(
        interval=ret.get("interval", float, 60.0, minimum=0.1),
        task_ttl=ret.get("task_ttl", float, 3600.0, minimum=0),
        image_max_age=ret.get("image_max_age", float, 86400.0, minimum=0),
        image_max_count=ret.get("image_max_count", int, 1000, minimum=0),
        image_max_bytes=ret.get("image_max_bytes", int, None, minimum=0),
    )
    ret.finish()

    image_limits = ImageLimits(
        max_bytes=root.get("max_image_bytes", int, ImageLimits.max_bytes, minimum=1),
        max_pixels=root.get("max_image_pixels", int, ImageLimits.max_pixels, minimum=1),
    )
    workflows = _load_workflows(root, image_limits)
    default_workflow = root.get("default_workflow", str, "txt2img")
    if default_workflow not in workflows:
        raise root.error("default_workflow", f"names no workflow in `workflows` ({', '.join(workflows)})")

    config = WorkerConfig(
        file=path,
        name=root.get("name", str, socket.gethostname()),
        listen_host=host,
        listen_port=port,
        public_url=public_url,
        auth_token=auth_token,
        job_timeout=root.get("job_timeout", float, 600.0, minimum=1),
        allow_raw_workflows=root.get("allow_raw_workflows", bool, False),
        max_body_bytes=_max_body_bytes(root, workflows, image_limits),
        comfyui=comfyui,
        images_dir=images_dir,
        retention=retention,
        default_workflow=default_workflow,
        workflows=workflows,
        state_dir=state_dir,
        backlog=root.get("backlog", int, 128, minimum=0),
        webhooks=webhooks,
        image_limits=image_limits,
    )
    root.finish()
    return config


def _max_body_bytes(root: Section, workflows: dict[str, WorkflowConfig], limits: ImageLimits) -> int:
    """1 MiB, plus room for the base64 of the images a request may carry (``max_image_bytes`` each).

    A ``max_body_bytes`` written in the file is kept; one too small for the images of a
    ``max_image_bytes`` also written is a mistake (every image that size would get 413).
    """
    images = max((sum(p.type == "image" for p in wf.params.values()) for wf in workflows.values()), default=0)
    needed = 1_048_576 + images * (-(-limits.max_bytes // 3) * 4)
    written = root.get("max_body_bytes", int, None, minimum=1024)
    if written is None:
        return needed
    if images and "max_image_bytes" in root.data and written < needed:
        raise root.error("max_body_bytes", f"is too small for {images} image(s) of max_image_bytes "
                                           f"{limits.max_bytes} sent as base64: make it at least {needed}")
    return written


def _load_webhooks(root: Section) -> WebhooksConfig:
    hooks = root.section("webhooks")
    secret = hooks.get("secret", str)
    if secret is not None:
        try:
            if not secret.startswith("whsec_") or not base64.b64decode(secret[6:], validate=True):
                raise ValueError
        except (ValueError, binascii.Error):
            raise hooks.error("secret", "must be whsec_ followed by base64 (e.g. python -c \"import base64, "
                                        "os; print('whsec_' + base64.b64encode(os.urandom(24)).decode())\")") from None
    allowed = hooks.get("allowed_urls", list, [])
    for url in allowed:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise hooks.error("allowed_urls", f"must be a list of http:// or https:// URL prefixes, got {url!r}")
    config = WebhooksConfig(secret=secret, allowed_urls=tuple(allowed),
                            timeout=hooks.get("timeout", float, 10.0, minimum=0.1),
                            max_attempts=hooks.get("max_attempts", int, 8, minimum=1))
    hooks.finish()
    if secret is not None and not allowed:
        raise root.error("webhooks", "a secret needs allowed_urls: the URL prefixes clients may name")
    return config


def _builtin(name: str, section: Section, key: str, limits: ImageLimits) -> WorkflowConfig:
    """A packaged template (t2i/workflows/<name>.json) with its parameters."""
    file = PACKAGE_WORKFLOWS / f"{name}.json"
    template = _read_template(file, section, key)
    params = {p: builtin_spec(p, spec, limits) for p, spec in builtin_params(name).items()}
    return WorkflowConfig(name, file, params, template)


def _load_workflows(root: Section, limits: ImageLimits) -> dict[str, WorkflowConfig]:
    """``workflows``; without it the built-ins (txt2img, img2img). An entry without ``file`` named
    like a built-in is that built-in (its ``params``, when written, replace the built-in's)."""
    if root.data.get("workflows") is None:
        root.get("workflows", dict)
        return {name: _builtin(name, root, "workflows", limits) for name in BUILTIN_WORKFLOWS}
    section = root.section("workflows")
    if not section.data:
        raise root.error("workflows", "must list at least one workflow")
    workflows = {}
    for name in list(section.data):
        wf = section.section(str(name))
        file = wf.path("file")
        if file is None and str(name) not in BUILTIN_WORKFLOWS:
            raise wf.error("file", f"is required (built-in workflows: {', '.join(BUILTIN_WORKFLOWS)})")
        if file is None and wf.data.get("params") is None:
            wf.get("params", dict)
            workflow = _builtin(str(name), wf, "file", limits)
        else:
            file = file or PACKAGE_WORKFLOWS / f"{name}.json"
            template = _read_template(file, wf, "file")
            params_section = wf.section("params")
            params: dict[str, ParamSpec] = {}
            taken: dict[tuple[str, str], str] = {}
            for pname in list(params_section.data):
                params[str(pname)] = load_param(params_section.section(pname), str(pname), template, limits, taken)
            params_section.finish()
            workflow = WorkflowConfig(str(name), file, params, template)
        wf.finish()
        workflows[str(name)] = workflow
    section.finish()
    return workflows


def _read_template(file: Path, section: Section, key: str) -> dict[str, Any]:
    try:
        template = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise section.error(key, f"workflow file {file} not found") from None
    except (OSError, ValueError) as exc:
        raise section.error(key, f"workflow file {file} is not readable JSON: {exc}") from None
    if not isinstance(template, dict) or not all(
            isinstance(node, dict) and "class_type" in node for node in template.values()):
        raise section.error(key, f"workflow file {file} is not a ComfyUI API-format workflow")
    return template


# --- scheduler.yaml and workers.yaml -----------------------------------------

def load_scheduler_config(path: Path | str) -> SchedulerConfig:
    path = Path(path).resolve()
    root = Section(path, load_yaml(path))
    host, port = parse_listen(root.get("listen", str, "0.0.0.0:8000"), path, line=root.line("listen"))
    config = SchedulerConfig(
        file=path,
        listen_host=host,
        listen_port=port,
        workers_file=root.path("workers_file", "workers.yaml"),
        reload_interval=root.get("reload_interval", float, 2.0, minimum=0.1),
        health_interval=root.get("health_interval", float, 5.0, minimum=0.1),
        auth_token=root.get("auth_token", str),
        static_dir=root.path("static_dir") or default_static_dir(),
        # input images come base64 in POST /generate: room for the workers' default (t2i.params)
        max_body_bytes=root.get("max_body_bytes", int, 16 * 1024 * 1024, minimum=1024),
        poll_interval=root.get("poll_interval", float, 1.5, minimum=0.1),
        clients=_load_clients(root),
    )
    root.finish()
    return config


# A client's name travels in logs, metrics, the T2I-Client header and every job's status; "anon:" is
# taken by anonymous clients (the colon is not allowed here).
CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
KEY_CHARS = re.compile(r"[\x21-\x7e]+")   # printable ASCII, no spaces: it travels in a header
KEY_MIN_LENGTH = 16


def _load_clients(root: Section) -> ClientsConfig:
    section = root.section("clients")
    keys: dict[str, str] = {}
    keys_file = section.path("keys_file")
    section._seen.add("keys")
    if "keys" in section.data:
        if keys_file is not None:
            raise section.error("keys", "write either `keys` or `keys_file`, not both")
        keys = check_keys(section.data["keys"], section.file, section._key("keys"), section.line("keys"))
    elif keys_file is not None:
        keys = load_keys_file(keys_file)
    config = ClientsConfig(keys=keys, keys_file=keys_file,
                           allow_anonymous=section.get("allow_anonymous", bool, True),
                           max_jobs=section.get("max_jobs", int, 8, minimum=1))
    section.finish()
    if not config.allow_anonymous and keys_file is None and not keys:
        raise section.error("allow_anonymous", "is false and no keys are given: nobody could submit a job "
                                               "(add `keys` or `keys_file`)")
    return config


def load_keys_file(path: Path | str) -> dict[str, str]:
    """A clients' keys file (``name: key`` per line, the shape of ``clients.keys``); a bad entry fails the
    whole file (the running scheduler keeps its last good keys)."""
    path = Path(path)
    data = load_yaml(path)
    if data is None:
        raise ConfigError(path, "is empty: list `name: key` pairs (or write `{}` for no keys)")
    return check_keys(data, path, None, getattr(data, "line", None))


def check_keys(data: Any, file: Path, key: str | None, line: int | None) -> dict[str, str]:
    """name -> key, checked. Error messages name the client, never show a key."""
    if not isinstance(data, dict):
        raise ConfigError(file, "must be a mapping of client name to key", key=key, line=line)
    keys: dict[str, str] = {}
    owners: dict[str, str] = {}
    for name, value in data.items():
        where = f"{key}.{name}" if key else str(name)
        at = data.line_of(name) if isinstance(data, LineDict) else line
        if not isinstance(name, str) or not CLIENT_NAME.fullmatch(name):
            raise ConfigError(file, "a client name must be 1-64 letters, digits and . _ @ + - (starting with a "
                                    "letter or digit)", key=where, line=at)
        if not isinstance(value, str):
            raise ConfigError(file, "the key must be a string (quote it)", key=where, line=at)
        if len(value) < KEY_MIN_LENGTH or not KEY_CHARS.fullmatch(value):
            raise ConfigError(file, f"the key must be at least {KEY_MIN_LENGTH} printable ASCII characters without "
                                    "spaces (make one with: python -c \"import secrets; "
                                    "print(secrets.token_urlsafe(24))\")", key=where, line=at)
        if value in owners:
            raise ConfigError(file, f"has the same key as {owners[value]!r}: each client needs its own",
                              key=where, line=at)
        owners[value] = name
        keys[name] = value
    return keys


def load_workers_file(path: Path | str) -> list[WorkerEntry]:
    """Read workers.yaml; a bad entry fails the whole file (the caller keeps the last good list)."""
    path = Path(path)
    root = Section(path, load_yaml(path))
    # An empty file, or one that lost its list in an edit, is a mistake: 0 workers would answer every job 503.
    if "workers" not in root.data:
        raise ConfigError(path, "has no `workers` list (write `workers: []` to run with none)")
    if root.data["workers"] is None:
        raise root.error("workers", "is empty: list the workers (or write `workers: []` to run with none)")
    raw = root.get("workers", list)
    root.finish()
    entries: list[WorkerEntry] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        sec = Section(path, item, f"workers[{index}]")
        name = sec.get("name", str, required=True)
        if name in seen:
            raise sec.error("name", f"duplicate worker name {name!r}")
        seen.add(name)
        url = check_url(sec.get("url", str, required=True), sec, "url")
        public_url = sec.get("public_url", str)
        entries.append(WorkerEntry(
            name=name,
            url=url,
            public_url=check_url(public_url, sec, "public_url") if public_url else url,
            enabled=sec.get("enabled", bool, True),
            max_queue=sec.get("max_queue", int, None, minimum=1),
        ))
        sec.finish()
    return entries
