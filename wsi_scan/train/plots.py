"""Figures that look at the data before training and at the model after it (PNG files)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io.datasets import PatchSet
from .metrics import roc_curve


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


EXPLORE_FILES = ("label_distribution.png", "samples.png", "colour_histograms.png")
REPORT_FILES = ("curves.png", "roc.png", "valid_predictions.csv")
SLIDE_REPORT_FILES = ("froc.png", "slide_roc.png")


def check_figure_folder(
    out_dir: Path, names: Sequence[str] = (), flag: str = "--out", protect: Sequence[Path] = (), fresh: bool = False
) -> None:
    """A folder for figures, refused before anything is written to it when it is a file or a link,
    lies inside a heatmap store (a file there makes the store no longer one), is or lies inside
    one of the input folders ``protect`` (files added there would be read as data next time), or
    holds a user's file of one of ``names``; created otherwise, checked writable. ``fresh`` (the
    writer, just before its first file): an earlier run's files of ``names`` are removed, so the
    folder never holds a mix of two runs' files (``remove_earlier_set``)."""
    from ..errors import OutputExistsError, UsageError
    from ..io.outputs import check_not_in_store, check_outside_inputs, check_replaceable, prepare_parent, remove_earlier_set

    check_outside_inputs(out_dir, protect, flag)
    if out_dir.is_symlink():
        raise OutputExistsError(f"{flag} {out_dir} is a symbolic link; give the real folder or another {flag}")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{flag} {out_dir} is a file; expected a folder for the figures")
    check_not_in_store(out_dir, flag, itself=True)
    for name in names:
        check_replaceable(out_dir / name, True, kind="file", flag=flag)
    prepare_parent(out_dir / "x.png", flag)
    if fresh:
        remove_earlier_set(out_dir / n for n in names)


def save_figure(fig: Any, path: Path) -> None:
    """Write a figure atomically, marked as wsi-scan's; a user's file of that name is never replaced."""
    from ..io.outputs import MARK, atomic_write, check_replaceable

    with atomic_write(check_replaceable(path, True, kind="file"), "figure", suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, metadata={"Software": MARK})


def explore(
    sets: Sequence[PatchSet], out_dir: Path, per_class: int = 12, seed: int = 0, protect: Sequence[Path] = ()
) -> list[Path]:
    """Label distribution, sample patches per class (centre 32x32 outlined), colour histograms;
    ``protect``: the data folders, which ``out_dir`` may not be or lie in."""
    from ..io.outputs import output_set

    check_figure_folder(out_dir, EXPLORE_FILES, protect=protect, fresh=True)
    with output_set([out_dir / n for n in EXPLORE_FILES], "exploration"):
        return _explore_figures(sets, out_dir, per_class, seed)


def _explore_figures(sets: Sequence[PatchSet], out_dir: Path, per_class: int, seed: int) -> list[Path]:
    plt = _plt()
    from matplotlib.patches import Rectangle

    written: list[Path] = []

    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(sets), 3.2))
    names = [ps.name for ps in sets]
    neg = [int((ps.labels == 0).sum()) for ps in sets]
    pos = [int((ps.labels == 1).sum()) for ps in sets]
    xs = np.arange(len(sets))
    ax.bar(xs - 0.2, neg, 0.4, label="0: no tumour in centre")
    ax.bar(xs + 0.2, pos, 0.4, label="1: tumour in centre")
    ax.set_xticks(xs, names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("patches")
    ax.legend(fontsize=8)
    ax.set_title("Label distribution")
    fig.tight_layout()
    written.append(out_dir / "label_distribution.png")
    save_figure(fig, written[-1])
    plt.close(fig)

    rng = np.random.default_rng(seed)
    picks: dict[int, list[np.ndarray]] = {0: [], 1: []}
    for cls in (0, 1):
        pool = [(k, i) for k, ps in enumerate(sets) for i in np.flatnonzero(ps.labels == cls)[:5000]]
        for j in rng.permutation(len(pool))[:per_class]:
            k, i = pool[int(j)]
            picks[cls].append(sets[k].read(int(i)))
    fig, axes = plt.subplots(2, per_class, figsize=(per_class * 1.1, 2.6))
    for cls in (0, 1):
        for j in range(per_class):
            ax = axes[cls, j]
            ax.axis("off")
            if j < len(picks[cls]):
                ax.imshow(picks[cls][j])
                ax.add_patch(Rectangle((31.5, 31.5), 32, 32, fill=False, ec="lime", lw=1))
        axes[cls, 0].set_title(f"label {cls}", fontsize=8, loc="left")
    fig.suptitle("Sample patches (green: the labelled central 32x32)", fontsize=9)
    fig.tight_layout()
    written.append(out_dir / "samples.png")
    save_figure(fig, written[-1])
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    for cls, style in ((0, "-"), (1, "--")):
        if not picks[cls]:
            continue
        px = np.stack(picks[cls]).reshape(-1, 3)
        for c, (name, colour) in enumerate(zip("RGB", ("red", "green", "blue"))):
            h, edges = np.histogram(px[:, c], bins=64, range=(0, 256), density=True)
            axes[c].plot(edges[:-1], h, style, color=colour, label=f"label {cls}")
            axes[c].set_title(f"{name} channel")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle("Colour histograms per class (sampled patches)", fontsize=9)
    fig.tight_layout()
    written.append(out_dir / "colour_histograms.png")
    save_figure(fig, written[-1])
    plt.close(fig)
    return written


def training_report(
    out_dir: Path, history: list[dict[str, Any]], labels: np.ndarray, probs: np.ndarray, auc: float
) -> list[Path]:
    """Loss and AUC per epoch, and the ROC curve of the chosen model on the validation split."""
    plt = _plt()
    check_figure_folder(out_dir, REPORT_FILES, "--report", fresh=True)
    written: list[Path] = []
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    a1.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    a1.plot(ep, [h["valid_loss"] for h in history], "o-", label="valid")
    a1.set_xlabel("epoch")
    a1.set_ylabel("BCE loss")
    a1.legend()
    a2.plot(ep, [h["valid_auc"] for h in history], "o-", label="valid AUC")
    a2.plot(ep, [h["valid_accuracy"] for h in history], "s--", label="valid accuracy")
    a2.set_xlabel("epoch")
    a2.legend()
    fig.tight_layout()
    written.append(out_dir / "curves.png")
    save_figure(fig, written[-1])
    plt.close(fig)

    written.append(roc_figure(out_dir / "roc.png", labels, probs, f"AUC {auc:.4f}", "ROC, validation split", ""))
    return written


def roc_figure(path: Path, labels: np.ndarray, scores: np.ndarray, legend: str, title: str, unit: str) -> Path:
    plt = _plt()
    fpr, tpr = roc_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, label=legend)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel(f"false positive rate{unit}")
    ax.set_ylabel(f"true positive rate{unit}")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def _froc_figure(plt: Any, path: Path, fps_per_slide: np.ndarray, sensitivity: np.ndarray, froc_score: float) -> Path:
    from ..evaluation import FP_RATES

    fig, ax = plt.subplots(figsize=(4.5, 4))
    floor = 1 / 16  # a log axis has no 0: rates below this are drawn at it
    ax.step(np.maximum(fps_per_slide, floor), sensitivity, where="post", label=f"FROC score {froc_score:.3f}")
    for r in FP_RATES:
        ax.axvline(r, color="grey", lw=0.5, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(FP_RATES), [f"{r:g}" for r in FP_RATES])
    ax.set_xlim(floor, max(16.0, float(fps_per_slide.max()) * 1.2 if fps_per_slide.size else 16.0))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("mean false positives per slide")
    ax.set_ylabel("sensitivity (tumour regions, ITC excluded)")
    ax.set_title("FROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def evaluation_figures(
    out_dir: Path,
    fps_per_slide: np.ndarray,
    sensitivity: np.ndarray,
    froc_score: float | None,
    labels: np.ndarray | None,
    scores: np.ndarray | None,
    slide_auc: float | None,
    prefix: str = "",
) -> list[Path]:
    """The FROC curve of a cohort, when it has tumour regions to find, and, when it has both
    classes, the slide-level ROC, as ``PREFIX{froc,slide_roc}.png``. A figure of that name left by
    an earlier evaluation is removed first: one not drawn this time would show the old numbers
    beside the new."""
    plt = _plt()
    from ..io.outputs import output_set

    names = [prefix + n for n in SLIDE_REPORT_FILES]
    check_figure_folder(out_dir, names, fresh=True)  # a figure not drawn this time is not left from before
    froc_path, roc_path = (out_dir / n for n in names)
    written: list[Path] = []
    with output_set([froc_path, roc_path], "slide evaluation"):
        if froc_score is not None:
            written.append(_froc_figure(plt, froc_path, fps_per_slide, sensitivity, froc_score))
        if labels is not None and scores is not None and slide_auc is not None:
            written.append(roc_figure(roc_path, labels, scores, f"slide AUC {slide_auc:.4f}", "ROC, slide level", " (slides)"))
    return written
