"""A ComfyUI 0.3.64 test double for t2i: the real HTTP + websocket protocol on a real socket.

    from t2i.comfy_sim import ComfySim

    sim = ComfySim(step_time=0.05,        # seconds per KSampler step (SlowNoiseImage uses its step_seconds)
                   output_dir=None,        # where SaveImage writes PNGs; default: a fresh temp dir
                   previews=False,         # like --preview-method auto: KSampler preview frames per step
                   checkpoints=("v1-5-pruned-emaonly.safetensors",),
                   input_dir=None)          # POST /upload/image's folder (LoadImage reads it); default: beside output
    port = await sim.start(port=0, address="127.0.0.1")   # sim.url -> "http://127.0.0.1:PORT"
    await sim.stop()       # like SIGTERM: websockets end without a close frame, listening stops
    await sim.restart()    # same port; queue/history lost, number back to 0, cache cold
    sim.drop_websockets()  # abort every websocket now; prompts keep running
    sim.fail_next(node_type="KSampler", message="CUDA out of memory")  # next such node raises
    sim.stall = True       # running prompts freeze before their next step, silently
    sim.history, sim.queue_running, sim.queue_pending, sim.number    # state (number is settable)
    sim.submitted          # [(prompt_id, prompt, extra_data)] accepted by POST /prompt
    sim.uploads            # [{name, subfolder, type}] POST /upload/image answered
    sim.rename_uploads = True  # every upload stored (and answered) as "<name> (1).<ext>": a ComfyUI renaming
    sim.interrupts         # bodies of POST /interrupt (None for an empty body)

Nodes: SlowNoiseImage (the recordings' test node), EmptyImage, SaveImage and the SD1.5 set
CheckpointLoaderSimple, CLIPTextEncode, EmptyLatentImage, KSampler, VAEDecode; for input images
(PROTOCOL §12) LoadImage (VALIDATE_INPUTS "Invalid image file: …", IS_CHANGED by the file's hash),
VAEEncode (crops to a multiple of 8 pixels) and RepeatLatentBatch.
Standalone: ``python -m t2i.comfy_sim --port 8188 --step-time 0.2``; add ``--control-port N`` for the
knobs over HTTP on 127.0.0.1:N (``POST /control/stall`` etc.; see control.py, ``ControlServer``).
"""

from .server import ComfySim

__all__ = ["ComfySim"]
