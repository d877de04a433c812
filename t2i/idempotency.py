"""Idempotency-Key (IETF httpapi draft): one key, one job, whichever replica or worker sees it.

The job's id is derived from the key, so a scheduler replica, a restarted scheduler and
the worker all arrive at the same ``prompt_id`` without sharing any state; the worker
journals the key with a fingerprint of the request body to tell a retry (same body)
from a reuse of the key for something else (422).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

HEADER = "Idempotency-Key"
MAX_LENGTH = 200
_NAMESPACE = uuid.UUID("5b0a3f5e-8d1c-4c55-9b52-2f3d1e7a6c01")  # t2i's own; never change it


class BadKey(ValueError):
    """The header's value cannot be a key; ``str()`` says why."""


def check_key(value: str) -> str:
    if not 1 <= len(value) <= MAX_LENGTH or not all(" " <= ch <= "~" for ch in value):
        raise BadKey(f"The {HEADER} header must be 1 to {MAX_LENGTH} printable ASCII characters.")
    return value


def prompt_id_for(key: str) -> str:
    """The job id a key stands for (a UUID, like every other job id)."""
    return str(uuid.uuid5(_NAMESPACE, key))


def fingerprint(body: Any) -> str:
    """A digest of a request body that ignores key order and spacing."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
