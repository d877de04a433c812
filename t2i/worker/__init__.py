"""The worker: drives one ComfyUI, tracks its jobs, stores and serves their images."""
