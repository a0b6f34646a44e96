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
ReadLevel = Literal["exact", "nearest"]
Decode = Literal["auto", "cpu", "device"]

#: PatchCamelyon patches were cut at level 2 of Camelyon16 slides scanned at 0.243 um/px.
PCAM_MPP = 0.972
PCAM_INPUT_PX = 96  # the model's window side in px (ModelCard.input_px)
PCAM_CELL_PX = 32

#: physical sense: slide scanners image at 0.1-0.5 um/px, thumbnails and masks up to tens of um/px;
#: a pixel size outside this range is a lying file or a typo, and would ask for absurd allocations
MPP_RANGE_UM = (0.05, 50.0)
#: a glass slide is 75 x 25 mm: an image wider or taller than this is not a slide at its stated scale
MAX_SLIDE_EXTENT_MM = 100.0
#: a tumour annotation labels a cell only if they share at least this area (level-0 px^2): less is
#: the rounding of an edge they share, since cell edges fall between level-0 pixels
MIN_LABEL_OVERLAP_L0_PX2 = 0.5
#: the tissue thumbnail is held in memory whole; beyond this, ask for a coarser --tissue-mpp
MAX_THUMBNAIL_BYTES = 1 << 30
#: windows per patch-mode pass on the CPU, at most (--batch-size is capped to it there): a pass
#: of 256 windows holds first-layer activations above glibc's mmap threshold, which it maps and
#: unmaps afresh every pass (page faults: much of the CPU time in the kernel, and a higher peak
#: RSS); 32 windows per pass is a dense block's footprint, reuses the heap, and is as fast
#: (docs/benchmarks.md, "Patch mode memory")
CPU_PATCH_BATCH = 32
#: heatmap opacity over the slide in the overlay picture and the report's thumbnails (one value,
#: so that both pictures of a slide look alike)
OVERLAY_ALPHA = 0.5
#: longest side of an overlay's slide thumbnail, px (``wsi-scan overlay --max-size``); the colour
#: bar and caption are drawn beside and below it
OVERLAY_MAX_SIZE_PX = 2048
#: the smallest --max-size: below it the colour bar's labels overlap
OVERLAY_MIN_SIZE_PX = 128
#: the validation specificity ``threshold`` and ``ensemble`` may choose a threshold for: below 0.5
#: a threshold would call most negatives tumour
RULE_SPECIFICITY_RANGE = (0.5, 0.9999)
#: fewer patches of a class than this and a threshold chosen on them, or an AUC measured on them,
#: moves by several points with a handful of patches: said in a warning, not refused (a quick look
#: at a small folder is legitimate)
FEW_PATCHES_PER_CLASS = 50
#: step between the windows ``wsi-scan tile`` cuts, in cells: 3 gives non-overlapping 96 px windows
TILE_STRIDE_CELLS = 3
#: largest disagreement, in 8-bit levels, between a device's JPEG decoder and libjpeg-turbo on a
#: slide's probe tiles that still lets ``--decode auto`` decode on the device (and the mean must
#: stay under the second value): decoders within the JPEG standard's IDCT accuracy differ by a
#: level or two, a colour-space mix-up by tens
DEVICE_DECODE_MAX_ABS = 8
DEVICE_DECODE_MAX_MEAN = 0.5
#: bytes of float64 rows the device resampler converts at a time: a 64-cell block of a 40x slide
#: read at level 0 is ~8,000 px square, 1.6 GB in float64 at once
DEVICE_RESAMPLE_BAND_BYTES = 64 << 20


def _in_range(owner: str, name: str, value: Any, lo: float, hi: float, lo_open: bool = False, flag: str | None = None) -> None:
    """Raise UsageError unless lo <= value <= hi (lo < value when ``lo_open``); NaN never passes."""
    from .errors import UsageError

    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and (value > lo if lo_open else value >= lo)
        and value <= hi
    )
    if not ok:

        def num(v: float) -> str:  # whole bounds in full: "2147483647", not "2.14748e+09"
            return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:g}"

        lo_s = f"> {num(lo)}" if lo_open else f">= {num(lo)}"
        opt = flag or "--" + name.replace("_", "-")
        raise UsageError(f"{opt} must be a number {lo_s} and <= {num(hi)} ({owner}.{name}), found {value!r}")


@dataclass(frozen=True)
class TissueConfig:
    """Tissue detection on a low-resolution thumbnail (``tissue.py`` says why each step).

    ``method="glass"`` thresholds saturation just above the glass's own (estimated from the
    thumbnail's bright, grey mode), so fat, loose stroma and small fragments count as tissue;
    ``"otsu"`` is the former rule (Otsu's threshold between pale and dark tissue, kept for
    comparison); ``"all"`` takes every cell of the slide's bounds.
    """

    method: Literal["glass", "otsu", "all"] = "glass"
    mask_mpp: float = 8.0  # thumbnail resolution, um/px
    min_saturation: float = 0.025  # floor of the threshold: above scanner glass's saturation (docs/tissue.md, the rule)
    max_saturation: float = 0.08  # cap of the threshold ("glass" method), the value used when no glass is seen
    glass_min_value: float = 0.7  # glass is bright: HSV value at least this ...
    glass_max_saturation: float = 0.12  # ... and grey: saturation below this
    glass_margin: float = 0.012  # threshold = glass saturation mode + max(margin, 4 x its robust spread)
    max_value_dark: float = 0.12  # HSV value below this is black background or ink, not tissue
    otsu_min_saturation: float = 0.07  # floor under Otsu's threshold ("otsu" method), as before
    ink_green_excess: float = 6.0  # G - R above this (0-255) is blue or green pen: H&E never has G > R
    ink_grey_value: float = 0.45  # darker than this and ...
    ink_grey_saturation: float = 0.2  # ... less saturated than this: black marker, bubble edges, dirt
    closing_um: float = 32.0  # radius of the closing that bridges gaps inside tissue (fat membranes)
    min_object_um2: float = 1_000.0  # smaller specks (dust) are dropped; a 96 px window is ~8,700 um2
    stained_saturation: float = 0.15  # ... unless they carry stain this strong somewhere ...
    min_stained_object_um2: float = 400.0  # ... and are at least this large (20 um square; 6 px at 8 um/px)
    min_hole_um2: float = 20_000.0  # smaller holes inside tissue (fat cells, vessels) are filled
    min_cell_fraction: float = 0.05  # share of a cell's area that must be tissue to scan it
    min_window_fraction: float = 0.1  # or share of its window's (3 x 3 cells) area (1: off)
    # the stain check: a cell left out whose window the thumbnail saw faint signs of tissue in (a
    # small piece of the mask, pixels over the threshold that the 3 x 3 mean or the speck rule
    # took away, or pixels darker than their neighbours) is read again at stain_check_mpp and scanned when its window
    # holds this much stain: fat membranes and a few nuclei are 1-2 px lines and dots at 1 um/px,
    # averaged into the glass at 8 um/px (docs/tissue.md, point 7)
    stain_check: bool = True
    # share of the threshold that sends a pixel's cells to the check (0.75 read 1.7x the cells on
    # the benchmark slide for one more patch of 2,896 at 40x)
    stain_check_evidence: float = 1.0
    stain_check_fragment_um2: float = 50_000.0  # mask pieces up to this size send their neighbours to the check
    stain_check_dip: float = 0.03  # ... or darker than its 3 x 3 neighbourhood's mean by this (HSV value)
    stain_check_mpp: float = 2.0  # um/px of the second look (a cell is a whole number of its px)
    stain_check_saturation: float = 0.08  # a stained pixel: above any glass (0.005-0.04) ...
    stain_check_min_um2: float = 20.0  # ... and this much of them in the window (a few nuclei)

    def __post_init__(self) -> None:
        # the one place where tissue settings are range-checked (CLI and Python API alike)
        from .errors import UsageError

        if self.method not in ("glass", "otsu", "all"):
            raise UsageError(f"--tissue must be glass, otsu or all, found {self.method!r}")
        for name, lo, hi, lo_open, flag in (
            ("mask_mpp", 1.0, 64.0, False, "--tissue-mpp"),
            ("min_saturation", 0.0, 1.0, False, None),
            ("max_saturation", 0.0, 1.0, False, None),
            ("otsu_min_saturation", 0.0, 1.0, False, None),
            ("glass_min_value", 0.0, 1.0, False, None),
            ("glass_max_saturation", 0.0, 1.0, False, None),
            ("glass_margin", 0.0, 1.0, False, None),
            ("ink_green_excess", 0.0, 255.0, False, None),
            ("ink_grey_value", 0.0, 1.0, False, None),
            ("ink_grey_saturation", 0.0, 1.0, False, None),
            ("max_value_dark", 0.0, 1.0, False, None),
            ("closing_um", 0.0, 1000.0, False, None),
            ("min_object_um2", 0.0, 1e12, False, None),
            ("stained_saturation", 0.0, 1.0, False, None),
            ("min_stained_object_um2", 0.0, 1e12, False, None),
            ("min_hole_um2", 0.0, 1e12, False, None),
            ("min_cell_fraction", 0.0, 1.0, False, None),
            ("min_window_fraction", 0.0, 1.0, False, None),
            ("stain_check_evidence", 0.0, 1.0, True, None),
            ("stain_check_dip", 0.0, 1.0, True, None),
            ("stain_check_fragment_um2", 0.0, 1e12, False, None),
            ("stain_check_mpp", 0.25, 16.0, False, None),
            ("stain_check_saturation", 0.0, 1.0, True, None),
            ("stain_check_min_um2", 0.0, 1e6, True, None),
        ):
            _in_range("tissue", name, getattr(self, name), lo, hi, lo_open, flag)


@dataclass(frozen=True)
class LesionConfig:
    """Lesions from a heatmap (``lesions.py``): CAMELYON17's size classes and the false-positive rule."""

    seed_prob: float = 0.95  # a lesion needs one cell at least this probable (hysteresis; docs/lesions.md)
    itc_mm: float = 0.2  # longest diameter up to this: isolated tumour cells
    macro_mm: float = 2.0  # above this: macro-metastasis (between the two: micro)

    def __post_init__(self) -> None:
        _in_range("lesions", "seed_prob", self.seed_prob, 0.0, 1.0)
        _in_range("lesions", "itc_mm", self.itc_mm, 0.0, 100.0)
        _in_range("lesions", "macro_mm", self.macro_mm, self.itc_mm, 100.0)


@dataclass(frozen=True)
class ScanConfig:
    """How one slide is scanned."""

    backend: Backend = "auto"
    #: the user's level-0 um/px, replacing the slide's metadata (--mpp, or a row of --mpp-csv);
    #: written to the outputs' config under its file key "mpp" (``to_dict``)
    mpp_override: float | None = None
    mpp_source: str = ""  # where an override came from ("" = the --mpp option), recorded in the outputs
    mode: Mode = "auto"
    device: DeviceName = "auto"
    #: cells per block side: one region read and one dense pass each; 16 keeps peak RSS within the
    #: issue's target (docs/benchmarks.md, current results)
    block_cells: int = 16
    batch_size: int = 256  # windows per forward pass in patch mode
    threads: int = 2  # Dask threads per slide: blocks read and computed concurrently
    checkpoint_s: float = 30.0  # save finished blocks this often, so an interrupted scan resumes (0: never)
    # bound on decoded tiles kept for later blocks, MiB (its measured peaks: docs/benchmarks.md)
    tile_cache_mib: int = 256
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    tta: bool = False  # average the 8 dihedral views
    max_upsample: float = 1.1  # a slide at most this much coarser than the model is accepted
    #: pyramid level read (geometry.choose_level): "nearest" = the nearest in pixel size, enlarged
    #: by up to max_upsample; "exact" = the coarsest at or finer than the model, shrunk. Measured
    #: end to end on a 40x mosaic of the validation split, nearest loses less AUC than the 0.002
    #: allowed for much less CPU time (docs/benchmarks.md, "Read-level policy")
    read_level: ReadLevel = "nearest"
    #: where JPEG tiles are decoded and the block resampled: "device" = on the model's device
    #: (nvJPEG on a GPU; ``device_regions``), "cpu" = libjpeg-turbo and Pillow, "auto" = on a CUDA
    #: device when the read level is JPEG tiles the tifffile backend reads and the device's
    #: decoder agrees with the CPU's on the slide's tiles (``DEVICE_DECODE_MAX_*``), else the CPU
    decode: Decode = "auto"
    mpp_xy_tolerance: float = 0.02  # relative disagreement of x and y pixel size that is an error
    overwrite: bool = False
    tissue: TissueConfig = field(default_factory=TissueConfig)
    tissue_mask: str | None = None  # a mask image of the slide (any downsample) replacing the detected tissue
    roi: str | None = None  # GeoJSON polygons in level-0 px: scan only cells whose centre lies inside

    def __post_init__(self) -> None:
        if self.mpp_override is not None:
            _in_range("scan", "mpp_override", self.mpp_override, *MPP_RANGE_UM, flag="--mpp")
        for name, lo, hi in (
            ("block_cells", 1, 512),
            ("batch_size", 0, 65536),
            ("threads", 1, 1024),
            ("checkpoint_s", 0.0, 1e6),
            ("tile_cache_mib", 0, 1 << 20),
            ("max_upsample", 1.0, 4.0),
            ("mpp_xy_tolerance", 0.0, 0.5),
        ):
            _in_range("scan", name, getattr(self, name), lo, hi)
        for name, allowed in (
            ("mode", ("auto", "dense", "patch")),
            ("device", ("auto", "cpu", "cuda")),
            ("backend", ("auto", "openslide", "tifffile")),
            ("read_level", ("exact", "nearest")),
            ("decode", ("auto", "cpu", "device")),
        ):
            if getattr(self, name) not in allowed:
                from .errors import UsageError

                raise UsageError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, found {getattr(self, name)!r}")

    @property
    def mpp_override_source(self) -> str:
        return self.mpp_source or "user (--mpp)"

    def to_dict(self) -> dict[str, Any]:
        """The settings as a heatmap's attrs record them and ``settings_hash`` hashes them: the
        fields in order, ``mpp_override`` under its file key ``mpp``."""
        return {("mpp" if k == "mpp_override" else k): v for k, v in dataclasses.asdict(self).items()}


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
    brightness_contrast: float = 0.08  # amplitude of the random brightness shift and contrast scale
    sgd_momentum: float = 0.9  # with optimizer="sgd" (Nesterov)
    onecycle_pct_start: float = 0.15  # share of the steps spent warming up to lr (schedule="onecycle")
    valid_batch_size: int = 512  # patches per pass when scoring the validation split (no gradients)
    jpeg_prob: float = 0.5  # share of patches re-encoded as JPEG during training
    jpeg_quality: tuple[int, int] = (50, 95)
    soften_prob: float = 0.3  # share of patches shrunk by up to soften_max and enlarged back
    soften_max: float = 1.15
    threads: int = 0  # torch CPU threads, 0 = all cores
    loader_workers: int = 1
    device: DeviceName = "auto"
    max_train: int = 0  # cap on training patches (0 = all), for smoke runs
    ema_decay: float = 0.0  # weight averaging: EMA of the weights per step (e.g. 0.999); 0 = off
    # mixup (Zhang et al. 2018): each batch blended with a shuffled copy of itself, images and
    # targets alike, by a weight drawn from Beta(alpha, alpha); 0 = off. Label-consistent for PCam:
    # a blend of two centres is tumour in proportion to the tumour centre's weight
    mixup_alpha: float = 0.0
    max_valid: int = 0  # cap on validation patches (0 = all; a seeded subset), for quick runs
    final_tta: bool = True  # score the kept epoch with the 8 dihedral views at the end (8 passes)
    # decode every patch once into memory (27 KB a patch) instead of once per epoch: the same
    # pixels; on a GPU the loaders' decoding is what an epoch waits for
    cache_patches: bool = False
    # the card's threshold: the lowest at which this share of the validation negatives scores below
    # it (single view; docs/model.md says why 0.93); 0 keeps 0.5
    threshold_specificity: float = 0.93
    # knowledge distillation (train/distill.py): a model file (or bundled name) that scores the
    # training patches once; its scores take this share of each target. "" = no teacher
    teacher: str = ""
    distill_weight: float = 0.5

    def __post_init__(self) -> None:
        for name, lo, hi, lo_open in (
            ("width", 4, 256, False),
            ("epochs", 1, 100_000, False),
            ("batch_size", 1, 65536, False),
            ("lr", 0.0, 10.0, True),
            ("weight_decay", 0.0, 1.0, False),
            ("label_smoothing", 0.0, 0.5, False),
            ("val_fraction", 0.0, 0.9, True),
            ("stain_jitter", 0.0, 1.0, False),
            ("jpeg_prob", 0.0, 1.0, False),
            ("soften_prob", 0.0, 1.0, False),
            ("soften_max", 1.0, 4.0, False),
            ("threads", 0, 1024, False),
            ("loader_workers", 0, 256, False),
            ("max_train", 0, 1 << 40, False),
            ("ema_decay", 0.0, 0.99999, False),
            ("mixup_alpha", 0.0, 10.0, False),
            ("seed", 0, 2**31 - 1, False),  # numpy and the per-epoch seeds (seed * 1000 + epoch) take it
            ("max_valid", 0, 1 << 40, False),
            ("threshold_specificity", 0.0, 0.9999, False),
            ("brightness_contrast", 0.0, 0.5, False),
            ("sgd_momentum", 0.0, 0.999, False),
            ("onecycle_pct_start", 0.0, 1.0, True),
            ("valid_batch_size", 1, 65536, False),
            ("distill_weight", 0.0, 1.0, False),
        ):
            _in_range("train", name, getattr(self, name), lo, hi, lo_open)
        if self.arch == "dense-cnn-p4m" and self.width % 8:
            from .errors import UsageError

            below, above = self.width // 8 * 8, self.width // 8 * 8 + 8
            nearest = f"{below} or {above}" if below >= 8 else str(above)
            raise UsageError(
                f"train.width {self.width}: dense-cnn-p4m counts channels in fields of 8 orientations, so the width must "
                f"be a multiple of 8 (e.g. {nearest})"
            )
        if self.arch == "resnet18" and self.width != type(self).width:
            from .errors import UsageError

            raise UsageError(
                f"train.width {self.width}: resnet18 has a fixed width; --width sets the dense-cnn and dense-cnn-p4m "
                "networks only: leave it out, or choose one of those with --arch"
            )
        if not self.teacher and self.distill_weight != type(self).distill_weight:
            from .errors import UsageError

            raise UsageError(
                f"train.distill_weight {self.distill_weight} weighs a teacher's scores, and no teacher was given: "
                "add --teacher MODEL, or leave --distill-weight out"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ViewConfig:
    """The local viewer (``wsi-scan view``, ``view/``): where it listens and what it keeps in memory."""

    host: str = "127.0.0.1"  # loopback only; another address serves the slides to the network (warned)
    port: int = 0  # 0: a free port chosen by the system
    tile_px: int = 256  # Deep Zoom tile side (no overlap)
    jpeg_quality: int = 85  # slide tiles
    tile_cache_mib: int = 128  # encoded tiles kept (slide JPEG and heatmap PNG), least recently used dropped
    max_open_slides: int = 4  # slide handles, thumbnails and heatmaps kept open; the least recent is closed
    thumbnail_px: int = 2048  # longest side of the per-slide overview from which the coarsest tiles are cut
    cmap: str = "inferno"  # heatmap colour map, as the overlay export
    threads: int = 16  # requests served at once (the browser opens about 6 connections)
    # open connections, each a thread; more are answered 503 at once: clients that open many and
    # send nothing (or read slowly) would otherwise pile up threads until each one's timeout
    max_connections: int = 256

    def __post_init__(self) -> None:
        for name, lo, hi in (
            ("port", 0, 65535),
            ("tile_px", 64, 2048),
            ("jpeg_quality", 10, 100),
            ("tile_cache_mib", 0, 1 << 16),
            ("max_open_slides", 1, 1024),
            ("thumbnail_px", 256, 16384),
            ("threads", 1, 1024),
            ("max_connections", 1, 65536),
        ):
            _in_range("view", name, getattr(self, name), lo, hi)
