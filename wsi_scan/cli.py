"""The ``wsi-scan`` command: parse options, call the library, turn errors into exit codes.

``wsi-scan SLIDE_OR_FOLDER --out OUT`` is the scan itself; the other commands are named
(``info``, ``train``, ``evaluate``, ``explore``, ``overlay``...). A first argument that is not a
command name is taken as a slide or folder to scan.
"""

from __future__ import annotations

import errno
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from .config import (
    FEW_PATCHES_PER_CLASS,
    OVERLAY_ALPHA,
    OVERLAY_MAX_SIZE_PX,
    OVERLAY_MIN_SIZE_PX,
    RULE_SPECIFICITY_RANGE,
    TILE_STRIDE_CELLS,
    LesionConfig,
    ScanConfig,
    TissueConfig,
    TrainConfig,
)
from .errors import OutputWriteError, WsiScanError

F = TypeVar("F", bound=Callable[..., Any])

_SCAN = ScanConfig()
_TISSUE = TissueConfig()
_TRAIN = TrainConfig()


class DefaultGroup(click.Group):
    """A group whose unknown first argument is handed to the ``scan`` command."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """Click's own usage errors as one line too, like every other error of this tool."""
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.exceptions.UsageError as exc:
            where = f" (see: {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
            click.echo(f"wsi-scan: error: {' '.join(exc.format_message().split())}{where}", err=True)
            sys.exit(2)
        except click.exceptions.Abort:
            click.echo("wsi-scan: interrupted", err=True)
            sys.exit(130)
        if isinstance(rv, int) and rv:
            sys.exit(rv)
        return rv

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if any(not a.strip() for a in args):
            # Path("") is ".": an empty argument would scan, or write into, the current folder
            raise click.UsageError(
                'an empty or blank argument was given (a path or value of "" or of spaces only); every path and value needs text',
                ctx,
            )
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["scan", *args]
        return super().parse_args(ctx, args)


class _WarningLine(logging.Handler):
    """The library's warnings as 'wsi-scan: warning: ...' lines on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("wsi_scan.batch"):
            return  # a folder run reports per slide in its summary and log, not between progress bars
        click.echo(f"wsi-scan: warning: {record.getMessage()}", err=True)


def _show_warnings() -> None:
    # the readers log what they find wrong in a damaged file; the error line already says so,
    # and Python would print their records unformatted to stderr (logging's last resort)
    for name in ("tifffile", "openslide", "PIL"):
        lg = logging.getLogger(name)
        if not any(isinstance(h, logging.NullHandler) for h in lg.handlers):
            lg.addHandler(logging.NullHandler())
    log = logging.getLogger("wsi_scan")
    if not any(isinstance(h, _WarningLine) for h in log.handlers):
        h = _WarningLine(logging.WARNING)
        log.addHandler(h)


def _run(fn: Callable[[], Any]) -> Any:
    """Call into the library; a WsiScanError becomes one line on stderr and its exit code."""
    try:
        return fn()
    except WsiScanError as exc:
        msg = str(exc)
        if "Original Traceback" in msg:  # re-raised by a DataLoader worker: its own last line says it
            msg = msg.strip().splitlines()[-1].split(": ", 1)[-1]
        click.echo(f"wsi-scan: error: {' '.join(msg.split())}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("wsi-scan: interrupted", err=True)
        sys.exit(130)
    except MemoryError:
        click.echo("wsi-scan: error: out of memory; retry with a smaller --block-cells or fewer --threads", err=True)
        sys.exit(1)
    except OSError as exc:
        # a write the library did not anticipate (the library converts the ones it knows):
        # still one line, with the code of an output that cannot be written
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            click.echo(f"wsi-scan: error: {exc.strerror}: {exc.filename or ''}", err=True)
            sys.exit(OutputWriteError.exit_code)
        raise


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="wsi-scan")
def main() -> None:
    """Scan whole-slide images of lymph nodes for metastases.

    \b
    wsi-scan slide.svs --out heatmap.zarr      scan one slide
    wsi-scan slides/ --out results/            scan a folder (resumable)
    wsi-scan info slide.svs                    what is in a slide
    wsi-scan train DATA --out model.pt         train a patch classifier
    wsi-scan evaluate DATA --json              score a model on labelled patches
    """
    _show_warnings()


def _scan_options(f: F) -> F:
    opts = [
        click.option(
            "--model",
            "model_path",
            # a plain string: click.Path would turn ./fast into fast, the bundled model's name
            type=str,
            default=None,
            help="a bundled model's name (`wsi-scan models`) or a model file (default: the bundled default)",
        ),
        click.option(
            "--mode",
            type=click.Choice(["auto", "dense", "patch"]),
            default=_SCAN.mode,
            help="dense: one pass per region (dense-exact models); patch: batches of 96x96 windows",
        ),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=_SCAN.device),
        click.option("--backend", type=click.Choice(["auto", "openslide", "tifffile"]), default=_SCAN.backend),
        click.option(
            "--read-level",
            type=click.Choice(["exact", "nearest"]),
            default=_SCAN.read_level,
            help="pyramid level read: exact (at or finer than the model's um/px, shrunk) or nearest (enlarged up to 1.1x)",
        ),
        click.option(
            "--decode",
            type=click.Choice(["auto", "cpu", "device"]),
            default=_SCAN.decode,
            help="where JPEG tiles are decoded and resampled: auto (on a GPU when it decodes the slide's tiles alike), cpu, device",
        ),
        click.option("--mpp", type=float, default=None, help="level-0 micrometers per pixel, overriding the slide's metadata"),
        click.option(
            "--block-cells",
            type=click.IntRange(1, 512),
            default=_SCAN.block_cells,
            help="cells per block side (one read + one dense pass)",
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(0),
            default=_SCAN.batch_size,
            help="windows per batch in patch mode (0: chosen for the device's memory)",
        ),
        click.option(
            "--threads", type=click.IntRange(1), default=_SCAN.threads, help="threads per slide reading and classifying blocks"
        ),
        click.option("--tta/--no-tta", default=_SCAN.tta, help="average the 8 rotations/flips (8x slower)"),
        click.option("--amp/--no-amp", default=_SCAN.amp, help="mixed precision on CUDA"),
        click.option(
            "--tissue",
            "tissue_method",
            type=click.Choice(["glass", "otsu", "all"]),
            default=_TISSUE.method,
            help="tissue detection: glass (anything that differs from the glass), otsu (the former rule), all (every cell)",
        ),
        click.option(
            "--tissue-mask",
            type=click.Path(path_type=Path),
            default=None,
            help="a mask image (PNG/TIFF) of the slide at any downsample, non-zero = tissue, used instead of detection",
        ),
        click.option(
            "--roi",
            type=click.Path(path_type=Path),
            default=None,
            help="GeoJSON polygons in level-0 px (QuPath annotations): scan only inside them",
        ),
        click.option("--tissue-mpp", type=float, default=_TISSUE.mask_mpp, help="um/px of the tissue-mask thumbnail"),
        click.option(
            "--min-saturation", type=float, default=_TISSUE.min_saturation, help="lowest saturation threshold for tissue"
        ),
        click.option("--min-object-um2", type=float, default=_TISSUE.min_object_um2, help="drop tissue pieces smaller than this"),
        click.option("--min-hole-um2", type=float, default=_TISSUE.min_hole_um2, help="fill holes smaller than this"),
        click.option(
            "--min-cell-fraction", type=float, default=_TISSUE.min_cell_fraction, help="tissue share of a cell needed to scan it"
        ),
        click.option(
            "--min-window-fraction",
            type=float,
            default=_TISSUE.min_window_fraction,
            help="or tissue share of its 3 x 3-cell window (1: off)",
        ),
        click.option(
            "--stain-check/--no-stain-check",
            default=_TISSUE.stain_check,
            help="look again at ~2 um/px at cells the thumbnail saw faint tissue near (fat membranes, a few nuclei)",
        ),
        click.option("--overwrite", is_flag=True, help="replace existing outputs"),
        click.option("--quiet", is_flag=True, help="no progress bar"),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _scan_config(kw: dict[str, Any]) -> ScanConfig:
    tissue = TissueConfig(
        method=kw.pop("tissue_method"),
        min_window_fraction=kw.pop("min_window_fraction"),
        mask_mpp=kw.pop("tissue_mpp"),
        min_saturation=kw.pop("min_saturation"),
        min_object_um2=kw.pop("min_object_um2"),
        min_hole_um2=kw.pop("min_hole_um2"),
        min_cell_fraction=kw.pop("min_cell_fraction"),
        stain_check=kw.pop("stain_check"),
    )
    for k in ("tissue_mask", "roi"):
        if kw.get(k) is not None:
            kw[k] = str(kw[k])
    return ScanConfig(tissue=tissue, mpp_override=kw.pop("mpp"), **kw)


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="heatmap .zarr (or a folder for a folder of slides)")
@click.option("--overlay", type=click.Path(path_type=Path), default=None, help="also write an overlay picture (.png/.jpg)")
@click.option("--recursive", is_flag=True, help="folder: also scan slides in subfolders")
@click.option(
    "--mpp-csv",
    type=click.Path(path_type=Path),
    default=None,
    help="folder: per-slide um/px overrides, CSV with columns slide,mpp",
)
@click.option(
    "--workers",
    type=click.IntRange(1),
    default=None,
    help="folder: start a local Dask cluster of N processes, one slide per task",
)
@click.option(
    "--scheduler", "scheduler_address", default=None, help="folder: address of a running Dask scheduler (tcp://host:8786)"
)
@_scan_options
def scan(
    source: Path,
    out: Path,
    model_path: str | None,
    quiet: bool,
    overlay: Path | None = None,
    recursive: bool = False,
    mpp_csv: Path | None = None,
    workers: int | None = None,
    scheduler_address: str | None = None,
    **kw: Any,
) -> None:
    """Scan a slide (or a folder of slides) and write a tumour heatmap as OME-Zarr.

    This is the default command: `wsi-scan slide.svs --out heatmap.zarr`. With a folder,
    `wsi-scan slides/ --out results/` writes results/<slide>.zarr for every slide, skips those
    already done with the same model and settings, and writes summary.csv/json and report.html;
    exit code 8 when some slides failed.
    """
    from .scan import scan_slide

    cfg: ScanConfig = _run(lambda: _scan_config(kw))
    if source.is_dir():
        _scan_folder_cmd(source, out, cfg, model_path, quiet, overlay, recursive, mpp_csv, workers, scheduler_address)
        return
    folder_only = [
        n
        for n, v in (
            ("--recursive", recursive),
            ("--mpp-csv", mpp_csv),
            ("--workers", workers),
            ("--scheduler", scheduler_address),
        )
        if v
    ]
    if folder_only:
        click.echo(f"wsi-scan: error: {', '.join(folder_only)} apply to a folder of slides; {source} is not a folder", err=True)
        sys.exit(2)
    if overlay is not None:
        from .errors import OutputExistsError
        from .io.exports import check_image_out
        from .io.outputs import is_heatmap_store

        _run(lambda: check_image_out(overlay, cfg.overwrite, store=out))
        if not cfg.overwrite and is_heatmap_store(out):
            # a scan killed between its store and its picture: the picture needs no rescan
            click.echo(
                f"wsi-scan: error: --out {out} exists (a heatmap store); draw the picture from it with "
                f"`wsi-scan overlay {out} --out {overlay}`, or pass --overwrite to scan again",
                err=True,
            )
            sys.exit(OutputExistsError.exit_code)
    res = _run(lambda: scan_slide(source, out, cfg, model_path, progress=not quiet))
    if overlay is not None:
        from .export.overlay import render_overlay

        _run(lambda: render_overlay(res.out, overlay, slide=source, overwrite=cfg.overwrite))
    if res.decoder_warnings:
        click.echo(
            f"wsi-scan: warning: {source.name}: {res.decoder_warnings} tiles held corrupt data and were decoded "
            f"with damage (first: {res.decoder_warning}); their cells may be wrong, recorded in the heatmap's attrs",
            err=True,
        )
    if res.n_tissue_cells == 0:
        where = f" inside the ROI {cfg.roi} (does it lie on the slide?)" if cfg.roi is not None else ""
        click.echo(f"{source.name}: no tissue found{where}; wrote an all-NaN heatmap to {res.out}", err=True)
        return
    click.echo(
        f"{source.name}: {res.n_tissue_cells} tissue cells ({res.tissue_area_mm2:.2f} mm2) in "
        f"{res.timings_s['total']:.1f} s [{res.mode}, {res.device}]; max tumour probability "
        f"{res.max_prob:.3f}, area above threshold {res.tumour_area_mm2:.3f} mm2 -> {res.out}"
        + (f" ({res.resumed_cells} cells kept from the interrupted scan)" if res.resumed_cells else "")
    )


def _scan_folder_cmd(
    source: Path,
    out: Path,
    cfg: ScanConfig,
    model_path: str | None,
    quiet: bool,
    overlay: Path | None,
    recursive: bool,
    mpp_csv: Path | None,
    workers: int | None,
    scheduler_address: str | None,
) -> None:
    from .batch import scan_folder
    from .errors import SlidesFailedError

    if overlay is not None:
        click.echo("wsi-scan: error: --overlay is for one slide; a folder run embeds overlays in OUT/report.html", err=True)
        sys.exit(2)
    res = _run(
        lambda: scan_folder(
            source,
            out,
            cfg,
            model_path,
            recursive=recursive,
            mpp_csv=mpp_csv,
            workers=workers,
            scheduler_address=scheduler_address,
            progress=not quiet,
        )
    )
    if not quiet:
        click.echo(
            f"{len(res.outcomes)} slides: {res.n_ok} scanned, {res.n_skipped} already done, {res.n_failed} failed "
            f"in {res.seconds:.1f} s -> {res.summary_csv}, {res.report_html}"
        )
    if res.n_failed:
        first = res.failed[0]
        err = SlidesFailedError(
            f"{res.n_failed} of {len(res.outcomes)} slides failed (first: {first.slide}: {first.error_type}: {first.error}); "
            f"every failure is listed in {res.summary_csv} and {out / 'wsi-scan.log'}"
        )
        click.echo(f"wsi-scan: error: {err}", err=True)
        sys.exit(err.exit_code)


@main.command()
@click.argument("slide_path", metavar="SLIDE", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["auto", "openslide", "tifffile"]), default=_SCAN.backend)
@click.option("--mpp", type=float, default=None, help="level-0 um/px, overriding the metadata")
@click.option("--json", "as_json", is_flag=True, help="one JSON object on stdout")
def info(slide_path: Path, backend: str, mpp: float | None, as_json: bool) -> None:
    """Format, levels, pixel size and its source, bounds and tissue fraction of a slide."""
    from .info import slide_info

    _run(lambda: ScanConfig(mpp_override=mpp))  # the one range check of --mpp
    d = _run(lambda: slide_info(slide_path, backend, mpp, _TISSUE))
    if as_json:
        click.echo(json.dumps(d))
        return
    click.echo(f"{d['path']}")
    click.echo(f"  format   {d['vendor']} (backend {d['backend']}), {d['size_bytes']:,} bytes")
    if d["mpp_xy"]:
        click.echo(f"  mpp      {d['mpp_xy'][0]:.5g} x {d['mpp_xy'][1]:.5g} um/px  (source: {d['mpp_source']})")
    else:
        click.echo(f"  mpp      unknown: {d['mpp_error']}")
    x, y, w, h = d["l0_bounds_xywh"]
    click.echo(f"  bounds   x={x} y={y} w={w} h={h} (level 0 px)")
    for i, lv in enumerate(d["levels"]):
        mpp_s = f", {lv['mpp']:.4g} um/px" if lv.get("mpp") else ""
        click.echo(f"  level {i}  {lv['size_wh'][0]} x {lv['size_wh'][1]}  downsample {lv['downsample_xy'][0]:.6g}{mpp_s}")
    if d.get("tissue_fraction") is not None:
        click.echo(
            f"  tissue   {d['tissue_fraction']:.1%} of the slide: {d['tissue_area_mm2']:.2f} mm2 in the mask "
            f"({d['tissue_method']}), {d['scanned_area_mm2']:.2f} mm2 in the {d['tissue_cells']} cells a scan classifies"
        )


def _train_options(f: F) -> F:
    opts = [
        click.option(
            "--arch",
            type=click.Choice(["dense-cnn", "dense-cnn-p4m", "resnet18"]),
            default=_TRAIN.arch,
            help="network; dense-cnn and dense-cnn-p4m (rotation- and flip-equivariant) are dense-exact",
        ),
        click.option(
            "--width",
            type=int,
            default=_TRAIN.width,
            help="channels of the first dense-cnn stage (dense-cnn-p4m: a multiple of 8)",
        ),
        click.option("--epochs", type=int, default=_TRAIN.epochs),
        click.option("--batch-size", type=int, default=_TRAIN.batch_size),
        click.option("--lr", type=float, default=_TRAIN.lr, help="peak learning rate"),
        click.option("--weight-decay", type=float, default=_TRAIN.weight_decay),
        click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default=_TRAIN.optimizer),
        click.option("--schedule", type=click.Choice(["onecycle", "cosine"]), default=_TRAIN.schedule),
        click.option("--label-smoothing", type=float, default=_TRAIN.label_smoothing),
        click.option("--val-fraction", type=float, default=_TRAIN.val_fraction, help="used only without a given valid split"),
        click.option("--seed", type=int, default=_TRAIN.seed),
        click.option(
            "--augment/--no-augment", default=_TRAIN.augment, help="dihedral, stain, brightness, JPEG and softening augmentation"
        ),
        click.option("--stain-jitter", type=float, default=_TRAIN.stain_jitter),
        click.option("--jpeg-prob", type=float, default=_TRAIN.jpeg_prob),
        click.option("--soften-prob", type=float, default=_TRAIN.soften_prob, help="share of patches shrunk and enlarged back"),
        click.option("--soften-max", type=float, default=_TRAIN.soften_max, help="largest shrink factor of --soften-prob"),
        click.option("--threads", type=int, default=_TRAIN.threads, help="torch CPU threads (0: all cores)"),
        click.option("--loader-workers", type=int, default=_TRAIN.loader_workers),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=_TRAIN.device),
        click.option("--max-train", type=int, default=_TRAIN.max_train, help="cap on training patches (0: all)"),
        click.option(
            "--ema-decay",
            type=float,
            default=_TRAIN.ema_decay,
            help="keep an exponential moving average of the weights (e.g. 0.999; 0: off)",
        ),
        click.option(
            "--mixup-alpha",
            type=float,
            default=_TRAIN.mixup_alpha,
            help="blend each batch with a shuffled copy of itself by Beta(alpha, alpha) weights (e.g. 0.2; 0: off)",
        ),
        click.option(
            "--max-valid",
            type=int,
            default=_TRAIN.max_valid,
            help="cap on validation patches, a seeded subset (0: all), for quick runs",
        ),
        click.option(
            "--final-tta/--no-final-tta", default=_TRAIN.final_tta, help="score the kept epoch with 8 dihedral views at the end"
        ),
        click.option(
            "--cache-patches/--no-cache-patches",
            default=_TRAIN.cache_patches,
            help="decode every patch once into memory (27 KB a patch) instead of every epoch; same results",
        ),
        click.option(
            "--teacher",
            default=_TRAIN.teacher,
            help="knowledge distillation: a model (fast|accurate|PATH, e.g. an ensemble) that scores the training patches once",
        ),
        click.option(
            "--distill-weight",
            type=float,
            default=_TRAIN.distill_weight,
            help="the teacher's share of each training target (with --teacher)",
        ),
        click.option(
            "--threshold-specificity",
            type=float,
            default=_TRAIN.threshold_specificity,
            help="set the card's threshold to the lowest giving this validation specificity (0: keep 0.5)",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@main.command()
@click.argument("data", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="model file (.pt or .safetensors)")
@click.option("--report", "report_dir", type=click.Path(path_type=Path), default=None, help="folder for figures")
@click.option(
    "--resume",
    is_flag=True,
    help="continue the run whose state is saved beside --out (OUT.train-state.pt), with its options and data",
)
@click.option("--overwrite", is_flag=True, help="replace an existing model file written by wsi-scan")
@click.option("--quiet", is_flag=True, help="no progress bars")
@_train_options
def train(
    data: tuple[Path, ...], out: Path, report_dir: Path | None, resume: bool, overwrite: bool, quiet: bool, **kw: Any
) -> None:
    """Train a patch classifier on Kaggle-layout or PCam-HDF5 folders."""
    from .train.loop import train as run_train

    cfg: TrainConfig = _run(lambda: TrainConfig(**kw))
    command = "wsi-scan " + " ".join(sys.argv[1:])
    res = _run(lambda: run_train(list(data), out, cfg, report_dir, resume, not quiet, command, overwrite))
    v = res.best_metrics.get("valid", {})
    vt = res.best_metrics.get("valid_tta", {})
    click.echo(
        f"wrote {res.model_path}: best epoch {res.best_epoch}, valid AUC {v.get('auc', float('nan')):.4f} "
        f"{'(TTA {:.4f}), '.format(vt['auc']) if 'auc' in vt else '(no TTA pass), '}"
        f"accuracy {v.get('accuracy', float('nan')):.4f}"
    )


@main.command()
@click.argument("data", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("explore"), help="folder for figures")
def explore(data: tuple[Path, ...], out_dir: Path) -> None:
    """Figures of a data set before training: labels, sample patches, colour histograms."""
    from .io.datasets import open_patch_data
    from .train.plots import explore as run_explore

    def go() -> list[Path]:
        sets = [ps for d in data for ps in open_patch_data(d).splits.values()]
        return run_explore(sets, out_dir, protect=data)

    for p in _run(go):
        click.echo(str(p))


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option(
    "--model",
    "model_path",
    type=str,
    default=None,
    help="a bundled model's name (`wsi-scan models`) or a model file (default: the bundled default)",
)
@click.option(
    "--split", type=click.Choice(["auto", "train", "valid", "test"]), default="auto", help="auto: test, else valid, else train"
)
@click.option("--tta", is_flag=True, help="average the 8 rotations/flips")
@click.option("--json", "as_json", is_flag=True, help="one JSON object on stdout")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=_SCAN.device)
@click.option("--batch-size", type=click.IntRange(1, 65536), default=_SCAN.batch_size)
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="folder for predictions.csv (one row per patch), roc.png and metrics.json",
)
@click.option("--overwrite", is_flag=True, help="replace an earlier evaluation in --out")
def evaluate(
    data: Path,
    model_path: str | None,
    split: str,
    tta: bool,
    as_json: bool,
    device: str,
    batch_size: int,
    quiet: bool,
    out_dir: Path | None,
    overwrite: bool,
) -> None:
    """Score a model on labelled patches: AUC with its 95% bootstrap interval, accuracy, sensitivity, specificity."""
    from .io.datasets import patch_split
    from .io.model_files import load_model
    from .train.evaluate import (
        check_evaluation_folder,
        check_not_empty,
        evaluate_patchset,
        json_safe,
        trained_on,
        write_evaluation,
    )
    from .train.metrics import bootstrap_auc_ci

    def go() -> Any:
        ps = patch_split(data, split)
        check_not_empty(ps)  # before the one-class warning below, which an empty set would also get
        if out_dir is not None:
            check_evaluation_folder(out_dir, protect=(data,), overwrite=overwrite)
        model = load_model(model_path)
        seen = trained_on(model.card, ps)
        if seen is not None:
            click.echo(
                f"wsi-scan: warning: {model.card.name!r} was trained on {seen} (its card says so): these numbers are "
                "not a measure of how it does on new patches; evaluate on a held-out split",
                err=True,
            )
        n_pos = int(ps.labels.sum())
        if n_pos in (0, len(ps)):
            click.echo(
                f"wsi-scan: warning: {ps.name} holds only {'negative' if n_pos == 0 else 'positive'} patches: the AUC "
                f"is undefined (nan) and so is the {'sensitivity' if n_pos == 0 else 'specificity'}; "
                "evaluate on patches of both classes",
                err=True,
            )
        elif min(n_pos, len(ps) - n_pos) < FEW_PATCHES_PER_CLASS:
            click.echo(
                f"wsi-scan: warning: {ps.name} holds {len(ps) - n_pos} negative and {n_pos} positive patches: numbers "
                f"measured on so few move by several points with a handful of patches; evaluate on at least "
                f"{FEW_PATCHES_PER_CLASS} of each class",
                err=True,
            )
        ev = evaluate_patchset(model, ps, device, batch_size, tta, progress=not quiet and not as_json)
        d = {
            **ev.to_dict(),
            "auc_ci95": list(bootstrap_auc_ci(ev.labels, ev.probs)),
            "model": model.card.name,
            "model_path": model.path,
            "model_sha256": model.sha256,
            "trained_on_these_patches": seen is not None,
        }
        files = write_evaluation(out_dir, ev, ps, model.card.threshold, d) if out_dir is not None else []
        return ev, d, files

    ev, d, files = _run(go)
    if as_json:
        click.echo(json.dumps(json_safe(d), allow_nan=False))
        return
    m = ev.metrics
    lo, hi = d["auc_ci95"]
    click.echo(
        f"{ev.dataset}: n={m.n}  AUC {m.auc:.4f} (95% CI {lo:.4f}-{hi:.4f})  accuracy {m.accuracy:.4f}  "
        f"sensitivity {m.sensitivity:.4f}  specificity {m.specificity:.4f}  (threshold {m.threshold}, TTA {'on' if tta else 'off'})"
    )
    click.echo(f"confusion matrix [[TN FP] [FN TP]]: [[{m.tn} {m.fp}] [{m.fn} {m.tp}]]")
    for f in files:
        click.echo(f"wrote {f}")


@main.command("models")
@click.option("--json", "as_json", is_flag=True, help="one JSON list on stdout")
def models_cmd(as_json: bool) -> None:
    """The bundled models (pass a name to --model): contract, validation metrics, cost, training."""
    from .io.model_files import bundled_model_path, bundled_models, describe_model, load_model

    def go() -> list[dict[str, Any]]:
        default = bundled_model_path()
        return [{**describe_model(load_model(p), name), "default": p == default} for name, p in bundled_models().items()]

    rows = _run(go)
    if as_json:
        click.echo(json.dumps(rows))
        return
    for r in rows:
        v = r["valid"]
        ci = f" (95% CI {v['auc_ci95'][0]:.4f}-{v['auc_ci95'][1]:.4f})" if v.get("auc_ci95") else ""
        auc = f"{v['auc']:.4f}" if v.get("auc") is not None else "?"
        tta = f", {r['valid_tta_auc']:.4f} with --tta" if r.get("valid_tta_auc") is not None else ""
        click.echo(f"{r['name']}{'  (default)' if r['default'] else ''}")
        click.echo(
            f"  network    {r['arch']} {r['arch_kwargs']}, {r['parameters']:,} parameters, "
            f"{r['macs_per_cell'] / 1e6:.1f} M multiply-adds per cell, {'dense-exact' if r['dense_exact'] else 'patch mode only'}"
        )
        click.echo(f"  input      {r['input_px']} px windows, {r['cell_px']} px cells, at {r['mpp']} um/px")
        click.echo(
            f"  validation n={v.get('n')}: AUC {auc}{ci}{tta}; at threshold {r['threshold']:.4f} "
            f"sensitivity {v.get('sensitivity') or float('nan'):.4f}, specificity {v.get('specificity') or float('nan'):.4f}"
        )
        rule = r.get("threshold_rule")
        if rule:
            click.echo(f"  threshold  lowest with specificity >= {rule['specificity']} on {rule['data']}")
        if r["members"]:
            click.echo(f"  training   {r['train_patches']} patches from {', '.join(r['train_sets']) or '?'}; the mean logit of:")
            for mem in r["members"]:
                click.echo(
                    f"    {mem['name']} ({'' if mem['arch'] == 'dense-cnn' else mem['arch'] + ' '}width {mem['width']}, "
                    f"epoch {mem['epoch']}, AUC {mem['valid_auc'] or float('nan'):.4f}); "
                    f"{mem['recipe']}"
                )
        else:
            click.echo(
                f"  training   {r['train_patches']} patches from {', '.join(r['train_sets']) or '?'}; epoch {r['epoch']}; {r['recipe']}"
            )
        click.echo(f"  file       {r['path']} ({r['size_bytes']:,} bytes, sha256 {r['sha256'][:16]})")


def _rule_options(f: F) -> F:
    """The options of the commands that write a model thresholded by the rule (threshold, ensemble)."""
    for opt in reversed(
        [
            click.option(
                "--specificity",
                type=click.FloatRange(*RULE_SPECIFICITY_RANGE),
                default=_TRAIN.threshold_specificity,
                show_default=True,
                help="the lowest threshold giving at least this specificity on DATA's validation patches",
            ),
            click.option("--split", type=click.Choice(["auto", "train", "valid", "test"]), default="valid", show_default=True),
            click.option(
                "--out", required=True, type=click.Path(path_type=Path), help="the model file to write (.safetensors or .pt)"
            ),
            click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=_SCAN.device),
            click.option("--overwrite", is_flag=True, help="replace an existing model file written by wsi-scan"),
            click.option("--quiet", is_flag=True, help="no progress bar"),
        ]
    ):
        f = opt(f)
    return f


@main.command("threshold")
@click.argument("model_path", metavar="MODEL", type=str)
@click.argument("data", type=click.Path(path_type=Path))
@_rule_options
@click.option("--name", default=None, help="the model's name in its card (default: kept)")
def threshold_cmd(
    model_path: str,
    data: Path,
    specificity: float,
    split: str,
    out: Path,
    device: str,
    name: str | None,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Copy a model with its card's threshold chosen on validation patches (the rule `train` applies)."""
    from .train.threshold import rethreshold_model

    card = _run(
        lambda: rethreshold_model(
            model_path, data, out, specificity, split=split, device=device, name=name, overwrite=overwrite, progress=not quiet
        )
    )
    v = card.metrics["valid"]
    click.echo(
        f"wrote {out}: threshold {card.threshold:.4f} (specificity {v['specificity']:.4f}, sensitivity {v['sensitivity']:.4f} "
        f"on {card.training['threshold_rule']['data']})"
    )


@main.command("ensemble")
@click.argument("model_paths", metavar="MODEL...", nargs=-1, required=True, type=str)
@click.option(
    "--data", required=True, type=click.Path(path_type=Path), help="held-out labelled patches to threshold and score on"
)
@_rule_options
@click.option("--name", default="ensemble", show_default=True, help="the model's name in its card")
@click.option("--tta/--no-tta", default=True, show_default=True, help="also measure the 8-view AUC for the card")
def ensemble_cmd(
    model_paths: tuple[str, ...],
    data: Path,
    specificity: float,
    split: str,
    out: Path,
    name: str,
    tta: bool,
    device: str,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Combine 2-4 dense-exact models into one (the mean of their logits), thresholded by the rule `train` applies."""
    from .train.ensemble import combine_models

    command = "wsi-scan " + " ".join(sys.argv[1:])
    card = _run(
        lambda: combine_models(
            list(model_paths),
            data,
            out,
            specificity,
            split=split,
            device=device,
            name=name,
            tta=tta,
            command=command,
            overwrite=overwrite,
            progress=not quiet,
        )
    )
    v = card.metrics["valid"]
    tta_auc = card.metrics.get("valid_tta", {}).get("auc")
    click.echo(
        f"wrote {out}: AUC {v['auc']:.4f}{f' ({tta_auc:.4f} with TTA)' if tta_auc is not None else ''}; threshold "
        f"{card.threshold:.4f} (specificity {v['specificity']:.4f}, sensitivity {v['sensitivity']:.4f} on "
        f"{card.training['threshold_rule']['data']})"
    )


@main.command()
@click.argument("heatmap", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="picture file, .png or .jpg")
@click.option(
    "--slide",
    "slide_path",
    type=click.Path(path_type=Path),
    default=None,
    help="the slide (default: the path recorded in the heatmap)",
)
@click.option(
    "--max-size",
    type=click.IntRange(OVERLAY_MIN_SIZE_PX, 16384),
    default=OVERLAY_MAX_SIZE_PX,
    help="longest side of the slide's thumbnail, px (at most the slide's own size); colour bar and caption are added beside and below",
)
@click.option("--alpha", type=click.FloatRange(0, 1), default=OVERLAY_ALPHA, help="opacity of the heatmap over tissue")
@click.option(
    "--threshold",
    type=click.FloatRange(0, 1),
    default=None,
    help="outline regions at or above this probability (default: the model's threshold)",
)
@click.option("--backend", type=click.Choice(["auto", "openslide", "tifffile"]), default=_SCAN.backend)
@click.option("--overwrite", is_flag=True, help="replace an existing picture")
def overlay(
    heatmap: Path,
    out: Path,
    slide_path: Path | None,
    max_size: int,
    alpha: float,
    threshold: float | None,
    backend: str,
    overwrite: bool,
) -> None:
    """A picture of the slide with its tumour heatmap, colour bar, scale bar and caption."""
    from .export.overlay import render_overlay

    click.echo(str(_run(lambda: render_overlay(heatmap, out, slide_path, max_size, alpha, threshold, overwrite, backend))))


@main.command()
@click.argument("heatmap", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="GeoJSON file for QuPath")
@click.option(
    "--threshold", type=click.FloatRange(0, 1), default=None, help="tumour probability cut-off (default: the model's threshold)"
)
@click.option("--tissue", is_flag=True, help="add the scanned tissue outline as 'Tissue' annotations")
@click.option("--overwrite", is_flag=True, help="replace an existing file")
def geojson(heatmap: Path, out: Path, threshold: float | None, tissue: bool, overwrite: bool) -> None:
    """Tumour regions as QuPath annotations (GeoJSON, level-0 pixel coordinates)."""
    from .export.geojson import write_geojson

    click.echo(str(_run(lambda: write_geojson(heatmap, out, threshold, tissue, overwrite))))


@main.command()
@click.argument("heatmap", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="lesions.csv (a table) or lesions.geojson (QuPath annotations by size class)",
)
@click.option("--json", "as_json", is_flag=True, help="one JSON object on stdout: call, score, lesions")
@click.option(
    "--threshold", type=float, default=None, help="tumour probability a lesion's cells reach (default: the model's threshold)"
)
@click.option("--seed-prob", type=float, default=LesionConfig().seed_prob, help="a lesion needs one cell at least this probable")
@click.option("--overwrite", is_flag=True, help="replace an existing file written by wsi-scan")
def lesions(heatmap: Path, out: Path | None, as_json: bool, threshold: float | None, seed_prob: float, overwrite: bool) -> None:
    """Lesions of a scanned slide with their size class (ITC, micro, macro) and the node's call."""
    from .export.lesions import heatmap_call, write_lesions

    def go() -> Any:
        cfg = LesionConfig(seed_prob=seed_prob)
        if out is not None:
            return write_lesions(heatmap, out, threshold, overwrite, cfg)[1]
        return heatmap_call(heatmap, threshold, cfg)[1]

    call = _run(go)
    if as_json:
        click.echo(json.dumps(call.to_dict()))
        return
    click.echo(
        f"{heatmap}: {call.call} (score {call.score:.3f}, {len(call.lesions)} lesions, largest "
        f"{call.largest_lesion_mm:.2f} mm){' -> ' + str(out) if out else ''}"
    )
    for les in call.lesions[:20]:
        x, y = les.l0_centroid_xy
        click.echo(
            f"  {les.id:3d}  {les.size_class:5s}  {les.longest_diameter_mm:6.2f} mm  {les.area_mm2:8.4f} mm2  "
            f"max {les.max_prob:.3f}  at level-0 ({x:.0f}, {y:.0f})"
        )
    if len(call.lesions) > 20:
        click.echo(f"  ... {len(call.lesions) - 20} more (--out lesions.csv lists them all)")


@main.command()
@click.argument("results", type=click.Path(path_type=Path))
@click.option(
    "--patients",
    required=True,
    type=click.Path(path_type=Path),
    help="CSV with columns patient,slide (slide: its path relative to the slides folder, or its file name)",
)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="stages.csv (default: RESULTS/stages.csv)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object on stdout")
@click.option("--overwrite", is_flag=True, help="replace an existing stages file written by wsi-scan")
def stage(results: Path, patients: Path, out: Path | None, as_json: bool, overwrite: bool) -> None:
    """pN stage per patient from the calls of a folder run's slides (one slide = one lymph node)."""
    from .export.lesions import write_stages

    target, rows = _run(lambda: write_stages(results, patients, out, overwrite))
    if as_json:
        click.echo(json.dumps({"patients": rows, "out": str(target)}))
        return
    for r in rows:
        click.echo(f"{r['patient']}: {r['stage']}  ({', '.join(f'{k} {v}' for k, v in r['nodes'].items())})")
    click.echo(f"-> {target}")


@main.command("evaluate-slides")
@click.argument("results", type=click.Path(path_type=Path))
@click.option(
    "--annotations",
    required=True,
    type=click.Path(path_type=Path),
    help="folder of per-slide annotations: NAME.xml (CAMELYON/ASAP) or NAME.geojson (QuPath)",
)
@click.option(
    "--reference",
    type=click.Path(path_type=Path),
    default=None,
    help="CAMELYON17-style CSV of patient stages (patient_XXX.zip,pN1) for the kappa",
)
@click.option("--json", "as_json", is_flag=True, help="one JSON object on stdout")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="evaluation.json (default: RESULTS/evaluation.json)")
@click.option("--seed-prob", type=float, default=LesionConfig().seed_prob, help="a lesion needs one cell at least this probable")
@click.option("--overwrite", is_flag=True, help="replace an existing evaluation file written by wsi-scan")
def evaluate_slides(
    results: Path, annotations: Path, reference: Path | None, as_json: bool, out: Path | None, seed_prob: float, overwrite: bool
) -> None:
    """FROC, slide AUC, call confusion and pN kappa of a folder run against annotations (CAMELYON16/17 rules)."""
    from .evaluation import evaluate_cohort
    from .io.exports import write_json

    target = out if out is not None else results / "evaluation.json"

    def go() -> Any:
        from .evaluation import check_results_folder
        from .io.exports import check_evaluation_json

        check_results_folder(results)
        # before any work or figure: --overwrite replaces an evaluation, never another wsi-scan output
        check_evaluation_json(target, results, overwrite or out is None)
        from .io.outputs import check_outside_inputs, output_set

        # a JSON written among the annotations would be read as the annotation of a slide of its name
        check_outside_inputs(target, [annotations])
        from .train.plots import SLIDE_REPORT_FILES

        # the figures are named after the JSON, so two evaluations in one folder keep their own;
        # a JSON that cannot be written takes this run's figures with it (not left beside an
        # earlier evaluation's JSON, whose numbers they would seem to show)
        prefix = f"{target.stem}."
        with output_set([target.parent / (prefix + n) for n in SLIDE_REPORT_FILES], "slide evaluation"):
            ev = evaluate_cohort(
                results,
                annotations,
                reference,
                LesionConfig(seed_prob=seed_prob),
                figures=target.parent,
                figure_prefix=prefix,
            )
            write_json(target, ev, overwrite or out is None)
        return ev

    ev = _run(go)
    if as_json:
        click.echo(json.dumps(ev))
        return
    auc = ev["slide_auc"]
    if ev["froc"] is None:
        froc_text = "FROC n/a (no annotated tumour region outside ITC to find)"
    else:
        sens = ", ".join(f"{k}: {v:.3f}" for k, v in ev["sensitivities"].items())
        froc_text = f"FROC {ev['froc']:.4f} (sensitivity at FP/slide {sens})"
    click.echo(f"{froc_text}; slide AUC {'n/a' if auc is None else f'{auc:.4f}'}")
    if ev["kappa"] is not None:
        click.echo(f"pN kappa (quadratic) {ev['kappa']['kappa']:.4f}")
    click.echo(f"-> {target}")


@main.command("heatmap-tiff")
@click.argument("heatmap", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="pyramidal TIFF, the slide's level-0 size")
@click.option("--probability", is_flag=True, help="float32 probabilities (NaN off tissue) instead of colour-mapped RGBA")
@click.option("--opacity", type=click.FloatRange(0, 1), default=1.0, help="alpha of scanned pixels in the RGBA image")
@click.option("--overwrite", is_flag=True, help="replace an existing file")
@click.option("--quiet", is_flag=True, help="no progress bar")
def heatmap_tiff(heatmap: Path, out: Path, probability: bool, opacity: float, overwrite: bool, quiet: bool) -> None:
    """The heatmap as a tiled pyramidal TIFF in the slide's level-0 frame, for slide viewers."""
    from .export.heatmap_tiff import write_heatmap_tiff

    click.echo(str(_run(lambda: write_heatmap_tiff(heatmap, out, probability, opacity, overwrite=overwrite, progress=not quiet))))


@main.command()
@click.argument("slide_path", metavar="SLIDE", type=click.Path(path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="patches.h5 (one file), or a folder for the PCam pair camelyonpatch_level_2_split_<split>_{x,y}.h5",
)
@click.option(
    "--stride-cells",
    type=click.IntRange(1, 1 << 20),
    default=TILE_STRIDE_CELLS,
    help="step between windows in 32 px cells (3: no overlap)",
)
@click.option(
    "--labels-geojson", type=click.Path(path_type=Path), default=None, help="tumour annotations (QuPath GeoJSON) for labels y"
)
@click.option(
    "--labels-mask",
    type=click.Path(path_type=Path),
    default=None,
    help="or a mask image (PNG/TIFF) of the slide at any downsample, non-zero = tumour, for labels y",
)
@click.option("--split", type=click.Choice(["train", "valid", "test"]), default="train", help="split name of the folder output")
@click.option(
    "--model",
    "model_path",
    type=str,
    default=None,
    help="take mpp and window size from this model, bundled name or file (default: PCam's)",
)
@click.option("--backend", type=click.Choice(["auto", "openslide", "tifffile"]), default=_SCAN.backend)
@click.option("--mpp", type=float, default=None, help="level-0 um/px, overriding the slide's metadata")
@click.option("--overwrite", is_flag=True, help="replace existing files")
def tile(
    slide_path: Path,
    out: Path,
    stride_cells: int,
    labels_geojson: Path | None,
    labels_mask: Path | None,
    split: str,
    model_path: str | None,
    backend: str,
    mpp: float | None,
    overwrite: bool,
) -> None:
    """Cut the tissue of a slide into 96x96 patches (PCam HDF5) with level-0 coordinates."""
    from .export.tiles import tile_slide

    _run(lambda: ScanConfig(mpp_override=mpp))
    res = _run(
        lambda: tile_slide(
            slide_path,
            out,
            stride_cells,
            labels_geojson,
            model_path,
            backend,
            mpp,
            _TISSUE,
            split,
            overwrite=overwrite,
            labels_mask=labels_mask,
        )
    )
    pos = f", {res.n_positive} positive" if res.n_positive is not None else ""
    click.echo(f"{res.n_patches} patches{pos} at {res.target_mpp:g} um/px -> {', '.join(str(p) for p in res.files)}")


# --- wsi-scan view (issue 14): the local viewer; a self-contained block ------------------------
from .config import ViewConfig as _ViewConfig  # noqa: E402 - kept with the command it serves

_VIEW = _ViewConfig()


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--host", default=_VIEW.host, help="address to listen on (a non-loopback one serves the slides to the network)")
@click.option("--port", type=int, default=_VIEW.port, help="port to listen on (0: a free one)")
@click.option("--no-browser", is_flag=True, help="do not open a browser; print the address only")
def view(path: Path, host: str, port: int, no_browser: bool) -> None:
    """Open a heatmap store, or a results folder, in a local web viewer (slide, heatmap, lesions, cohort)."""
    from .view.server import Viewer, non_loopback_warning

    cfg: Any = _run(lambda: _ViewConfig(host=host, port=port))
    viewer = _run(lambda: Viewer(path, cfg))
    warning = non_loopback_warning(host)
    if warning:
        click.echo(f"wsi-scan: warning: {warning}", err=True)
    n = len(viewer.app.entries)
    click.echo(f"wsi-scan view: {n} slide{'s' if n != 1 else ''} from {path} at {viewer.url}  (Ctrl-C to stop)", err=True)
    click.echo(viewer.url)
    sys.stdout.flush()
    if not no_browser:
        import webbrowser

        opened = webbrowser.open(viewer.url)
        if not opened:
            click.echo("wsi-scan: warning: no browser could be opened; open the address above", err=True)
    import signal

    # Ctrl-C and a plain kill stop the server cleanly; explicitly, because a process started in
    # the background by a non-interactive shell inherits SIGINT ignored, and Python then keeps it so
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    try:
        viewer.serve_forever()
    except KeyboardInterrupt:
        click.echo("wsi-scan view: stopped", err=True)
    finally:
        viewer.httpd.server_close()
        viewer.app.close()
