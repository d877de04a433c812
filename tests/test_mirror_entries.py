"""The mirror keeps each job as its status JSON and the few fields routing reads (t2i.scheduler.mirror.Entry)."""

from __future__ import annotations

import json

from t2i.scheduler.mirror import Mirror


def job(prompt_id: str, status: str, version: int, **fields) -> dict:
    return {"prompt_id": prompt_id, "status": status, "version": version, "progress": None, "steps": None,
            "client": "anon:" + "127.0.0.1", **fields}


def test_an_entry_answers_the_status_object_as_the_worker_sent_it():
    mirror = Mirror()
    sent = job("a", "running", 7, progress={"value": 3, "max": 20}, steps=20, image_urls=[], workflow="txt2img")
    mirror.apply("gpu", {"epoch": "e", "seq": 7, "full": True, "jobs": [sent], "removed": []})
    entry = mirror.get("a")
    assert entry.encoded() == json.dumps(sent, separators=(",", ":")).encode()
    assert entry.status == sent and (entry.version, entry.state, entry.final) == (7, "running", False)
    entry.status["status"] = "changed by a reader"  # a reader's copy, not the mirror's
    assert entry.status["status"] == "running"


def test_steps_ahead_are_read_from_the_entries():
    mirror = Mirror()
    jobs = [job("queued", "pending", 1, steps=20),
            job("half-way", "running", 2, steps=20, progress={"value": 5, "max": 20}),
            job("raw", "pending", 3),                                   # a raw workflow: steps unknown
            job("from-progress", "running", 4, progress={"value": 1, "max": 4}),
            job("done", "completed", 5, steps=30)]
    mirror.apply("gpu", {"epoch": "e", "seq": 5, "full": True, "jobs": jobs, "removed": []})
    assert mirror.steps_ahead("gpu", 7) == 20 + 15 + 7 + 3
    assert mirror.counts("gpu") == (2, 2)


def test_a_change_replaces_the_entry_and_an_unchanged_repeat_wakes_nobody():
    mirror = Mirror()
    mirror.apply("gpu", {"epoch": "e", "seq": 1, "full": True, "jobs": [job("a", "pending", 1)], "removed": []})
    woken = []
    mirror.park("a", lambda: woken.append("a"))
    mirror.apply("gpu", {"epoch": "e", "seq": 1, "full": False, "jobs": [job("a", "pending", 1)], "removed": []})
    assert woken == []
    mirror.apply("gpu", {"epoch": "e", "seq": 2, "full": False, "jobs": [job("a", "completed", 2)], "removed": []})
    assert woken == ["a"] and mirror.get("a").final and mirror.counts("gpu") == (0, 0)


def test_jobs_of_one_client_share_one_copy_of_its_name():
    mirror = Mirror()
    jobs = [job(f"j{i}", "pending", i, client="".join(["ali", "ce"])) for i in range(3)]  # equal, not identical
    mirror.apply("gpu", {"epoch": "e", "seq": 3, "full": True, "jobs": jobs, "removed": []})
    names = {id(name) for name in mirror.clients._client_of.values()}
    assert len(mirror.clients._client_of) == 3 and len(names) == 1
