"""The restoration tasks of the official model zoo, and where their weights come from."""
from __future__ import annotations

import os
from dataclasses import dataclass

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
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

    def weights_help(self):
        """How to get weights for this task, in one line."""
        return (f"task '{self.name}' has no bundled weights: download the official checkpoint trained with "
                f"configs/{self.official_config}.yaml from {OFFICIAL_CHECKPOINTS}, then run "
                f"`python -m eamamba_ref.convert CHECKPOINT.pth {self.name}.npz` and pass "
                f"`--weights {self.name}.npz` (the .pth also works directly)")

    def bundled_path(self):
        return os.path.join(WEIGHTS_DIR, self.bundled) if self.bundled else None


TASKS = {t.name: t for t in [
    Task("denoise", "gaussian colour denoising (blind, sigma up to 50)", "denoise-eamamba", "eamamba",
         bundled="denoise_demo.npz"),
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
