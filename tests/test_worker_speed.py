"""The worker's speed model (t2i/worker/speed.py): seconds per job + seconds per step, an exponentially
weighted least-squares line through completed jobs' run spans. Pure: known samples, known parameters."""

from __future__ import annotations

import pytest

from t2i.worker.speed import Fit, Speed, Sums, fit


def plain(*samples):
    """Unweighted sums of (steps, seconds): each sample's weight 1."""
    sums = Sums()
    for steps, seconds in samples:
        sums = sums.add(steps, seconds, 1.0)
    return sums


def test_samples_on_a_line_give_its_fixed_and_per_step_parts():
    speed = Speed()
    for steps in [1, 20, 5, 12, 3, 17, 8, 1, 20]:
        speed.observe(steps, 0.05 + 0.02 * steps)
    assert speed.seconds_per_job == pytest.approx(0.05, abs=1e-6)
    assert speed.seconds_per_step == pytest.approx(0.02, abs=1e-6)


def test_nothing_is_reported_before_three_jobs():
    speed = Speed()
    for n, steps in enumerate([1, 20, 5]):
        assert speed.seconds_per_job is None and speed.seconds_per_step is None, n
        speed.observe(steps, 0.05 + 0.02 * steps)
    assert (speed.seconds_per_job, speed.seconds_per_step) == pytest.approx((0.05, 0.02), abs=1e-6)


def test_newer_jobs_weigh_more_so_a_slower_gpu_shows_within_some_jobs():
    speed = Speed()
    for steps in [1, 20] * 5:
        speed.observe(steps, 0.05 + 0.02 * steps)
    for steps in [1, 20] * 40:   # the GPU now runs at 0.04 s a step, the same fixed part
        speed.observe(steps, 0.05 + 0.04 * steps)
    assert (speed.seconds_per_job, speed.seconds_per_step) == pytest.approx((0.05, 0.04), abs=1e-3)


def test_jobs_of_one_size_split_nothing_off_at_first():
    speed = Speed()
    for _ in range(5):
        speed.observe(10, 0.25)
    assert (speed.seconds_per_job, speed.seconds_per_step) == pytest.approx((0.0, 0.025), abs=1e-9)


def test_jobs_of_one_size_keep_the_split_fitted_before():
    speed = Speed()
    for steps in [1, 20, 5, 12]:
        speed.observe(steps, 0.05 + 0.02 * steps)
    for _ in range(200):   # long enough that the mixed jobs' weight is gone: a degenerate fit
        speed.observe(10, 0.25)
    assert fit(speed.sums) == Fit(0.0, pytest.approx(0.025))          # no split known from these alone ...
    assert (speed.seconds_per_job, speed.seconds_per_step) == pytest.approx((0.05, 0.02), abs=1e-6)  # ... kept


def test_a_line_below_zero_at_no_steps_goes_through_zero_instead():
    # Through (10, 0.2) and (20, 0.5) the line is 0.03 x - 0.1: least squares through the origin is
    # (10 x 0.2 + 20 x 0.5) / (10² + 20²) = 0.024 s a step.
    assert fit(plain((10, 0.2), (20, 0.5))) == (0.0, pytest.approx(0.024))


def test_longer_jobs_that_ran_shorter_count_as_all_fixed_cost():
    assert fit(plain((5, 0.3), (15, 0.2))) == (pytest.approx(0.25), 0.0)


def test_a_steps_spread_under_one_step_is_one_job_size():
    # 20 and 21 steps: a line through them would swing wildly with each job's noise.
    assert fit(plain((20, 0.5), (21, 0.7)), previous_per_job=0.1) == (pytest.approx(0.1), pytest.approx(0.5 / 20.5))
    assert fit(plain((20, 0.5), (21, 0.7)), previous_per_job=1.0) == (pytest.approx(0.6), 0.0)   # at most all of it


def test_no_samples_no_fit():
    assert fit(Sums()) is None


def test_a_sample_is_a_completed_jobs_run_seen_from_start_to_end():
    speed = Speed()
    speed.run_started("a", 100.0)
    speed.run_ended("a", 100.5)
    speed.finished("a", 20, completed=True)
    speed.run_ended("restored", 101.0)        # its start was before this process: no span
    speed.finished("restored", 20, completed=True)
    speed.run_started("failed", 101.0)
    speed.run_ended("failed", 101.2)
    speed.finished("failed", 20, completed=False)
    speed.run_started("cancelled", 102.0)     # ended before its run did
    speed.finished("cancelled", 20, completed=False)
    assert speed.samples == 1 and speed.sums == plain((20, 0.5))
    assert not speed._started and not speed._ran   # nothing held for jobs that ended
