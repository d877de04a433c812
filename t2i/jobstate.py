"""Job states, and the answers built from a job's status object, for worker and scheduler alike."""

from __future__ import annotations

from typing import Any

PENDING, RUNNING, COMPLETED, FAILED, CANCELLED = "pending", "running", "completed", "failed", "cancelled"
UNFINISHED = frozenset({PENDING, RUNNING})
FINISHED = frozenset({COMPLETED, FAILED, CANCELLED})

MAX_WAIT = 60.0  # seconds a /status long-poll may hold a request


def result_of(status: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """``GET /result``'s (HTTP status, body) from a ``GET /status`` object."""
    state = status.get("status")
    if state not in FINISHED:
        return 202, status
    body: dict[str, Any] = {"prompt_id": status.get("prompt_id"), "status": state}
    if state == COMPLETED:
        body.update(image_url=status.get("image_url"), image_urls=status.get("image_urls") or [],
                    completed_at=status.get("completed_at"))
        if status.get("image_expired"):
            body.update(image_expired=True, error=status.get("error") or "The image has expired.")
    else:
        body.update(error=status.get("error"), completed_at=status.get("completed_at"))
    return 200, body
