"""One image's way through the model, shared by every front end (restore, evaluate, Dask batches):

    read (images.read_image) -> the task's model (TaskModels) -> model input (to_model_input)
    -> restore_array (padding, tiles, self-ensemble) -> output (from_model_output) -> write

plus where outputs go (default_output, plan_outputs, check_outputs). `restore_images` is the
middle of that chain for one group of images; the command-line front ends only parse, call and
print.
"""
from __future__ import annotations

import os
import threading

import numpy as np

from eamamba_ref.apps import inference
from eamamba_ref.runtime import backends as ssm
from eamamba_ref.io.atomic import check_destination, check_writable
from eamamba_ref.apps.errors import RestoreError
from eamamba_ref.io.images import Image, from_batch, is_gray, to_batch
from eamamba_ref.reference.layers import bicubic_upsample
from eamamba_ref.io.loading import load
from eamamba_ref.apps.tasks import check_task


def load_task_model(task, weights=None, backend=None, channels=3):
    """The model for `task`: from `weights` (official .pth / converted .npz) or the bundled demo
    (`channels` 1: the task's bundled gray model)."""
    if weights is None:
        path = task.bundled_path(channels)
        if path is None:
            raise RestoreError(task.weights_help())
        if not os.path.exists(path):
            raise RestoreError(f"bundled weights {path} are missing from this installation; reinstall "
                               f"eamamba_ref or pass --weights")
    else:
        path = weights
        if not os.path.exists(path):
            raise RestoreError(f"{path}: no such weights file")
        if os.path.isdir(path):
            raise RestoreError(f"{path} is a folder; --weights takes a weights file (official .pth or converted .npz)")
    model, info = load(path, backend=backend, return_info=True)
    check_task(info.get("meta"), task)          # weights that record another task: refused
    cfg = model.config
    if cfg.name != task.model:
        raise RestoreError(f"{path} holds an {cfg.name} model, but task '{task.name}' needs an {task.model} model "
                           f"(official configs/{task.official_config}.yaml)")
    if cfg.name == "eamambasr" and cfg.upscale != task.scale:
        raise RestoreError(f"{path} is an x{cfg.upscale} super-resolution model, task '{task.name}' is x{task.scale}")
    if task.inputs == 2 and cfg.inp_channels != 6:
        raise RestoreError(f"{path} takes {cfg.inp_channels} input channels; '{task.name}' needs a dual-pixel "
                           f"model (6 channels: left and right views)")
    if task.inputs == 1 and cfg.inp_channels not in (1, 3):
        raise RestoreError(f"{path} takes {cfg.inp_channels} input channels; '{task.name}' needs an RGB (3) or "
                           f"gray (1) model" + (" — this looks like a dual-pixel model: use --task defocus-deblur"
                                                if cfg.inp_channels == 6 else ""))
    return model


class TaskModels:
    """The models one run may use, each loaded once, on first use: the given weights, or the
    task's bundled colour model and, for gray images, its bundled gray model.

    Why two bundled models: a gray photo fed to a colour model as (g, g, g) carries one noise
    field copied into three channels, a noise the colour model never saw; it comes back noisy.
    """

    def __init__(self, task, weights=None, backend=None):
        self.task, self.weights, self.backend = task, weights, backend
        self._loaded = {}
        self._lock = threading.Lock()           # Dask worker threads share one TaskModels

    def _load(self, channels):
        key = None if self.weights is not None else channels
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = load_task_model(self.task, self.weights, self.backend, channels)
            return self._loaded[key]

    def check(self):
        """Load the given weights now (a bad file fails before any image is read)."""
        if self.weights is not None:
            self._load(None)

    def pick(self, image: Image, path="the image"):
        """The model for `image`: gray images (one channel, or three equal ones) go to a 1-channel
        model where there is one; a 1-channel model refuses colour images."""
        return self.for_channels(1 if self.task.inputs == 1 and is_gray(image.pixels) else 3, path)

    def for_channels(self, channels, path="the image"):
        """The model for images of `channels` colour channels (1: gray, 3: RGB)."""
        if self.weights is None:
            return self._load(1 if channels == 1 and self.task.bundled_gray else 3)
        model = self._load(None)
        if model.config.inp_channels == 1 and channels != 1:
            raise RestoreError(f"{self.weights} is a gray (1-channel) model and {path} is a colour image")
        return model


def as_model_channels(image: Image, channels):
    """`image` with the pixels a `channels`-channel model reads: a gray image saved as RGB (three
    equal channels) becomes one channel for a gray model; alpha and bit depth are kept."""
    if channels == 1 and image.pixels.shape[2] == 3:
        return Image(pixels=np.ascontiguousarray(image.pixels[..., :1]), alpha=image.alpha,
                     bit_depth=image.bit_depth, path=image.path)
    return image


def to_model_input(images, task, channels=3):
    """Images -> `(1, C, H, W)`: gray is replicated to RGB for a colour (`channels` 3) model; the
    dual-pixel views are stacked."""
    planes = [np.repeat(im.pixels, 3, axis=2) if im.pixels.shape[2] == 1 and channels == 3 else im.pixels
              for im in images]
    x = to_batch(np.concatenate(planes, axis=2))
    if task.pre_upsample:                # RealSR models restore a bicubic-upsampled LR image
        x = bicubic_upsample(x, task.scale)
    return x


def restore_array(model, x, tile=None, overlap=32, use_ensemble=False, progress=None):
    """Model output for `x (1, C, H, W)` with padding, optional tiling and self-ensemble."""
    def run(inp):
        return inference.tiled(model, inp, tile, overlap, progress)
    return inference.ensemble(run, x) if use_ensemble else run(x)


def from_model_output(y, like: Image, scale):
    """`(1, C', H', W')` -> `(H', W', C)` with the input's C channels (a colour output of a gray
    input is averaged, a gray output of an RGB input repeated); alpha resized if needed."""
    out = from_batch(y)
    if like.pixels.shape[2] == 1 and out.shape[2] == 3:
        out = out.mean(axis=2, keepdims=True)
    elif like.pixels.shape[2] == 3 and out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    alpha = like.alpha
    if alpha is not None and scale != 1:       # alpha is not restored: nearest-neighbour resize
        alpha = np.repeat(np.repeat(alpha, scale, axis=0), scale, axis=1)
    return out, alpha


def add_noise(image: Image, sigma, seed):
    """Seeded gaussian noise of std sigma/255 (like the official test: no clipping of the input)."""
    rng = np.random.default_rng(seed)
    noisy = image.pixels + rng.standard_normal(image.pixels.shape).astype(np.float32) * np.float32(sigma / 255.0)
    return Image(pixels=noisy, alpha=image.alpha, bit_depth=image.bit_depth, path=image.path)


def default_output(input_path, task, out_dir=None):
    root, ext = os.path.splitext(os.path.basename(input_path))
    ext = ext if ext.lower() in (".png", ".tif", ".tiff") else ".png"   # no second lossy encoding; .gif, .bmp, ...: PNG
    return os.path.join(out_dir or os.path.dirname(os.path.abspath(input_path)), f"{root}_{task.name}{ext}")


def names_a_file(output):
    """Whether -o/--out names an output file (it has an extension and is not an existing folder)."""
    return bool(output) and not os.path.isdir(output) and bool(os.path.splitext(output)[1])


def output_folder(output):
    """Create the output folder -o names (if needed); one-line error if it is an existing file."""
    if os.path.lexists(output) and not os.path.isdir(output):
        raise RestoreError(f"{output} exists and is not a folder (an -o/--out without an extension names an "
                           f"output folder; give a file name with an extension, e.g. out.png)")
    os.makedirs(output, exist_ok=True)
    return output


def plan_outputs(groups, task, output=None):
    """`(inputs, output path)` for each group of inputs, refusing two groups with one output.

    `output` (-o): a file name for a single group, else a folder (created) or None (next to the
    first input, named `<input>_<task>`). Nothing is written; the caller checks the paths."""
    if names_a_file(output):
        if len(groups) > 1:
            raise RestoreError("several inputs need -o to be a folder, not a file name")
        return [(groups[0], output)]
    if output:
        output_folder(output)
    plan, seen = [], {}
    for group in groups:
        dst = default_output(group[0], task, output)
        key = os.path.abspath(dst)
        if key in seen:
            raise RestoreError(f"{seen[key]} and {group[0]} would both be written to {dst}; restore them into "
                               f"different -o/--out folders")
        seen[key] = group[0]
        plan.append((group, dst))
    return plan


def check_outputs(plan, overwrite):
    """Before any work: every output may be written (not an input, not existing unless
    `overwrite`, its folder exists and takes files)."""
    inputs = [p for group, _ in plan for p in group]
    for _, dst in plan:
        check_destination(dst, overwrite, inputs)
    for folder in sorted({os.path.dirname(os.path.abspath(dst)) for _, dst in plan}):
        check_writable(folder)


def restore_images(task, models, images, sigma=None, seed=0, tile=None, overlap=32, ensemble=False,
                   progress=None, note=None):
    """One group of images (one, or the two dual-pixel views) -> restored `(H', W', C)` pixels and
    alpha, C as the first image's. The steps of every front end (restore, Dask batches).

    The model comes from `models.pick` (gray images to a gray model where there is one); `sigma`
    adds seeded noise first, on the channels the model reads; `note(line)` hears that an RGB image
    with three equal channels is restored as gray.
    """
    first = images[0]
    model = models.pick(first, first.path or "the image")
    channels = model.config.inp_channels // task.inputs
    if channels == 1 and first.pixels.shape[2] == 3 and note is not None:
        note(f"{first.path}: its three colour channels are equal: restoring it as a gray image")
    work = [as_model_channels(im, channels) for im in images]
    if sigma is not None:
        work = [add_noise(im, sigma, seed) for im in work]
    y = restore_array(model, to_model_input(work, task, channels), tile, overlap, ensemble, progress)
    return from_model_output(y, first, task.scale)      # alpha follows the output's size


def default_backend():
    """The whole model on the GPU where one works (numba-cuda sees a real GPU), else Numba's CPU
    kernels. The CUDA path passed benchmarks/gpu_check.py on an NVIDIA H200 (every kernel and the
    whole model against NumPy, the official denoiser against the PyTorch reference on the GPU)."""
    if "cuda" in ssm.available_backends() and not os.environ.get("NUMBA_ENABLE_CUDASIM"):
        return "cuda"
    return "numba"
