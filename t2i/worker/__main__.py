"""``python -m t2i.worker --config config/worker.yaml`` (console script ``t2i-worker``)."""

from __future__ import annotations

import asyncio
import sys

from t2i.worker.app import main as async_main


def main(argv: list[str] | None = None) -> None:
    sys.exit(asyncio.run(async_main(argv)))


if __name__ == "__main__":
    main()
