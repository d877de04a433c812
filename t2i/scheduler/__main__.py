"""``python -m t2i.scheduler`` / ``t2i-scheduler``."""

import asyncio
import sys

from t2i.scheduler.app import main as async_main


def main(argv: list[str] | None = None) -> None:
    sys.exit(asyncio.run(async_main(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
