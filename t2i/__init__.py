"""t2i: text-to-image serving in front of a pool of ComfyUI machines."""

__version__ = "0.1.0"
