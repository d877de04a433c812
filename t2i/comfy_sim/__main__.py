"""python -m t2i.comfy_sim: run the ComfyUI test double until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from .control import ControlServer
from .server import ComfySim


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m t2i.comfy_sim",
                                     description="A ComfyUI 0.3.64 test double (HTTP + websocket protocol).")
    parser.add_argument("--port", type=int, default=8188, help="port to listen on (default 8188; 0 = any)")
    parser.add_argument("--listen", "--address", dest="address", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--step-time", type=float, default=0.2, help="seconds per KSampler step (default 0.2)")
    parser.add_argument("--output-dir", default=None, help="where SaveImage writes (default: a new temp dir)")
    parser.add_argument("--previews", action="store_true", help="send KSampler previews (like --preview-method auto)")
    parser.add_argument("--checkpoint", action="append", dest="checkpoints", metavar="NAME",
                        help="a checkpoint name CheckpointLoaderSimple accepts (repeatable; "
                             "default v1-5-pruned-emaonly.safetensors)")
    parser.add_argument("--control-port", type=int, default=None, metavar="N",
                        help="also serve the fault knobs (stall, drop websockets, restart, fail next) as a "
                             "small HTTP API on 127.0.0.1:N (0 = any free port); see t2i/comfy_sim/control.py")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    sim = ComfySim(step_time=args.step_time, output_dir=args.output_dir, previews=args.previews,
                   checkpoints=tuple(args.checkpoints or ("v1-5-pruned-emaonly.safetensors",)))
    # Signals are handled before the lines below are printed: whoever reads them may stop us at once.
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, done.set)
    await sim.start(port=args.port, address=args.address)
    print(f"comfy_sim: ComfyUI test double at {sim.url} (output {sim.output_dir}); Ctrl-C stops", flush=True)
    control = None
    if args.control_port is not None:
        control = ControlServer(sim)
        await control.start(args.control_port)
        print(f"comfy_sim: control API at {control.url}/control/state", flush=True)
    await done.wait()
    if control is not None:
        await control.stop()
    await sim.stop()


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
