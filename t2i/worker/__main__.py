"""``python -m t2i.worker --config config/worker.yaml`` (console script ``t2i-worker``).

``T2I_PROFILE=/path/worker.prof`` runs the event loop's thread under cProfile, timed by that thread's
CPU time (a wall-clock profile on a busy box charges waits for the CPU and the GIL to whatever ran
then), and writes its stats there at exit (``python -m pstats /path/worker.prof``); the journal's
writer thread is not in it. Nothing is profiled without it.
"""

from __future__ import annotations

from t2i.cli import run_main
from t2i.worker.app import main as async_main


def main(argv: list[str] | None = None) -> None:
    run_main(async_main(argv), "T2I_PROFILE")


if __name__ == "__main__":
    main()
