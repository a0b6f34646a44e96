#!/usr/bin/env python
"""wsi-scan against WSInfer on the same slide and weights: windows/s, CPU-ms per window, peak RSS.

Runs only where WSInfer's command is found (``pip install wsinfer==0.6.1``; it pins zarr 2, so
give it an environment of its own and pass ``--wsinfer PATH``); says that it is skipped and exits
0 otherwise. WSInfer runs offline (a stand-in for its model zoo's registry, which it otherwise
fetches from Hugging Face at start-up). The bundled model (or ``--model``) is exported to TorchScript with a
two-class head (softmax of [0, logit] is the model's sigmoid), with a WSInfer model config of
the same pixel size, patch size and normalisation; both tools then scan the same slide in fresh
processes under ``/usr/bin/time``, in interleaved rounds (medians reported, since other work on
the machine moves single runs). wsi-scan runs dense and patch; WSInfer classifies windows at a
stride of one cell (``--patch-overlap-ratio`` 2/3) where its ``run`` accepts that option, at its
default stride otherwise (said in the output): per-window costs compare either way.

    python scripts/wsinfer_compare.py SLIDE [--rounds 3] [--model M] [--json out.json]
    python scripts/wsinfer_compare.py --make-slide pages --size 19200x19200 --rounds 3
    python scripts/wsinfer_compare.py --make-slide series --wsinfer /opt/wsinfer-env/bin/wsinfer
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def export_for_wsinfer(model_path: Path | None, out_dir: Path) -> tuple[Path, Path]:
    """TorchScript model and WSInfer config (wsinfer-zoo schema 1.0) of a wsi-scan model."""
    import torch

    from wsi_scan.io.model_files import load_model

    loaded = load_model(model_path)
    card = loaded.card

    class TwoClass(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logit = self.net(x).flatten(1)[:, :1]
            return torch.cat([torch.zeros_like(logit), logit], dim=1)

    wrapped = TwoClass(loaded.net.eval())
    example = torch.zeros(1, 3, card.input_px, card.input_px)
    with torch.no_grad():
        scripted = torch.jit.trace(wrapped, example)
    model_pt = out_dir / "model.pt"
    torch.jit.save(scripted, str(model_pt))
    config = {
        "spec_version": "1.0",
        "architecture": card.arch,
        "num_classes": 2,
        "class_names": list(card.class_names),
        "patch_size_pixels": card.input_px,
        "spacing_um_px": card.mpp,
        "transform": [
            {"name": "Resize", "arguments": {"size": card.input_px}},
            {"name": "ToTensor"},
            {"name": "Normalize", "arguments": {"mean": list(card.mean), "std": list(card.std)}},
        ],
    }
    cfg_path = out_dir / "config.json"
    cfg_path.write_text(json.dumps(config, indent=2))
    return model_pt, cfg_path


def timed(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run under /usr/bin/time: wall s, user s, sys s, peak RSS MB of the command (its children too)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        full = ["/usr/bin/time", "-f", "%e %U %S %M", "-o", tf.name, *cmd]
        proc = subprocess.run(full, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{proc.stderr[-3000:]}")
        wall, user, sys_s, rss_kb = (float(v) for v in tf.read().split()[-4:])
    return {"wall_s": wall, "user_s": user, "sys_s": sys_s, "peak_rss_mb": rss_kb / 1024}


def wsinfer_windows(results: Path) -> int:
    rows = 0
    for f in (results / "model-outputs-csv").glob("*.csv"):
        with f.open() as fh:
            rows += sum(1 for _ in csv.DictReader(fh))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("slide", type=Path, nargs="?")
    ap.add_argument(
        "--make-slide",
        choices=("pages", "subifds", "ome", "svs", "series"),
        default=None,
        help="write a synthetic 40x slide in this pyramid layout (scripts/benchmark.py's) instead",
    )
    ap.add_argument("--size", default="19200x19200")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores both tools may use")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--wsinfer", default=None, help="WSInfer's command (default: `wsinfer` on PATH)")
    args = ap.parse_args(argv)
    # WSInfer 0.6 pins zarr 2 and this project zarr 3, so it usually lives in an environment of
    # its own: only its command is needed here
    wsinfer = args.wsinfer or shutil.which("wsinfer")
    if wsinfer is None:
        print("skipped: WSInfer is not installed (pip install wsinfer==0.6.1, in its own environment, then --wsinfer PATH)")
        return 0
    if args.slide is None and args.make_slide is None:
        ap.error("give a SLIDE or --make-slide LAYOUT")
    with tempfile.TemporaryDirectory(prefix="wsinfer-cmp-") as tmp_s:
        tmp = Path(tmp_s)
        if args.make_slide is not None:
            sys.path.insert(0, str(ROOT / "scripts"))
            from benchmark import real_texture, slide_spec

            from wsi_scan.io.synthetic import write_synthetic_slide

            w, h = (int(v) for v in args.size.lower().split("x"))
            slide = write_synthetic_slide(
                tmp / "slides" / f"bench-{args.make_slide}.tif", slide_spec((w, h), real_texture(), args.make_slide)
            )
        else:
            slide = args.slide.resolve()
            (tmp / "slides").mkdir()
            os.symlink(slide, tmp / "slides" / slide.name)  # WSInfer takes a folder of slides
        model_pt, cfg = export_for_wsinfer(args.model, tmp)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        # WSInfer loads its model zoo's registry from Hugging Face when its command starts, even
        # for a local model: offline, an empty registry in a home of its own stands in for it
        home = tmp / "wsinfer-home"
        (home / ".wsinfer-zoo").mkdir(parents=True)
        (home / ".wsinfer-zoo" / "wsinfer-zoo-registry.json").write_text('{"models": {}}')
        wsinfer_env = {**env, "HOME": str(home), "HF_HUB_OFFLINE": "1"}
        help_text = subprocess.run(
            [wsinfer, "run", "--help"], capture_output=True, text=True, check=False, env=wsinfer_env
        ).stdout
        overlap = "--patch-overlap-ratio" in help_text
        runs: dict[str, list[dict[str, float]]] = {"wsi-scan dense": [], "wsi-scan patch": [], "wsinfer": []}
        for r in range(args.rounds):
            for name in runs:
                out = tmp / f"out-{r}-{name.replace(' ', '-')}"
                if name == "wsinfer":
                    cmd = [
                        wsinfer,
                        "run",
                        "--wsi-dir",
                        str(tmp / "slides"),
                        "--results-dir",
                        str(out),
                        "--model-path",
                        str(model_pt),
                        "--config",
                        str(cfg),
                        "--num-workers",
                        str(args.threads),
                    ]
                    if overlap:
                        cmd += ["--patch-overlap-ratio", str(2 / 3)]
                    res = timed(cmd, wsinfer_env)
                    res["windows"] = wsinfer_windows(out)
                else:
                    cmd = [
                        sys.executable,
                        "-m",
                        "wsi_scan",
                        str(slide),
                        "--out",
                        str(out / "h.zarr"),
                        "--quiet",
                        "--mode",
                        name.split()[1],
                        "--device",
                        "cpu",
                        "--tissue",
                        "all",
                    ]
                    if args.model is not None:
                        cmd += ["--model", str(args.model)]
                    res = timed(cmd, env)
                    from wsi_scan.io.heatmap import open_heatmap

                    res["windows"] = int(open_heatmap(out / "h.zarr").attrs["tissue"]["tissue_cells"])
                res["windows_per_s"] = res["windows"] / res["wall_s"] if res["wall_s"] else 0.0
                res["cpu_ms_per_window"] = (res["user_s"] + res["sys_s"]) * 1e3 / max(res["windows"], 1)
                runs[name].append(res)
                print(json.dumps({"round": r, "tool": name, **res}), flush=True)
                shutil.rmtree(out, ignore_errors=True)
    summary = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for name, rs in runs.items()}
    summary["wsinfer"]["stride"] = "one cell (overlap 2/3)" if overlap else "WSInfer's default"  # type: ignore[assignment]
    print("\n| tool | windows/s | CPU-ms per window | peak RSS MB |\n|---|---:|---:|---:|")
    for name, s in summary.items():
        print(f"| {name} | {s['windows_per_s']:.0f} | {s['cpu_ms_per_window']:.2f} | {s['peak_rss_mb']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": runs, "slide": str(slide)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
