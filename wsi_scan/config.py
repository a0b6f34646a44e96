"""Every default of wsi-scan, in one place, as frozen dataclasses.

The CLI builds these from its options (its defaults are read from here) and the library
accepts them; nothing else hard-codes a tunable number.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Backend = Literal["auto", "openslide", "tifffile"]
Mode = Literal["auto", "dense", "patch"]
DeviceName = Literal["auto", "cpu", "cuda"]

#: PatchCamelyon patches were cut at level 2 of Camelyon16 slides scanned at 0.243 um/px.
PCAM_MPP = 0.972
PCAM_PATCH_PX = 96
PCAM_CELL_PX = 32


@dataclass(frozen=True)
class TissueConfig:
    """Tissue detection on a low-resolution thumbnail."""

    mask_mpp: float = 8.0  # thumbnail resolution, um/px
    min_saturation: float = 0.07  # floor under Otsu's threshold: grey glass never counts as tissue
    max_value_dark: float = 0.12  # HSV value below this is ink/black background, not tissue
    closing_um: float = 24.0  # radius of the closing that bridges gaps inside tissue
    min_object_um2: float = 20_000.0  # smaller specks (dust, debris) are dropped
    min_hole_um2: float = 20_000.0  # smaller holes inside tissue are filled
    min_cell_fraction: float = 0.05  # share of a cell's area that must be tissue to scan it


@dataclass(frozen=True)
class ScanConfig:
    """How one slide is scanned."""

    backend: Backend = "auto"
    mpp: float | None = None  # user override of the slide's um/px
    mpp_source: str = "user (--mpp)"  # where that override came from, recorded in the outputs
    mode: Mode = "auto"
    device: DeviceName = "auto"
    block_cells: int = 16  # cells per block side: one region read and one dense pass each; 16 keeps peak RSS under 1.5 GB (docs/benchmarks.md)
    batch_size: int = 256  # windows per forward pass in patch mode
    threads: int = 2  # Dask threads per slide: blocks read and computed concurrently
    checkpoint_s: float = 30.0  # save finished blocks this often, so an interrupted scan resumes (0: never)
    tile_cache_mb: int = 256  # bound on decoded tiles kept for later blocks (peak 80 MB on a 60000 px wide slide, 161 MB at 120000 px)
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    tta: bool = False  # average the 8 dihedral views
    max_upsample: float = 1.1  # a slide at most this much coarser than the model is accepted
    mpp_xy_tolerance: float = 0.02  # relative disagreement of x and y pixel size that is an error
    overwrite: bool = False
    tissue: TissueConfig = field(default_factory=TissueConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    """Training of a patch classifier."""

    arch: str = "dense-cnn"
    width: int = 32
    epochs: int = 12
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    optimizer: Literal["adamw", "sgd"] = "adamw"
    schedule: Literal["onecycle", "cosine"] = "onecycle"
    label_smoothing: float = 0.05
    val_fraction: float = 0.1  # only used when a data set has no given validation split
    seed: int = 0
    augment: bool = True
    stain_jitter: float = 0.05  # HED channel scale/shift amplitude
    jpeg_prob: float = 0.5  # share of patches re-encoded as JPEG during training
    jpeg_quality: tuple[int, int] = (50, 95)
    soften_prob: float = 0.3  # share of patches shrunk by up to soften_max and enlarged back
    soften_max: float = 1.15
    threads: int = 0  # torch CPU threads, 0 = all cores
    loader_workers: int = 1
    device: DeviceName = "auto"
    max_train: int = 0  # cap on training patches (0 = all), for smoke runs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
