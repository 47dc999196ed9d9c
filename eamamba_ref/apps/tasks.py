"""The restoration tasks of the official model zoo, where their weights come from, and `check_task`."""
from __future__ import annotations

import os
from dataclasses import dataclass

from eamamba_ref.io.checkpoint import CheckpointError
from eamamba_ref.io.untrusted import brief

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "weights")
OFFICIAL_CHECKPOINTS = "the 'Checkpoints' Google Drive folder linked in the README of github.com/daidaijr/EAMamba"


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    official_config: str            # configs/<this>.yaml in the official repository
    model: str                      # 'eamamba' (U-Net) or 'eamambasr'
    scale: int = 1                  # output size / input size
    inputs: int = 1                 # 2 for dual-pixel defocus deblurring (left and right views)
    pre_upsample: bool = False      # RealSR: bicubic-upsample the LR input, restore at HR size
    bundled: str | None = None      # demo weights shipped in eamamba_ref/weights/
    bundled_gray: str | None = None  # ... and a 1-channel model of them for gray images

    def weights_help(self):
        """How to get weights for this task, in one line."""
        return (f"task '{self.name}' has no bundled weights: download the official checkpoint trained with "
                f"configs/{self.official_config}.yaml from {OFFICIAL_CHECKPOINTS}, then run "
                f"`python -m eamamba_ref.convert CHECKPOINT.pth {self.name}.npz` and pass "
                f"`--weights {self.name}.npz` (the .pth also works directly)")

    def bundled_path(self, channels=3):
        """The bundled weights for images of `channels` (1: gray, where the task has a gray model)."""
        name = self.bundled_gray if channels == 1 else self.bundled
        return os.path.join(WEIGHTS_DIR, name) if name else None


TASKS = {t.name: t for t in [
    Task("denoise", "gaussian colour denoising (blind, sigma up to 50)", "denoise-eamamba", "eamamba",
         bundled="denoise_demo.npz", bundled_gray="denoise_gray_demo.npz"),
    Task("real-denoise", "real camera noise (SIDD)", "sidd-eamamba", "eamamba"),
    Task("motion-deblur", "motion deblurring (GoPro)", "gopro-eamamba", "eamamba"),
    Task("defocus-deblur", "dual-pixel defocus deblurring (DPDD): two inputs, left and right view",
         "dpdd-eamamba", "eamamba", inputs=2),
    Task("dehaze-indoor", "dehazing (RESIDE ITS / SOTS indoor)", "dehazeITS-eamamba", "eamamba"),
    Task("dehaze-outdoor", "dehazing (RESIDE OTS / SOTS outdoor)", "dehazeOTS-eamamba", "eamamba"),
    Task("derain", "deraining (Rain13K)", "derain-eamamba", "eamamba"),
    Task("realsr2", "real-world super-resolution x2 (RealSR)", "realsrx2-eamamba", "eamamba", 2, pre_upsample=True),
    Task("realsr3", "real-world super-resolution x3 (RealSR)", "realsrx3-eamamba", "eamamba", 3, pre_upsample=True),
    Task("realsr4", "real-world super-resolution x4 (RealSR)", "realsrx4-eamamba", "eamamba", 4, pre_upsample=True),
    Task("sr2", "lightweight super-resolution x2 (bicubic degradation)", "srx2-eamambasr-light", "eamambasr", 2,
         bundled="sr2_demo.npz"),
    Task("sr3", "lightweight super-resolution x3 (bicubic degradation)", "srx3-eamambasr-light", "eamambasr", 3),
    Task("sr4", "lightweight super-resolution x4 (bicubic degradation)", "srx4-eamambasr-light", "eamambasr", 4),
]}


class TaskMismatchError(CheckpointError):
    """Weights whose metadata records another task than the one asked for."""


def check_task(weights_meta, task):
    """Refuse weights recorded as trained for another task than `task`, in one line.

    weights_meta: the ``meta`` dict of a converted file (``eamamba_ref.load(path, return_info=True)[1]
    ["meta"]``) or None. Files written by ``python -m eamamba_ref.convert --task NAME`` and the bundled
    demo weights record their task there; official checkpoints record none, so there is nothing to check.
    task: a `Task` or a task name. Returns the recorded task name (None if none is recorded); raises
    `TaskMismatchError` (a `CheckpointError`) when it differs from `task`.
    """
    name = task.name if isinstance(task, Task) else task
    recorded = weights_meta.get("task") if isinstance(weights_meta, dict) else None
    if recorded is None:
        return None
    if not isinstance(recorded, str):
        raise TaskMismatchError(f"the weights' metadata records a task that is not a name: {brief(recorded)}")
    if recorded != name:
        raise TaskMismatchError(f"these weights were trained for task '{brief(recorded)[1:-1]}', not '{name}': "
                                f"use --task {brief(recorded)[1:-1]}, or weights trained for '{name}'")
    return recorded
