"""The node classes the ComfyUI test double knows, with ComfyUI 0.3.64's definitions.

Each node has its ``/object_info`` description (``info()``; SlowNoiseImage,
SaveImage and EmptyImage are copied from the recordings) and an async ``run``
that does the simulated work through a ``NodeContext`` (engine.py): sleeping
per step, reporting progress, and rendering pictures off the event loop.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import os
import time
from typing import Any, Callable

from t2i.dataurl import dimensions, sniff

from .imaging import Picture, blend_blocks, decode_png_rgb, encode_jpeg, encode_png, sample_blocks

MAX_RESOLUTION = 16384
MAX_SEED = 0xFFFFFFFFFFFFFFFF

SAMPLERS = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm",
    "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
]
SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
              "linear_quadratic", "kl_optimal"]

def _frame(path: str, line: int, function: str, code: str, underline_from: str | None = None) -> str:
    """One traceback.format_tb() entry, with Python 3.11's ^^^ line under the failing expression."""
    text = f'  File "{path}", line {line}, in {function}\n    {code}\n'
    if underline_from is not None:
        start = 4 + code.index(underline_from)
        text += " " * start + "^" * (4 + len(code) - start) + "\n"
    return text


EXEC_FRAMES = [
    _frame("/opt/ComfyUI/execution.py", 496, "execute",
           "output_data, output_ui, has_subgraph, has_pending_tasks = await get_output_data(prompt_id, unique_id, "
           "obj, input_data_all, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, "
           "hidden_inputs=hidden_inputs)", "await"),
    _frame("/opt/ComfyUI/execution.py", 315, "get_output_data",
           "return_values = await _async_map_node_over_list(prompt_id, unique_id, obj, input_data_all, obj.FUNCTION, "
           "allow_interrupt=True, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, "
           "hidden_inputs=hidden_inputs)", "await"),
    _frame("/opt/ComfyUI/execution.py", 289, "_async_map_node_over_list", "await process_inputs(input_dict, i)"),
    _frame("/opt/ComfyUI/execution.py", 277, "process_inputs", "result = f(**inputs)", "f(**inputs)"),
]


class NodeFailure(Exception):
    """An exception a node raises, reported as ComfyUI reports it (type name, traceback frames)."""

    def __init__(self, message: str, exception_type: str, frames: list[str]):
        super().__init__(message)
        self.exception_type = exception_type
        self.frames = frames


# ----------------------------------------------------------------- values flowing between nodes

class _Opaque:
    module = "comfy"

    def __repr__(self) -> str:
        return f"<{self.module}.{type(self).__name__} object at 0x{id(self):x}>"


class ModelPatcher(_Opaque):
    module = "comfy.model_patcher"


class CLIP(_Opaque):
    module = "comfy.sd"


class VAE(_Opaque):
    module = "comfy.sd"


class Mask(_Opaque):
    module = "torch"


class Conditioning:
    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return "[[tensor([[[-0.3885,  0.0230, -0.0521,  ..., -0.4901, -0.3066,  0.0674]]]), " \
               "{'pooled_output': tensor([[-0.0317, -0.0221, -0.0235,  ...,  0.0291, -0.0169,  0.0072]])}]]"


class Latent:
    def __init__(self, width: int, height: int, keys: list[str | None]):
        self.width, self.height, self.keys = width, height, keys  # in latent pixels (1/8 of the image)

    def __repr__(self) -> str:
        return f"{{'samples': tensor([[[[0., 0., 0.,  ..., 0., 0., 0.]]]]) shape=[{len(self.keys)}, 4, " \
               f"{self.height}, {self.width}]}}"


# ----------------------------------------------------------------- node definitions

class Node:
    name = ""
    display_name = ""
    description = ""
    python_module = "nodes"
    category = ""
    output_node = False
    return_types: tuple = ()
    return_names: tuple | None = None
    output_tooltips: list | None = None
    function = "run"
    source_line = 1  # where a simulated failure "happens", for the traceback
    source_code = "raise RuntimeError(message)"
    validate_args: tuple[str, ...] = ()  # the inputs of the class's VALIDATE_INPUTS (validation.py)

    @classmethod
    def input_types(cls, sim) -> dict:
        raise NotImplementedError

    @classmethod
    def validate(cls, sim, **inputs) -> Any:
        """VALIDATE_INPUTS: True, or what is wrong (only called when ``validate_args`` is set)."""
        return True

    @classmethod
    def is_changed(cls, sim, inputs: dict) -> Any:
        """IS_CHANGED: a value that joins the node's cache key (None: the class has none)."""
        return None

    @classmethod
    def info(cls, sim) -> dict:
        types = cls.input_types(sim)
        out = {
            "input": types,
            "input_order": {key: list(value.keys()) for key, value in types.items()},
            "output": list(cls.return_types),
            "output_is_list": [False] * len(cls.return_types),
            "output_name": list(cls.return_names or cls.return_types),
            "name": cls.name,
            "display_name": cls.display_name or cls.name,
            "description": cls.description,
            "python_module": cls.python_module,
            "category": cls.category,
            "output_node": cls.output_node,
        }
        if cls.output_tooltips is not None:
            out["output_tooltips"] = cls.output_tooltips
        return out

    @classmethod
    def has_unique_id(cls, sim) -> bool:
        return "UNIQUE_ID" in cls.input_types(sim).get("hidden", {}).values()

    @classmethod
    def frames(cls) -> list[str]:
        # Illustrative: real frames of built-in nodes were not recorded (only the custom node's).
        return EXEC_FRAMES + [_frame("/opt/ComfyUI/nodes.py", cls.source_line, cls.function, cls.source_code,
                                     cls.source_code.split("(")[0].split("= ")[-1])]

    @classmethod
    async def run(cls, ctx, **inputs) -> tuple[tuple, dict | None]:
        raise NotImplementedError


class SlowNoiseImage(Node):
    name = "SlowNoiseImage"
    display_name = "Slow Noise Image (t2i test)"
    description = "Slow seeded noise image with real progress reporting (test node)."
    python_module = "custom_nodes.t2i_test_nodes"
    category = "t2i_test"
    return_types = ("IMAGE",)
    return_names = ("image",)
    function = "generate"
    failure_type = "/opt/ComfyUI/custom_nodes/t2i_test_nodes.T2ITestFailure"

    @classmethod
    def input_types(cls, sim):
        return {
            "required": {
                "width": ["INT", {"default": 64, "min": 8, "max": 4096, "step": 8}],
                "height": ["INT", {"default": 64, "min": 8, "max": 4096, "step": 8}],
                "seed": ["INT", {"default": 0, "min": 0, "max": MAX_SEED}],
                "steps": ["INT", {"default": 5, "min": 1, "max": 10000}],
                "step_seconds": ["FLOAT", {"default": 0.2, "min": 0.0, "max": 60.0, "step": 0.01}],
                "fail": ["BOOLEAN", {"default": False}],
            },
            "optional": {"preview": ["BOOLEAN", {"default": False}], "progress_text": ["BOOLEAN", {"default": False}]},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def frames(cls):
        return EXEC_FRAMES + [_frame("/opt/ComfyUI/custom_nodes/t2i_test_nodes/__init__.py", 61, "generate",
                                     "raise T2ITestFailure(")]

    @classmethod
    async def run(cls, ctx, width, height, seed, steps, step_seconds, fail, preview=False, progress_text=False,
                  unique_id=None, **_):
        picture = Picture(width, height, "noise", seed=seed)
        for i in range(steps):
            await ctx.step(step_seconds)
            if fail and i == 2:
                raise NodeFailure(f"SlowNoiseImage asked to fail (fail=true) at step {i + 1}/{steps}",
                                  cls.failure_type, cls.frames())
            if progress_text:
                ctx.progress_text(f"step {i + 1}/{steps}")
            image = None
            if preview:
                image = await ctx.blocking(lambda: encode_jpeg(width, height, picture.block_colors()))
            await ctx.progress(i + 1, steps, image)
        return ([picture],), None


class EmptyImage(Node):
    name = "EmptyImage"
    category = "image"
    return_types = ("IMAGE",)
    function = "generate"
    source_line = 1862
    source_code = 'r = torch.full([batch_size, height, width, 1], ((color >> 16) & 0xFF) / 0xFF)'

    @classmethod
    def input_types(cls, sim):
        return {"required": {
            "width": ["INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}],
            "height": ["INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}],
            "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}],
            "color": ["INT", {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color"}],
        }}

    @classmethod
    async def run(cls, ctx, width, height, batch_size, color, **_):
        rgb = ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)
        return ([Picture(width, height, "solid", rgb=rgb) for _ in range(batch_size)],), None


class CheckpointLoaderSimple(Node):
    name = "CheckpointLoaderSimple"
    display_name = "Load Checkpoint"
    description = "Loads a diffusion model checkpoint, diffusion models are used to denoise latents."
    category = "loaders"
    return_types = ("MODEL", "CLIP", "VAE")
    output_tooltips = ["The model used for denoising latents.",
                       "The CLIP model used for encoding text prompts.",
                       "The VAE model used for encoding and decoding images to and from latent space."]
    function = "load_checkpoint"
    source_line = 583
    source_code = ('out = comfy.sd.load_checkpoint_guess_config(ckpt_path, output_vae=True, output_clip=True, '
                   'embedding_directory=folder_paths.get_folder_paths("embeddings"))')

    @classmethod
    def input_types(cls, sim):
        return {"required": {"ckpt_name": [list(sim.checkpoints),
                                           {"tooltip": "The name of the checkpoint (model) to load."}]}}

    @classmethod
    async def run(cls, ctx, ckpt_name, **_):
        return (ModelPatcher(), CLIP(), VAE()), None


class CLIPTextEncode(Node):
    name = "CLIPTextEncode"
    display_name = "CLIP Text Encode (Prompt)"
    description = ("Encodes a text prompt using a CLIP model into an embedding that can be used to guide the "
                   "diffusion model towards generating specific images.")
    category = "conditioning"
    return_types = ("CONDITIONING",)
    output_tooltips = ["A conditioning containing the embedded text used to guide the diffusion model."]
    function = "encode"
    source_line = 77
    source_code = 'return (clip.encode_from_tokens_scheduled(tokens), )'

    @classmethod
    def input_types(cls, sim):
        return {"required": {
            "text": ["STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "The text to be encoded."}],
            "clip": ["CLIP", {"tooltip": "The CLIP model used for encoding the text."}],
        }}

    @classmethod
    async def run(cls, ctx, text, clip, **_):
        return (Conditioning(text),), None


class EmptyLatentImage(Node):
    name = "EmptyLatentImage"
    display_name = "Empty Latent Image"
    description = "Create a new batch of empty latent images to be denoised via sampling."
    category = "latent"
    return_types = ("LATENT",)
    output_tooltips = ["The empty latent image batch."]
    function = "generate"
    source_line = 1230
    source_code = 'latent = torch.zeros([batch_size, 4, height // 8, width // 8], device=self.device)'

    @classmethod
    def input_types(cls, sim):
        return {"required": {
            "width": ["INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8,
                              "tooltip": "The width of the latent images in pixels."}],
            "height": ["INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8,
                               "tooltip": "The height of the latent images in pixels."}],
            "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096,
                                   "tooltip": "The number of latent images in the batch."}],
        }}

    @classmethod
    async def run(cls, ctx, width, height, batch_size, **_):
        return (Latent(width // 8, height // 8, [None] * batch_size),), None


class KSampler(Node):
    name = "KSampler"
    description = "Uses the provided model, positive and negative conditioning to denoise the latent image."
    category = "sampling"
    return_types = ("LATENT",)
    output_tooltips = ["The denoised latent."]
    function = "sample"
    source_line = 1538
    source_code = ('return common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, '
                   'latent_image, denoise=denoise)')

    @classmethod
    def input_types(cls, sim):
        return {"required": {
            "model": ["MODEL", {"tooltip": "The model used for denoising the input latent."}],
            "seed": ["INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                             "tooltip": "The random seed used for creating the noise."}],
            "steps": ["INT", {"default": 20, "min": 1, "max": 10000,
                              "tooltip": "The number of steps used in the denoising process."}],
            "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "The Classifier-Free Guidance scale balances creativity and adherence to "
                                         "the prompt. Higher values result in images more closely matching the "
                                         "prompt however too high values will negatively impact quality."}],
            "sampler_name": [SAMPLERS, {"tooltip": "The algorithm used when sampling, this can affect the quality, "
                                                   "speed, and style of the generated output."}],
            "scheduler": [SCHEDULERS, {"tooltip": "The scheduler controls how noise is gradually removed to form "
                                                  "the image."}],
            "positive": ["CONDITIONING", {"tooltip": "The conditioning describing the attributes you want to "
                                                     "include in the image."}],
            "negative": ["CONDITIONING", {"tooltip": "The conditioning describing the attributes you want to "
                                                     "exclude from the image."}],
            "latent_image": ["LATENT", {"tooltip": "The latent image to denoise."}],
            "denoise": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "The amount of denoising applied, lower values will maintain the "
                                             "structure of the initial image allowing for image to image "
                                             "sampling."}],
        }}

    @classmethod
    async def run(cls, ctx, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                  denoise, **_):
        # A latent encoded from an input image (VAEEncode) shapes the result too.
        keys = [json.dumps([positive.text, negative.text, seed + i, steps, cfg, sampler_name, scheduler, denoise]
                           + ([source] if isinstance(source, str) and source.startswith("image:") else []))
                for i, source in enumerate(latent_image.keys)]
        width, height = max(1, latent_image.width), max(1, latent_image.height)
        for i in range(steps):
            await ctx.step(ctx.step_time)
            image = None
            if ctx.previews_enabled:
                image = await ctx.blocking(_sampler_preview, width, height, keys[0], seed, i + 1, steps)
            await ctx.progress(i + 1, steps, image)
        return (Latent(latent_image.width, latent_image.height, keys),), None


def _sampler_preview(width: int, height: int, key: str, seed: int, step: int, steps: int) -> bytes:
    """A latent-sized JPEG fading from noise to the final painting as sampling proceeds."""
    final = Picture(width, height, "painting", key=key)
    noise = Picture(width, height, "noise", seed=seed)
    blocks = blend_blocks(sample_blocks(noise.rows(), width, height), final.block_colors(), step / steps)
    return encode_jpeg(width, height, blocks)


class VAEDecode(Node):
    name = "VAEDecode"
    display_name = "VAE Decode"
    description = "Decodes latent images back into pixel space images."
    category = "latent"
    return_types = ("IMAGE",)
    output_tooltips = ["The decoded image."]
    function = "decode"
    source_line = 300
    source_code = 'images = vae.decode(samples["samples"])'

    @classmethod
    def input_types(cls, sim):
        return {"required": {
            "samples": ["LATENT", {"tooltip": "The latent to be decoded."}],
            "vae": ["VAE", {"tooltip": "The VAE model used for decoding the latent."}],
        }}

    @classmethod
    async def run(cls, ctx, samples, vae, **_):
        w, h = samples.width * 8, samples.height * 8
        return ([Picture(w, h, "painting", key=k) if k else Picture(w, h, "solid", rgb=(128, 118, 106))
                 for k in samples.keys],), None


class SaveImage(Node):
    name = "SaveImage"
    display_name = "Save Image"
    description = "Saves the input images to your ComfyUI output directory."
    category = "image"
    output_node = True
    function = "save_images"
    source_line = 1646
    source_code = ('img.save(os.path.join(full_output_folder, file), pnginfo=metadata, '
                   'compress_level=self.compress_level)')

    @classmethod
    def input_types(cls, sim):
        return {
            "required": {
                "images": ["IMAGE", {"tooltip": "The images to save."}],
                "filename_prefix": ["STRING", {"default": "ComfyUI", "tooltip": (
                    "The prefix for the file to save. This may include formatting information such as "
                    "%date:yyyy-MM-dd% or %Empty Latent Image.width% to include values from nodes.")}],
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    @classmethod
    async def run(cls, ctx, images, filename_prefix, prompt=None, extra_pnginfo=None, **_):
        results = await ctx.blocking(save_images, ctx.output_dir, images, filename_prefix, prompt, extra_pnginfo,
                                     ctx.alive)
        return (), {"images": results}


def compute_vars(text: str, width: int, height: int) -> str:
    text = text.replace("%width%", str(width)).replace("%height%", str(height))
    now = time.localtime()
    for name, value in (("year", now.tm_year), ("month", now.tm_mon), ("day", now.tm_mday),
                        ("hour", now.tm_hour), ("minute", now.tm_min), ("second", now.tm_sec)):
        text = text.replace(f"%{name}%", str(value).zfill(2 if name != "year" else 1))
    return text


def save_image_path(prefix: str, output_dir: str, width: int, height: int) -> tuple[str, str, int, str]:
    """ComfyUI's folder_paths.get_save_image_path: (folder, filename, next counter, subfolder)."""
    if "%" in prefix:
        prefix = compute_vars(prefix, width, height)
    subfolder = os.path.dirname(os.path.normpath(prefix))
    filename = os.path.basename(os.path.normpath(prefix))
    folder = os.path.join(output_dir, subfolder)
    if os.path.commonpath((output_dir, os.path.abspath(folder))) != output_dir:
        raise NodeFailure("**** ERROR: Saving image outside the output folder is not allowed."
                          f"\n full_output_folder: {os.path.abspath(folder)}"
                          f"\n         output_dir: {output_dir}"
                          f"\n         commonpath: {os.path.commonpath((output_dir, os.path.abspath(folder)))}",
                          "Exception", SaveImage.frames())

    def counter_of(name: str) -> tuple[int, str]:
        prefix_len = len(filename)
        try:
            digits = int(name[prefix_len + 1:].split("_")[0])
        except ValueError:
            digits = 0
        return digits, name[:prefix_len + 1]

    try:
        taken = [counter_of(n) for n in os.listdir(folder)]
        counter = max(d for d, p in taken if os.path.normcase(p[:-1]) == os.path.normcase(filename)
                      and p[-1:] == "_") + 1
    except ValueError:
        counter = 1
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
        counter = 1
    return folder, filename, counter, subfolder


def save_images(output_dir: str, images: list[Picture], prefix: str, prompt: Any, extra_pnginfo: Any,
                alive: Callable[[], bool]) -> list[dict]:
    first = images[0]
    folder, filename, counter, subfolder = save_image_path(prefix, output_dir, first.width, first.height)
    text = {}
    if prompt is not None:
        text["prompt"] = json.dumps(prompt)
    if isinstance(extra_pnginfo, dict):
        for key, value in extra_pnginfo.items():
            text[str(key)] = json.dumps(value)
    results = []
    for batch_number, image in enumerate(images):
        name = f"{filename.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
        data = encode_png(image.width, image.height, image.rows(), text)
        if not alive():  # the simulated process was killed meanwhile: write nothing more
            break
        with open(os.path.join(folder, name), "wb") as handle:
            handle.write(data)
        results.append({"filename": name, "subfolder": subfolder, "type": "output"})
        counter += 1
    return results


# ----------------------------------------------------------------- input images (PROTOCOL §12)

def input_path(sim, name: str) -> str | None:
    """folder_paths.get_annotated_filepath: ``name`` (``sub/x.png``, ``x.png [output]``) -> a path.

    Unlike ComfyUI, a name that leaves its folder is refused (None) rather than followed."""
    base = sim.directories["input"]
    for tag in ("output", "input", "temp"):
        if name.endswith(f" [{tag}]"):
            name, base = name[:-len(tag) - 3], sim.directories[tag]
            break
    path = os.path.abspath(os.path.join(base, name))
    return path if os.path.commonpath((path, os.path.abspath(base))) == os.path.abspath(base) else None


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def load_picture(data: bytes, path: str) -> Picture:
    """What PIL would open: a PNG's own pixels, or (JPEG, WebP) a picture of the image's size."""
    kind = sniff(data)
    size = dimensions(data, kind) if kind else None
    key = "image:" + hashlib.sha256(data).hexdigest()
    if size is None:
        raise NodeFailure(f"cannot identify image file '{path}'", "PIL.UnidentifiedImageError", LoadImage.frames())
    decoded = decode_png_rgb(data) if kind == "image/png" else None
    if decoded is not None:
        width, height, rows = decoded
        return Picture(width, height, "pixels", rows=rows, key=key)
    return Picture(size[0], size[1], "painting", key=key)


class LoadImage(Node):
    name = "LoadImage"
    display_name = "Load Image"
    category = "image"
    return_types = ("IMAGE", "MASK")
    function = "load_image"
    source_line = 1700
    source_code = "img = node_helpers.pillow(Image.open, image_path)"
    validate_args = ("image",)

    @classmethod
    def input_types(cls, sim):
        # The input folder's own files (not its subfolders), by content type from the name.
        folder = sim.directories["input"]
        try:
            files = [f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f))]
        except FileNotFoundError:
            files = []
        files = [f for f in files if (mimetypes.guess_type(f)[0] or "").split("/")[0] == "image"]
        return {"required": {"image": [sorted(files), {"image_upload": True}]}}

    @classmethod
    def validate(cls, sim, image=None, **_):
        path = input_path(sim, image) if isinstance(image, str) else None
        if path is None or not os.path.isfile(path):
            return f"Invalid image file: {image}"
        return True

    @classmethod
    def is_changed(cls, sim, inputs):
        path = input_path(sim, str(inputs.get("image")))
        try:
            return hashlib.sha256(_read(path)).hexdigest() if path else "nan"
        except OSError:
            return "nan"

    @classmethod
    async def run(cls, ctx, image, **_):
        path = input_path(ctx.sim, image)
        data = await ctx.blocking(_read, path)
        picture = await ctx.blocking(load_picture, data, path)
        return ([picture], Mask()), None


class VAEEncode(Node):
    name = "VAEEncode"
    display_name = "VAE Encode"
    category = "latent"
    return_types = ("LATENT",)
    function = "encode"
    source_line = 322
    source_code = "t = vae.encode(pixels[:,:,:,:3])"

    @classmethod
    def input_types(cls, sim):
        return {"required": {"pixels": ["IMAGE"], "vae": ["VAE"]}}

    @classmethod
    async def run(cls, ctx, pixels, vae, **_):
        # The VAE crops to a multiple of 8 pixels (vae_encode_crop_pixels); a latent pixel is 8x8 of them.
        first = pixels[0]
        return (Latent(first.width // 8, first.height // 8, [_image_key(p) for p in pixels]),), None


def _image_key(picture: Picture) -> str:
    """What an encoded picture contributes to the sampler's result: its file's hash, or its making."""
    key = picture.params.get("key")
    if isinstance(key, str) and key.startswith("image:"):
        return key
    making = [picture.kind, picture.width, picture.height, key, picture.params.get("seed"), picture.params.get("rgb")]
    return "image:" + hashlib.sha256(json.dumps(making).encode()).hexdigest()


class RepeatLatentBatch(Node):
    name = "RepeatLatentBatch"
    display_name = "Repeat Latent Batch"
    category = "latent/batch"
    return_types = ("LATENT",)
    function = "repeat"
    source_line = 1302
    source_code = "s[\"samples\"] = s_in.repeat((amount, 1, 1, 1))"

    @classmethod
    def input_types(cls, sim):
        return {"required": {"samples": ["LATENT"], "amount": ["INT", {"default": 1, "min": 1, "max": 64}]}}

    @classmethod
    async def run(cls, ctx, samples, amount, **_):
        return (Latent(samples.width, samples.height, list(samples.keys) * amount),), None


NODE_CLASSES: dict[str, type[Node]] = {cls.name: cls for cls in (
    CheckpointLoaderSimple, CLIPTextEncode, EmptyLatentImage, KSampler, VAEDecode, SaveImage, EmptyImage,
    SlowNoiseImage, LoadImage, VAEEncode, RepeatLatentBatch)}
