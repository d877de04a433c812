"""``python -m t2i.scheduler`` / ``t2i-scheduler``.

``T2I_SCHEDULER_PROFILE=/path/scheduler.prof`` runs the event loop under cProfile timed by the thread's
CPU time and writes its stats there at exit (bench-only, as the worker's ``T2I_PROFILE``; its own name
so a bench can profile one process of several started with one environment). Nothing is profiled without it.
"""

import sys

from t2i.cli import run_main
from t2i.scheduler.app import main as async_main


def main(argv: list[str] | None = None) -> None:
    run_main(async_main(argv), "T2I_SCHEDULER_PROFILE")


if __name__ == "__main__":
    main(sys.argv[1:])
