"""How fast this worker's GPU runs jobs: seconds per job (fixed) + seconds per sampler step.

Placement (t2i/scheduler/placement.py) expects a job to end after the jobs and steps ahead of it, so it
needs both parts: a job's fixed costs (the graph's other nodes, VAE decode, saving the image; on a loaded
box 50-150 ms for the ComfyUI double) folded into a per-step figure make a 1-step job look as cheap as
1/20 of a 20-step one, and a GPU behind a run of short jobs looks idle sooner than it is.

Each completed job gives one sample (steps, seconds of its run as this worker saw it: ComfyUI's
``execution_start`` -> ``execution_success`` / ``executing null``, so not the image copy that follows,
which overlaps the next job's run). The two parts are an exponentially weighted least-squares line
through recent samples (:func:`fit`). When recent jobs all had about the same steps the line is not
determined: the last fitted fixed part is kept (0 before any) and the per-step part follows the mean.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Fit(NamedTuple):
    seconds_per_job: float
    seconds_per_step: float


class Sums(NamedTuple):
    """Weighted sums over the samples: weights, steps, seconds, steps², steps × seconds."""
    w: float = 0.0
    x: float = 0.0
    y: float = 0.0
    xx: float = 0.0
    xy: float = 0.0

    def add(self, steps: float, seconds: float, keep: float) -> "Sums":
        """These sums with older samples' weight times ``keep`` and a new sample of weight 1."""
        return Sums(self.w * keep + 1.0, self.x * keep + steps, self.y * keep + seconds,
                    self.xx * keep + steps * steps, self.xy * keep + steps * seconds)


MIN_SPREAD_SHARE = 0.1  # steps' weighted spread under this share of their mean (or 1 step): one job size


def fit(sums: Sums, previous_per_job: float = 0.0) -> Fit | None:
    """Seconds per job and per step from weighted sums of (steps, seconds); None without samples.

    Neither part is negative: a line that says so (noise, or fixed costs that changed) is replaced by
    the nearest that does not (all per-step, or all per-job)."""
    if sums.w <= 0 or sums.x <= 0:
        return None
    mean_x, mean_y = sums.x / sums.w, sums.y / sums.w
    variance = max(sums.xx / sums.w - mean_x * mean_x, 0.0)
    if variance ** 0.5 < max(1.0, MIN_SPREAD_SHARE * mean_x):
        per_job = min(max(previous_per_job, 0.0), mean_y)   # one job size: keep the split we had
        return Fit(per_job, (mean_y - per_job) / mean_x)
    per_step = (sums.xy / sums.w - mean_x * mean_y) / variance
    per_job = mean_y - per_step * mean_x
    if per_step < 0:
        return Fit(mean_y, 0.0)
    if per_job < 0:
        return Fit(0.0, sums.xy / sums.xx)   # the least-squares line through the origin
    return Fit(per_job, per_step)


class Speed:
    """This worker's speed, from its completed jobs' run spans. None until a few jobs have been seen:
    one job's costs (model load on the first) say little about the GPU."""

    weight = 0.1   # the newest job's share: ~10 recent jobs fit the line (two parameters need more than one did)
    trusted = 3    # jobs seen before the speed is reported

    def __init__(self) -> None:
        self.sums = Sums()
        self.samples = 0
        self.current: Fit | None = None
        self._started: dict[str, float] = {}   # prompt_id -> monotonic start of its run
        self._ran: dict[str, float] = {}       # prompt_id -> seconds its run took, until it completes

    @property
    def seconds_per_step(self) -> float | None:
        return self.current.seconds_per_step if self.current and self.samples >= self.trusted else None

    @property
    def seconds_per_job(self) -> float | None:
        return self.current.seconds_per_job if self.current and self.samples >= self.trusted else None

    def run_started(self, prompt_id: str, at: float) -> None:
        self._started[prompt_id] = at

    def run_ended(self, prompt_id: str, at: float) -> None:
        start = self._started.pop(prompt_id, None)
        if start is not None:
            self._ran[prompt_id] = max(at - start, 0.0)

    def finished(self, prompt_id: str, steps: Any, completed: bool) -> None:
        """A job ended: a sample when it completed and its run was seen from start to end here
        (not one restored from the journal mid-run); its marks are forgotten either way."""
        self._started.pop(prompt_id, None)
        seconds = self._ran.pop(prompt_id, None)
        if completed and seconds is not None and steps:
            self.observe(int(steps), seconds)

    def observe(self, steps: int, seconds: float) -> None:
        self.sums = self.sums.add(steps, seconds, 1.0 - self.weight)
        self.samples += 1
        new = fit(self.sums, self.current.seconds_per_job if self.current else 0.0)
        if new is not None:
            self.current = Fit(round(new.seconds_per_job, 6), round(new.seconds_per_step, 6))
