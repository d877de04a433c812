"""t2i.waiters.done_within: a bounded wait that never swallows its caller's cancel (asyncio.wait_for on
Python 3.11 does, when the cancel comes as the awaited thing finishes: a feed follower told to stop by
Mirror.stop then ran on, and the stop never ended)."""

from __future__ import annotations

import asyncio
import sys

import pytest

from t2i.waiters import done_within


@pytest.mark.gen_test(timeout=5)
async def test_a_cancel_that_comes_as_the_awaited_thing_finishes_is_kept():
    loop = asyncio.get_running_loop()
    inner = loop.create_future()
    waiting = asyncio.ensure_future(done_within(inner, 30))
    await asyncio.sleep(0)  # waiting on it now
    inner.set_result("done")
    waiting.cancel()  # the same moment
    with pytest.raises(asyncio.CancelledError):
        await waiting


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="asyncio.wait_for was rewritten in 3.12")
@pytest.mark.gen_test(timeout=5)
async def test_asyncio_wait_for_swallows_that_cancel_here():
    """Why done_within exists: the same moment with wait_for returns the result to a cancelled caller."""
    loop = asyncio.get_running_loop()
    inner = loop.create_future()
    waiting = asyncio.ensure_future(asyncio.wait_for(inner, 30))
    await asyncio.sleep(0)
    inner.set_result("done")
    waiting.cancel()
    assert await waiting == "done"


@pytest.mark.gen_test(timeout=5)
async def test_it_gives_the_finished_future_or_an_unfinished_one_it_cancels_after_the_timeout():
    finished = await done_within(asyncio.sleep(0, "slept"), 5)
    assert finished.result() == "slept"
    stuck = asyncio.ensure_future(asyncio.sleep(30))
    timed_out = await done_within(stuck, 0.01)
    assert timed_out is stuck and not stuck.done()
    with pytest.raises(asyncio.CancelledError):
        await stuck  # cancelled: nothing is left running
