"""Reading the YAML files ops write, remembering where each key stands.

Config mistakes must be reported as one line naming the file, the line and
the key, so mappings are loaded into :class:`LineDict`, which keeps the line of
every key. Loading stays ``safe_load``-safe: the loader is a ``SafeLoader``.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any

import yaml


class ConfigError(Exception):
    """A mistake in a config file, explained in one line."""

    def __init__(self, file: Path | str, problem: str, key: str | None = None, line: int | None = None):
        self.file = str(file)
        self.key = key
        self.line = line
        self.problem = problem
        where = self.file if line is None else f"{self.file}:{line}"
        what = f"{key}: {problem}" if key else problem
        super().__init__(f"{where}: {what}")


class LineDict(dict):
    """A dict that knows the line of each of its keys (1-based)."""

    line: int | None = None

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lines: dict[Any, int] = {}

    def line_of(self, key: Any) -> int | None:
        return self.lines.get(key, self.line)


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    mapping = LineDict()
    mapping.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            raise ConfigError(loader.name, "mapping keys must be plain values", line=line)
        if key in mapping:
            raise ConfigError(loader.name, "duplicate key", key=str(key), line=line)
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = line
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: Path) -> Any:
    """Parse ``path``; any failure becomes a :class:`ConfigError` with a line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, f"cannot read: {exc}") from None
    loader = _LineLoader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = " ".join(filter(None, [exc.context, exc.problem])) or "invalid YAML"
        raise ConfigError(path, f"invalid YAML: {problem}", line=line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, f"invalid YAML: {exc}") from None
    finally:
        loader.dispose()


class Section:
    """Typed, checked access to one mapping of a config file.

    Every key read is remembered, so :meth:`finish` can reject unknown keys
    (a misspelt key silently ignored is the worst kind of config bug).
    """

    def __init__(self, file: Path, data: Any, prefix: str = ""):
        self.file = file
        self.prefix = prefix
        if data is None:
            data = LineDict()
        if not isinstance(data, dict):
            raise ConfigError(file, "must be a mapping", key=prefix or None, line=getattr(data, "line", None))
        self.data = data
        self._seen: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def line(self, key: str | None = None) -> int | None:
        if isinstance(self.data, LineDict):
            return self.data.line_of(key) if key is not None else self.data.line
        return None

    def error(self, key: str | None, problem: str) -> ConfigError:
        return ConfigError(self.file, problem, key=self._key(key) if key else self.prefix or None,
                           line=self.line(key))

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None, *,
            required: bool = False, minimum: float | None = None) -> Any:
        self._seen.add(key)
        if key not in self.data or self.data[key] is None:
            if required:
                raise self.error(key, "is required")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # YAML's `true` must not pass as a number, and `5` is fine where a float is wanted.
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        elif float in kinds and isinstance(value, int) and not isinstance(value, bool):
            ok = True
            value = float(value)
        else:
            ok = isinstance(value, kinds)
        if not ok:
            names = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            raise self.error(key, f"must be {names}, got {_describe(value)}")
        if isinstance(value, float) and not math.isfinite(value):  # YAML's .nan and .inf
            raise self.error(key, f"must be a finite number, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum:g}, got {value!r}")
        return value

    def section(self, key: str) -> "Section":
        self._seen.add(key)
        return Section(self.file, self.data.get(key), self._key(key))

    def path(self, key: str, default: str | None = None) -> Path | None:
        value = self.get(key, str, default)
        if value is None:
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.file.parent / path).resolve()

    def finish(self) -> None:
        for key in self.data:
            if key not in self._seen:
                close = difflib.get_close_matches(str(key), sorted(self._seen), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.error(str(key), f"unknown key{hint}")


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list", dict: "a mapping"}


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)
