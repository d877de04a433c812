"""The scheduler's plain classes, without HTTP: registry (reload, routing choice) and mirror."""

from __future__ import annotations

import asyncio
import os

import pytest

from support.cluster import write_workers_yaml
from support.timing import until
from t2i.config import ConfigError
from t2i.jobstate import result_of
from t2i.scheduler.mirror import Mirror
from t2i.scheduler.placement import NoWorkerAvailable, Placement
from t2i.scheduler.registry import Registry


def entry(name, port, **kw):
    return {"name": name, "url": f"http://127.0.0.1:{port}", **kw}


def up(registry, *names):
    for name in names:
        state = registry.workers[name]
        state.reachable = state.comfyui_reachable = True


class FakeMirror:
    """What the registry and placement ask of the mirror, with loads and calls set by the test."""

    def __init__(self, loads=None):
        self.loads = loads if loads is not None else {}
        self.unfinished_jobs: dict[str, int] = {}
        self.calls: list[tuple[str, str]] = []
        self.outcomes: list[tuple[str, str, str]] = []

    def counts(self, name):
        return self.loads.get(name, 0), 0

    def feed_up(self, name):
        return True

    def recent_unseen(self, name):
        return 0

    def recent_unseen_steps(self, name):
        return 0

    def steps_ahead(self, name, unknown):
        return self.loads.get(name, 0) * unknown  # each job the test put there: a typical one

    def unfinished(self, name):
        return self.unfinished_jobs.get(name, 0)

    def take_outcomes(self):
        outcomes = list(self.outcomes)
        self.outcomes.clear()
        return outcomes

    def jobs_of(self, name):
        return 0

    def feed(self, name):
        return None

    def follow(self, name, url, delay=0):
        self.calls.append(("follow", name))

    def unfollow(self, name):
        self.calls.append(("unfollow", name))

    def poke(self, name):
        self.calls.append(("poke", name))

    def suspect(self, name, error):
        self.calls.append(("suspect", name))


def make_registry(tmp_path, workers, loads=None):
    path = write_workers_yaml(tmp_path / "workers.yaml", workers)
    mirror = FakeMirror(loads)
    registry = Registry(path, mirror)
    registry.load_initial()
    return registry, path, mirror.loads


def make_placement(tmp_path, workers, loads=None, **kw):
    registry, path, loads = make_registry(tmp_path, workers, loads)
    return Placement(registry, registry.mirror, **kw), registry, loads


def rewrite(path, workers):
    write_workers_yaml(path, workers)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a new mtime even on coarse clocks


def test_choose_least_loaded_then_round_robin(tmp_path):
    placement, registry, loads = make_placement(tmp_path, [entry("a", 1), entry("b", 2), entry("c", 3)])
    up(registry, "a", "b", "c")
    loads.update(a=2, b=0, c=0)
    picks = [placement.choose().name for _ in range(4)]
    assert set(picks) == {"b", "c"} and picks[0] != picks[1]
    loads.update(b=3, c=3)
    assert placement.choose().name == "a"
    # submissions on their way count as load, by their steps
    registry.workers["a"].in_flight, registry.workers["a"].in_flight_steps = 2, 40
    assert placement.choose().name in {"b", "c"}


def test_choose_where_the_job_ends_first_at_each_workers_measured_speed(tmp_path):
    """Issue 15: a fast GPU with a longer queue beats an idle slow one when it finishes first."""
    placement, registry, loads = make_placement(tmp_path, [entry("fast", 1), entry("slow", 2)])
    up(registry, "fast", "slow")
    registry.workers["fast"].health = {"load": {"seconds_per_step": 0.1}}
    registry.workers["slow"].health = {"load": {"seconds_per_step": 1.0}}
    loads.update(fast=3, slow=0)  # fast: (3 x 20 + 20) x 0.1 = 8 s; slow: 20 x 1.0 = 20 s
    assert placement.choose(steps=20).name == "fast"
    loads.update(fast=20)         # fast: (400 + 20) x 0.1 = 42 s: now the slow one ends it first
    assert placement.choose(steps=20).name == "slow"
    # A worker not measured yet is taken at the pool's median speed, not as infinitely fast.
    registry.workers["slow"].health = {}
    loads.update(fast=0, slow=1)
    assert placement.choose(steps=20).name == "fast"


def test_choose_skips_full_down_disabled_and_says_why(tmp_path):
    placement, registry, loads = make_placement(
        tmp_path, [entry("a", 1, max_queue=2), entry("b", 2), entry("c", 3, enabled=False)])
    up(registry, "a", "b", "c")
    registry.workers["b"].mark_down("refused", unreachable=True)
    loads["a"] = 1
    assert placement.choose().name == "a"
    loads["a"] = 2
    with pytest.raises(NoWorkerAvailable, match="full"):
        placement.choose()
    loads["a"] = 0
    registry.workers["a"].comfyui_reachable = False
    with pytest.raises(NoWorkerAvailable, match="down"):
        placement.choose()
    placement2, _, _ = make_placement(tmp_path, [entry("x", 1, enabled=False)])
    with pytest.raises(NoWorkerAvailable, match="disabled"):
        placement2.choose()


@pytest.mark.gen_test(timeout=5)
async def test_reload_applies_edits_and_keeps_last_good(tmp_path):
    registry, path, _ = make_registry(tmp_path, [entry("a", 1)])
    calls = registry.mirror.calls
    registry.start()
    assert calls == [("follow", "a")]
    assert registry.reload_if_changed() is None
    rewrite(path, [entry("a", 1), entry("b", 2)])
    assert registry.reload_if_changed() is True
    assert list(registry.workers) == ["a", "b"] and calls[-1] == ("follow", "b")
    await until(lambda: registry.workers["b"].last_checked, what="the added worker checked at once")
    registry.stop()
    path.write_text("workers:\n  - name: a\n    url: http://127.0.0.1:1\n  - name: a\n    url: http://x:2\n")
    assert registry.reload_if_changed() is False
    assert "duplicate worker name" in registry.config.error and ":4:" in registry.config.error
    assert list(registry.workers) == ["a", "b"]
    assert registry.reload_if_changed() is None  # the same broken content is reported once
    path.write_text("workers: [\n")
    assert registry.reload_if_changed() is False and "invalid YAML" in registry.config.error
    path.unlink()
    assert registry.reload_if_changed() is False and "file not found" in registry.config.error
    rewrite(path, [entry("b", 2)])
    assert registry.reload_if_changed() is True and registry.config.error is None
    assert not registry.workers["a"].listed and registry.workers["b"].listed
    # a removed worker is dropped once drained and the linger passed
    registry.drain_linger = 0
    registry.mirror.unfinished_jobs["a"] = 1
    registry.workers["a"].reachable = True
    registry.drop_drained()
    assert "a" in registry.workers
    registry.mirror.unfinished_jobs["a"] = 0
    registry.drop_drained()
    registry.drop_drained()
    assert "a" not in registry.workers and calls[-1] == ("unfollow", "a")


def test_start_up_errors_raise(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        Registry(tmp_path / "missing.yaml", FakeMirror()).load_initial()
    path = tmp_path / "w.yaml"
    path.write_text("workers:\n  - name: a\n    url: ftp://x\n")
    with pytest.raises(ConfigError, match=r"w.yaml:3: workers\[0\].url"):
        Registry(path, FakeMirror()).load_initial()


def job(pid, status="pending", version=1, **kw):
    return {"prompt_id": pid, "status": status, "version": version, **kw}


def test_mirror_apply_full_changes_removed():
    mirror = Mirror()
    mirror.apply("a", {"epoch": "e", "seq": 2, "full": True, "jobs": [job("1"), job("2", "running", 2)],
                       "removed": []})
    assert mirror.counts("a") == (1, 1) and mirror.owner("1") == "a"
    assert mirror.fresh("1") is None  # no feed up for "a": not fresh
    mirror.apply("a", {"epoch": "e", "seq": 4, "full": False,
                       "jobs": [job("2", "completed", 4)], "removed": ["1"]})
    assert mirror.get("1") is None and mirror.counts("a") == (0, 0)
    assert mirror.fresh("2").status["status"] == "completed"  # final: answerable without a feed
    mirror.apply("a", {"epoch": "f", "seq": 1, "full": True, "jobs": [job("3")], "removed": []})
    assert mirror.get("2") is None and mirror.jobs_of("a") == 1
    mirror.note_submitted("9", "b", 20)
    assert mirror.owner("9") == "b" and mirror.recent_unseen("b") == 1
    mirror.apply("b", {"epoch": "g", "seq": 1, "full": True, "jobs": [job("9")], "removed": []})
    assert mirror.recent_unseen("b") == 0 and mirror.owner("9") == "b"
    mirror.drop_worker("b")
    assert mirror.owner("9") is None


@pytest.mark.gen_test(timeout=5)
async def test_mirror_wait_wakes_on_change_and_cleans_up_when_cancelled():
    mirror = Mirror()
    mirror.apply("a", {"epoch": "e", "seq": 1, "full": True, "jobs": [job("1")], "removed": []})
    mirror._feeds["a"] = type("F", (), {"up": True})()  # a feed that is up
    waiter = asyncio.ensure_future(mirror.wait("1", 1, 5))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    mirror.apply("a", {"epoch": "e", "seq": 2, "full": False, "jobs": [job("1", "running", 2)], "removed": []})
    await asyncio.wait_for(waiter, 1)
    waiter = asyncio.ensure_future(mirror.wait("1", 2, 5))  # the client goes away: its wait is cancelled
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not mirror._waiters


def test_result_of_a_status_object():
    assert result_of(job("1", "running"))[0] == 202
    code, body = result_of(job("1", "completed", image_url="u", image_urls=["u"], completed_at=5))
    assert code == 200 and body == {"prompt_id": "1", "status": "completed", "image_url": "u",
                                    "image_urls": ["u"], "completed_at": 5}
    code, body = result_of(job("1", "failed", error="boom", completed_at=5))
    assert code == 200 and body == {"prompt_id": "1", "status": "failed", "error": "boom", "completed_at": 5}


def test_a_forced_reload_reads_an_edit_that_kept_mtime_and_size(tmp_path):
    """SIGHUP forces a content check: an edit within the timestamp granularity is not missed."""
    import os

    registry, path, _ = make_registry(tmp_path, [entry("a", 1)])
    stat = path.stat()
    path.write_text(path.read_text().replace("name: a", "name: b"))  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime
    assert registry.reload_if_changed() is None  # the cheap check sees nothing
    assert registry.reload_if_changed(force=True) is True
    assert [name for name, state in registry.workers.items() if state.listed] == ["b"]


def test_the_pool_catalogue_joins_list_choices_and_webhook_prefixes_of_every_worker(tmp_path):
    """Each worker's ComfyUI offers its own models: a value any of them has passes the scheduler."""
    placement, registry, _ = make_placement(tmp_path, [entry("a", 1), entry("b", 2)])

    def catalogue(checkpoints, hooks):
        cat = {"default_workflow": "txt2img", "allow_raw_workflows": False,
               "workflows": {"txt2img": {"params": {"ckpt": {"type": "enum", "choices": checkpoints},
                                                    "steps": {"type": "integer", "max": 50}}}}}
        if hooks:
            cat["webhooks"] = {"allowed_urls": hooks}
        return cat

    registry.workers["a"].catalogue = catalogue(["sd15.safetensors"], ["https://hooks.example/"])
    registry.workers["b"].catalogue = catalogue(["sdxl.safetensors", "sd15.safetensors"], [])
    registry.generation += 1
    specs = placement.specs()
    assert specs["workflows"]["txt2img"]["params"]["ckpt"]["choices"] == ["sd15.safetensors", "sdxl.safetensors"]
    assert specs["webhooks"] == {"allowed_urls": ["https://hooks.example/"]}
    assert registry.workers["a"].catalogue["workflows"]["txt2img"]["params"]["ckpt"]["choices"] == \
        ["sd15.safetensors"]  # the workers' own catalogues are left as they are
