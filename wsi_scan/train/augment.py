"""Training augmentation for H&E patches.

Label-preserving for PCam: the 8 dihedral views (the centre 32x32 stays the centre),
HED stain jitter (Tellez et al. 2018) for stain variation between labs, mild brightness and
contrast, JPEG re-encoding at random quality because slides are JPEG-compressed while
part of the training data is lossless, and softening (shrink by up to ``max_factor``, enlarge
back) because a scan resamples 40x or 20x pixels to the model's frame and scanners differ in
focus, while PCam's patches are a pyramid level taken as is: the network trained without it
lost validation AUC on patches softened by 2-10% (docs/benchmarks.md, session of 2026-11-27: "Not
adopted, measured"; README, the bundled models).
"""

from __future__ import annotations

import io

import numpy as np
import torch

# Ruifrok & Johnston's H&E(-DAB) stain vectors, rows = stains, columns = RGB optical density.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float32)


def jpeg_roundtrip(patch: np.ndarray, rng: np.random.Generator, quality: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(patch).save(buf, format="JPEG", quality=int(rng.integers(quality[0], quality[1] + 1)))
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


def shrink_enlarge(patch: np.ndarray, factor: float) -> np.ndarray:
    """Shrink by ``factor`` and enlarge back, both bilinear (antialiased), about the patch
    centre, so the labelled centre square stays where it was: the pixels a scanner's ``factor``
    times coarser view of the same tissue gives once resampled to the model's frame."""
    from PIL import Image

    h, w = patch.shape[:2]
    small = (max(1, round(w / factor)), max(1, round(h / factor)))
    img = Image.fromarray(patch).resize(small, Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(img.resize((w, h), Image.Resampling.BILINEAR))


def soften(patch: np.ndarray, rng: np.random.Generator, max_factor: float) -> np.ndarray:
    """``shrink_enlarge`` by a random factor in [1, max_factor]."""
    return shrink_enlarge(patch, float(rng.uniform(1.0, max_factor)))


def random_dihedral(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Apply an independent random rotation/flip to each image of an (N, C, H, W) batch."""
    n = x.shape[0]
    # drawn from the CPU generator whatever the batch's device, so a GPU run draws what a CPU run does
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    k = torch.randint(0, 4, (n,), generator=gen).to(x.device)
    out = x.clone()
    for r in (1, 2, 3):
        idx = torch.nonzero(k == r).flatten()
        if idx.numel():
            out[idx] = torch.rot90(x[idx], r, dims=(-2, -1))
    return out


def hed_jitter(rgb01: torch.Tensor, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """Scale and shift each image's stain concentrations; rgb01 is (N, 3, H, W) in [0, 1]."""
    if sigma <= 0:
        return rgb01
    n = rgb01.shape[0]
    m = (_RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)).to(rgb01.device)
    m_inv = torch.linalg.inv(m)
    od = -torch.log(rgb01.clamp(min=1.0 / 255.0))  # (N, 3, H, W)
    hed = torch.einsum("nchw,cs->nshw", od, m_inv)
    alpha = (1.0 + (torch.rand(n, 3, 1, 1, generator=gen) * 2 - 1) * sigma).to(rgb01.device)
    beta = ((torch.rand(n, 3, 1, 1, generator=gen) * 2 - 1) * sigma).to(rgb01.device)
    hed = hed * alpha + beta
    od = torch.einsum("nshw,sc->nchw", hed, m)
    return torch.exp(-od).clamp(0.0, 1.0)


def brightness_contrast(rgb01: torch.Tensor, amount: float, gen: torch.Generator) -> torch.Tensor:
    n = rgb01.shape[0]
    b = ((torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * amount).to(rgb01.device)
    c = (1.0 + (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * amount).to(rgb01.device)
    mean = rgb01.mean(dim=(1, 2, 3), keepdim=True)
    return ((rgb01 - mean) * c + mean + b).clamp(0.0, 1.0)
