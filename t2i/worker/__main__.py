"""``python -m t2i.worker --config config/worker.yaml`` (console script ``t2i-worker``).

``T2I_PROFILE=/path/worker.prof`` runs the event loop's thread under cProfile, timed by that thread's
CPU time (a wall-clock profile on a busy box charges waits for the CPU and the GIL to whatever ran
then), and writes its stats there at exit (``python -m pstats /path/worker.prof``); the journal's
writer thread is not in it. Nothing is profiled without it.
"""

from __future__ import annotations

import asyncio
import os
import sys

from t2i.worker.app import main as async_main


def main(argv: list[str] | None = None) -> None:
    profile_path = os.environ.get("T2I_PROFILE")
    if not profile_path:
        sys.exit(asyncio.run(async_main(argv)))
    import cProfile  # only when asked: profiling slows every call
    import time

    profiler = cProfile.Profile(time.thread_time)
    try:
        code = profiler.runcall(asyncio.run, async_main(argv))
    finally:
        profiler.dump_stats(profile_path)
    sys.exit(code)


if __name__ == "__main__":
    main()
