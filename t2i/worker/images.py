"""The worker's ``images/`` folder: atomic writes, an index, and serving.

File names are ``<prompt_id>_<n>.<ext>``: the job's random id makes them
unguessable, and nothing in them comes from user input. The index (name ->
size, mtime) lets retention pick victims without rescanning the folder.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable

from t2i.web import APIError, FileHandler

IMAGE_NAME = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}_\d+\.(png|jpg|jpeg|webp|gif)$")
TEMP_PREFIX, TEMP_SUFFIX = ".tmp-", ".part"
TEMP_NAME = re.compile(rf"^{re.escape(TEMP_PREFIX)}\w+{re.escape(TEMP_SUFFIX)}$")
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}
TYPES = {**{ext: kind for kind, ext in EXTENSIONS.items()}, "jpeg": "image/jpeg"}
FRESH_COUNT, FRESH_BYTES = 32, 64 * 1024 * 1024  # the newest images kept in memory as well
# Tests only: a FIFO that the fsync of new images waits on, so a test can kill the worker between
# an image being served and being durable (tests/test_worker_durability.py).
DURABLE_GATE = os.environ.get("T2I_TEST_DURABLE_GATE")


class ImageStore:
    def __init__(self, directory: Path, clock: Callable[[], float] = time.time):
        self.directory = Path(directory)
        self.clock = clock
        # name -> (size in bytes, mtime); insertion order is roughly age order.
        self.index: dict[str, tuple[int, float]] = {}
        self._fresh: OrderedDict[str, bytes] = OrderedDict()  # see keep_fresh
        self._fresh_bytes = 0

    @staticmethod
    def filename_for(prompt_id: str, number: int, content_type: str = "image/png") -> str:
        return f"{prompt_id}_{number}.{EXTENSIONS.get(content_type, 'png')}"

    @staticmethod
    def content_type(name: str) -> str:
        return TYPES.get(name.rsplit(".", 1)[-1], "application/octet-stream")

    @property
    def total_bytes(self) -> int:
        return sum(size for size, _ in self.index.values())

    def ensure_directory(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    async def take_stock(self) -> int:
        """Index the files already in the folder (left from before a restart).

        Half-written temp files of a worker killed mid-write are removed: at start-up no
        write of ours is in flight, and nothing else would ever delete them.
        """
        found = await asyncio.get_running_loop().run_in_executor(None, self._scan)
        self.index = dict(sorted(found.items(), key=lambda item: item[1][1]))
        return len(self.index)

    def _scan(self) -> dict[str, tuple[int, float]]:
        found = {}
        try:
            entries = os.scandir(self.directory)
        except FileNotFoundError:
            return found
        with entries:
            for entry in entries:
                if IMAGE_NAME.match(entry.name) and entry.is_file(follow_symlinks=False):
                    stat = entry.stat(follow_symlinks=False)
                    found[entry.name] = (stat.st_size, stat.st_mtime)
                elif TEMP_NAME.match(entry.name) and entry.is_file(follow_symlinks=False):
                    try:
                        os.unlink(entry.path)
                    except OSError:
                        pass
        return found

    async def save(self, name: str, data: bytes, durable: bool = True) -> str:
        """Write ``data`` as ``name`` atomically (temp file, rename, fsync), off the event loop.

        ``durable=False`` leaves out the fsync: the file is whole for every reader and survives the
        process being killed, but not a power cut, until :meth:`make_durable`.
        """
        if not IMAGE_NAME.match(name):
            raise ValueError(f"not an image name: {name!r}")
        await asyncio.get_running_loop().run_in_executor(None, self._write, name, data)
        if durable:
            await self.make_durable([name])
        self.index[name] = (len(data), self.clock())
        self.keep_fresh(name, data)
        return name

    def _write(self, name: str, data: bytes) -> None:
        self.ensure_directory()
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), 0o644)  # mkstemp's 0600 would keep a reverse proxy from serving it
                handle.write(data)
            os.replace(tmp, self.directory / name)  # whole or absent for every reader, fsynced or not
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    async def make_durable(self, names: Iterable[str]) -> None:
        """fsync the files saved with ``durable=False``, and the folder that names them; OSError if not."""
        paths = [self.directory / name for name in names]
        await asyncio.get_running_loop().run_in_executor(None, self._sync, paths)

    def _sync(self, paths: list[Path]) -> None:
        if DURABLE_GATE:
            with open(DURABLE_GATE, "rb"):  # a FIFO: blocks this thread until the test opens it too
                pass
        for path in paths:
            _fsync(path)
        _fsync(self.directory)  # the renames: a file whose name is lost is not kept either

    def fresh(self, name: str) -> bytes | None:
        """An image's bytes if they are in memory (see :meth:`keep_fresh`); never the disk."""
        return self._fresh.get(name)

    async def read(self, name: str) -> bytes | None:
        """An image's bytes: a fresh one from memory, else the file (off the loop); None when gone."""
        data = self._fresh.get(name)
        if data is not None:
            return data
        if not IMAGE_NAME.match(name):
            return None
        try:
            return await asyncio.get_running_loop().run_in_executor(None, (self.directory / name).read_bytes)
        except OSError:
            return None

    def keep_fresh(self, name: str, data: bytes) -> None:
        """The newest images' bytes: a client waiting on ``/result`` asks for them right after they are
        saved (or, see ``collect_images``, while they are)."""
        if len(data) > FRESH_BYTES:
            return
        old = self._fresh.pop(name, None)
        if old is not None:
            self._fresh_bytes -= len(old)
        self._fresh[name] = data
        self._fresh_bytes += len(data)
        while self._fresh_bytes > FRESH_BYTES or len(self._fresh) > FRESH_COUNT:
            _, old = self._fresh.popitem(last=False)
            self._fresh_bytes -= len(old)

    def forget(self, names: Iterable[str]) -> None:
        for name in names:
            self.index.pop(name, None)
            data = self._fresh.pop(name, None)
            if data is not None:
                self._fresh_bytes -= len(data)


class ImageHandler(FileHandler):
    """``GET /images/{file}``: immutable, ETagged, JSON 404, nothing outside the folder (symlinks neither)."""

    CACHE_CONTROL = "public, max-age=31536000, immutable"
    not_found = "No such image (it may have expired)."

    def set_extra_headers(self, path: str) -> None:
        self.set_header("Cache-Control", self.CACHE_CONTROL)
        # Browsers fetch these from another origin than the page (download button).
        self.set_header("Access-Control-Allow-Origin", "*")

    def compute_etag(self) -> str | None:
        # Tornado hashes the whole file on every request (on the event loop); our files are
        # immutable and uniquely named, so size and mtime identify the content as well.
        stat = self._stat()
        return f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"'

    def validate_absolute_path(self, root: str, absolute_path: str) -> str | None:
        # parse_url_path let only our own flat names through, so the path is <root>/<name>; one lstat
        # tells a file of ours from a symlink (refused: it could lead anywhere) or nothing, where
        # FileHandler's general check resolves every component of both paths on each request.
        try:
            mode = os.lstat(absolute_path).st_mode
        except OSError:
            raise APIError(404, self.not_found) from None
        if not stat.S_ISREG(mode):
            raise APIError(404, self.not_found)
        return absolute_path

    def parse_url_path(self, url_path: str) -> str:
        # Only our own flat names: anything else (``../``, sub-paths) is a 404 before any
        # path is built.
        if not IMAGE_NAME.match(url_path):
            raise APIError(404, "No such image.")
        return url_path


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's) contents to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
