"""Patch classifiers.

``DenseCNN`` is dense-exact (DESIGN section 4): valid convolutions, non-overlapping stride-2
pooling on even sizes only, total stride 32, receptive field 96 and a convolutional head. A
region of (96 + 32m) x (96 + 32n) px therefore yields (1 + m) x (1 + n) logits, each equal to
the logit of its own 96x96 window. The first step is a 2x2 stride-2 convolution (space to depth)
so that no layer runs at full resolution: that is where a CPU spends its time.

Sizes through the network for a window of 96 + 32n px:
96+32n -s2-> 48+16n -c3-> 46+16n -c3-> 44+16n -p-> 22+8n -c3-> 20+8n -c3-> 18+8n -p-> 9+4n
-c2-> 8+4n -p-> 4+2n -c3-> 2+2n -p-> 1+n.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from .transforms import dihedral


def _conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, first: bool = False) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, k, stride=stride, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


def _dense_plan(
    block: Callable[..., list[nn.Module]], conv1x1: Callable[[int, int], nn.Module], w: int, dropout: float
) -> tuple[nn.Sequential, nn.Sequential]:
    """The dense-exact plan (module docstring), features and head, in units of ``w`` channels
    (or fields) at the first stage: one definition for every network built on it, so none can
    drift from the sizes that keep it exact. ``block(c_in, c_out, k, stride, first)`` is a
    convolution with its norm and ReLU, ``first`` the one that reads the RGB input."""
    features = nn.Sequential(
        *block(3, w, 2, 2, True),
        *block(w, w, 3, 1, False),
        *block(w, w, 3, 1, False),
        nn.MaxPool2d(2),
        *block(w, 2 * w, 3, 1, False),
        *block(2 * w, 2 * w, 3, 1, False),
        nn.MaxPool2d(2),
        *block(2 * w, 4 * w, 2, 1, False),
        nn.MaxPool2d(2),
        *block(4 * w, 4 * w, 3, 1, False),
        nn.MaxPool2d(2),
    )
    head = nn.Sequential(
        nn.Dropout(dropout),
        conv1x1(4 * w, 4 * w),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        conv1x1(4 * w, 1),
    )
    return features, head


class DenseCNN(nn.Module):
    """Dense-exact PCam classifier; returns logits of shape (N, 1, 1 + m, 1 + n)."""

    dense_exact = True
    input_px = 96  # the window side in px (a card's input_px)
    stride_px = 32

    def __init__(self, width: int = 32, dropout: float = 0.2) -> None:
        super().__init__()
        self.features, self.head = _dense_plan(_conv_bn, lambda i, o: nn.Conv2d(i, o, 1), width, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _d4_tables() -> tuple[list[list[int]], list[int]]:
    """The dihedral group of the square as the 8 transforms of ``transforms.dihedral`` (k: flip
    when k >= 4, then k % 4 quarter turns): ``mul[a][b]`` is the index of "b, then a", ``inv[a]``
    of a's inverse. Found by applying the transforms to a 2x2 array of distinct values, so the
    tables cannot disagree with the transforms the network and TTA use."""
    probe = torch.arange(4.0).view(2, 2)
    keys = [tuple(dihedral(probe, k).flatten().tolist()) for k in range(8)]
    mul = [[keys.index(tuple(dihedral(dihedral(probe, b), a).flatten().tolist())) for b in range(8)] for a in range(8)]
    inv = [row.index(0) for row in mul]
    return mul, inv


class _P4MConv(nn.Module):
    """A convolution equivariant to the 8 rotations and flips of the square (p4m, Cohen and
    Welling 2016). Channels are fields of 8 orientations, ``field * 8 + g``. One filter per field
    pair is learned; the filter of output orientation g is that filter turned by g with its input
    orientations permuted by g^-1 (``lift``: from plain channels, turned only). Expanded into one
    ordinary weight per call, so it runs as a plain valid convolution and stays dense-exact; on a
    window of even side every step of DenseCNN's plan maps onto itself under the 8 transforms, so
    the equivariance is exact, not approximate."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, lift: bool = False, bias: bool = False) -> None:
        super().__init__()
        self.c_out, self.k, self.stride, self.lift = c_out, k, stride, lift
        n_in = c_in if lift else c_in * 8
        self.weight = nn.Parameter(torch.empty(c_out, n_in, k, k))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None
        self._cache: tuple[tuple[object, ...], torch.Tensor] | None = None
        mul, inv = _d4_tables()
        # perm[g][h]: the learned input orientation that output orientation g reads at input h
        self.perm: torch.Tensor
        self.register_buffer("perm", torch.tensor([[mul[inv[g]][h] for h in range(8)] for g in range(8)]), persistent=False)

    def expanded(self) -> torch.Tensor:
        w: torch.Tensor = self.weight
        out = []
        for g in range(8):
            if self.lift:
                wg = w
            else:
                c_out, n_in, k, _ = w.shape
                wg = w.view(c_out, n_in // 8, 8, k, k)[:, :, self.perm[g]].reshape(c_out, n_in, k, k)
            out.append(dihedral(wg, g))
        # (c_out, 8, n_in, k, k) -> output channel field * 8 + g
        return torch.stack(out, 1).reshape(self.c_out * 8, *w.shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.repeat_interleave(8)
        return nn.functional.conv2d(x, self._weight_for_call(), b, stride=self.stride)

    def _weight_for_call(self) -> torch.Tensor:
        """The expanded weight; kept between calls that need no gradient (a scan's thousands of
        regions: the expansion is about 3% of a region's time), made again whenever the weight
        tensor changes (a loaded state, an optimiser step, a move to another device)."""
        if torch.is_grad_enabled() and self.weight.requires_grad:
            self._cache = None
            return self.expanded()
        w = self.weight
        key = (w.data_ptr(), w._version, w.device, w.dtype)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.expanded().detach())
        return self._cache[1]


class _FieldBatchNorm(nn.BatchNorm3d):
    """Batch norm with one mean, variance, scale and shift per field, shared by its 8
    orientations, so that inference is exactly equivariant. In training each channel is
    normalised by its own batch statistics (the fused channels-last kernel; pooling them per
    field in Python made an epoch about 40% slower) and the running statistics are the field's:
    the mean of its channels' means, and their variances plus the spread of their means. Under
    dihedral augmentation a field's 8 channels see the same distribution, so the two differ by
    batch noise only, as any batch norm's training and inference statistics do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.running_mean is not None and self.running_var is not None
        weight, bias = self.weight.repeat_interleave(8), self.bias.repeat_interleave(8)
        if not self.training:
            return nn.functional.batch_norm(
                x,
                self.running_mean.repeat_interleave(8),
                self.running_var.repeat_interleave(8),
                weight,
                bias,
                False,
                0.0,
                self.eps,
            )
        c = x.shape[1]
        batch_mean = torch.zeros(c, device=x.device, dtype=torch.float32)
        batch_var = torch.ones(c, device=x.device, dtype=torch.float32)
        # momentum 1: the buffers passed in come back holding this batch's per-channel statistics
        y = nn.functional.batch_norm(x, batch_mean, batch_var, weight, bias, True, 1.0, self.eps)
        with torch.no_grad():
            mean = batch_mean.view(-1, 8)
            field_mean = mean.mean(1)
            field_var = (batch_var.view(-1, 8) + mean * mean).mean(1) - field_mean * field_mean
            m = self.momentum if self.momentum is not None else 0.1
            self.running_mean.mul_(1 - m).add_(field_mean, alpha=m)
            self.running_var.mul_(1 - m).add_(field_var, alpha=m)
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
        return y


def _p4m_conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, first: bool = False) -> list[nn.Module]:
    """``first``: lifted from the RGB input (turned only; the input has no orientations)."""
    return [_P4MConv(c_in, c_out, k, stride, lift=first), _FieldBatchNorm(c_out), nn.ReLU(inplace=True)]


class DenseP4M(nn.Module):
    """DenseCNN's plan (sizes, strides, receptive field, so dense-exact) built from p4m group
    convolutions, as the 2018 PatchCamelyon state of the art (Veeling et al.) was: every layer is
    equivariant to the 8 rotations and flips of the window and the logit, the mean over the last
    field's 8 orientations, is invariant to them. The 8-view TTA is built in (it gives the same
    logit), and a filter is learned once for 8 orientations, so on few patches the network spends
    its parameters on what is not orientation. ``width`` counts channels as DenseCNN's does (a
    multiple of 8: width / 8 fields), so the two cost the same per cell at the same width."""

    dense_exact = True
    dihedral_invariant = True  # the 8 views of a window give one logit: TTA runs it once (transforms.py)
    input_px = 96  # the window side in px (a card's input_px)
    stride_px = 32

    def __init__(self, width: int = 48, dropout: float = 0.2) -> None:
        super().__init__()
        if width % 8:
            raise ModelError(
                f"architecture 'dense-cnn-p4m': width must be a multiple of 8 (8 orientations a field), found {width}"
            )
        self.features, self.head = _dense_plan(_p4m_conv_bn, lambda i, o: _P4MConv(i, o, 1, bias=True), width // 8, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).mean(1, keepdim=True)


class DenseEnsemble(nn.Module):
    """The mean of the logits of dense-exact members that share one geometry (window 96, stride
    32), so it is dense-exact too: each output is the mean of the members' outputs for the same
    window. Logits, not probabilities, are averaged so the output stays a logit; on the
    validation split both give the same AUC (docs/model.md).

    The input arrives normalised by the ensemble card's mean/std. Members trained with another
    normalisation (it is measured on a seeded sample of the training patches, so it differs with
    the seed) get ``input_affine``: per member, three scales and three shifts that turn the
    ensemble's normalised pixel into the member's own, exactly (``x * s + b``, per channel). A
    per-pixel map keeps every member, and so the mean, dense-exact."""

    dense_exact = True
    input_px = 96  # the window side in px (a card's input_px)
    stride_px = 32

    def __init__(
        self,
        widths: list[int],
        dropout: float = 0.2,
        input_affine: list[list[float]] | None = None,
        archs: list[str] | None = None,
    ) -> None:
        super().__init__()
        kinds = archs if archs is not None else ["dense-cnn"] * len(widths)
        self.members = nn.ModuleList(
            [(DenseP4M if a == "dense-cnn-p4m" else DenseCNN)(w, dropout) for w, a in zip(widths, kinds, strict=True)]
        )
        self.affine: torch.Tensor | None
        if input_affine is None:
            self.affine = None
        else:
            # 2-D, so that a channels_last conversion of the network leaves it alone; not
            # persistent: the card holds the numbers, so files without them still load
            self.register_buffer("affine", torch.tensor(input_affine, dtype=torch.float32).view(len(widths), 6), persistent=False)

    @property
    def dihedral_invariant(self) -> bool:
        return all(getattr(m, "dihedral_invariant", False) for m in self.members)

    def tta_parts(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]] | None:
        """The mean split into the members whose logit the 8 views do not change and the rest
        (their shares add up to the mean), so that TTA runs the first once; None where the
        members are all of one kind."""
        fixed = [i for i, m in enumerate(self.members) if getattr(m, "dihedral_invariant", False)]
        varying = [i for i in range(len(self.members)) if i not in fixed]
        if not fixed or not varying:
            return None
        return (lambda x: self(x, members=fixed)), (lambda x: self(x, members=varying))

    def forward(self, x: torch.Tensor, members: Sequence[int] | None = None) -> torch.Tensor:
        """The mean logit; with ``members``, only their share of it (their sum over all members' count)."""
        out: torch.Tensor | None = None
        for i, m in enumerate(self.members):
            if members is not None and i not in members:
                continue
            if self.affine is None:
                xi = x
            else:
                row = self.affine[i].to(x.dtype)
                xi = x * row[:3].view(1, 3, 1, 1) + row[3:].view(1, 3, 1, 1)
            y = m(xi)
            out = y if out is None else out + y
        assert out is not None
        return out / len(self.members)


def member_affine(
    ensemble_mean: Sequence[float], ensemble_std: Sequence[float], mean: Sequence[float], std: Sequence[float]
) -> list[float]:
    """The ``input_affine`` row (three scales, three shifts) that maps a pixel normalised by the
    ensemble's mean/std to the same pixel normalised by a member's: with p the raw pixel,
    (p - m) / s = ((p - M) / S) * (S / s) + (M - m) / s."""
    scales = [big_s / s for big_s, s in zip(ensemble_std, std, strict=True)]
    shifts = [(big_m - m) / s for big_m, m, s in zip(ensemble_mean, mean, std, strict=True)]
    return [*scales, *shifts]


class PatchClassifier(nn.Module):
    """Wraps a network with a (N, 1) output into the (N, 1, 1, 1) convention of DenseCNN."""

    dense_exact = False
    input_px = 96  # the window side in px (a card's input_px)
    stride_px = 32

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).reshape(x.shape[0], 1, 1, 1)


def _resnet18() -> nn.Module:
    from torchvision.models import resnet18

    net = resnet18(weights=None, num_classes=1)
    # 96 px inputs: a 3x3 stride-1 stem and no max-pool keep a 12x12 map before the last stage
    # instead of collapsing to 3x3, which matters for a 32 px centre label.
    net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()  # type: ignore[assignment]
    return PatchClassifier(net)


ARCHITECTURES = ("dense-cnn", "dense-cnn-p4m", "dense-cnn-ensemble", "resnet18")
ENSEMBLE_SIZE = (2, 4)


#: the settings each architecture takes, with their allowed ranges (a card is data from a file)
ARCH_KWARGS: dict[str, dict[str, tuple[float, float]]] = {
    "dense-cnn": {"width": (4, 256), "dropout": (0.0, 0.9)},
    "dense-cnn-p4m": {"width": (8, 256), "dropout": (0.0, 0.9)},
    "dense-cnn-ensemble": {"dropout": (0.0, 0.9)},  # and "widths", "input_affine", "archs": lists checked on their own
    "resnet18": {},
}


def _check_widths(widths: Any) -> None:
    lo, hi = ARCH_KWARGS["dense-cnn"]["width"]
    n_lo, n_hi = ENSEMBLE_SIZE
    if (
        not isinstance(widths, list)
        or not n_lo <= len(widths) <= n_hi
        or not all(isinstance(w, int) and not isinstance(w, bool) and lo <= w <= hi for w in widths)
    ):
        raise ModelError(
            f"architecture 'dense-cnn-ensemble': widths must be a list of {n_lo} to {n_hi} integers in "
            f"[{lo:g}, {hi:g}] (one per member), found {widths!r:.60}"
        )


#: the architectures an ensemble's members may have (``archs``; absent: all dense-cnn)
MEMBER_ARCHITECTURES = ("dense-cnn", "dense-cnn-p4m")


def _check_archs(archs: Any, widths: list[int]) -> None:
    if (
        not isinstance(archs, list)
        or len(archs) != len(widths)
        or not all(isinstance(a, str) and a in MEMBER_ARCHITECTURES for a in archs)
        or any(a == "dense-cnn-p4m" and w % 8 for a, w in zip(archs, widths))
    ):
        raise ModelError(
            "architecture 'dense-cnn-ensemble': archs must be a list of one architecture per member, each one of "
            f"{', '.join(MEMBER_ARCHITECTURES)} (dense-cnn-p4m with a width that is a multiple of 8), found {archs!r:.80}"
        )


def _finite(v: float) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond any float
        return False


def affine_row_in_range(row: Any) -> bool:
    """One member's ``input_affine`` row: three finite scales in [0.01, 100] (a member's std
    over the ensemble's within a factor 100) and three finite shifts in [-100, 100]."""
    if not isinstance(row, list) or len(row) != 6:
        return False
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v) for v in row):
        return False
    return all(0.01 <= v <= 100 for v in row[:3]) and all(abs(v) <= 100 for v in row[3:])


def _check_affine(affine: Any, n_members: int) -> None:
    """An ``input_affine`` from a card: one row in range per member."""
    if not isinstance(affine, list) or len(affine) != n_members or not all(affine_row_in_range(r) for r in affine):
        raise ModelError(
            "architecture 'dense-cnn-ensemble': input_affine must be a list of one row per member "
            f"({n_members}), each three scales in [0.01, 100] and three shifts in [-100, 100], found {affine!r:.80}"
        )


def build_network(arch: str, **kwargs: Any) -> nn.Module:
    """Build an untrained network by its card name; settings are checked before any allocation."""
    allowed = ARCH_KWARGS.get(arch)
    if arch == "dense-cnn-ensemble":
        _check_widths(kwargs.get("widths"))
        if kwargs.get("input_affine") is not None:
            _check_affine(kwargs["input_affine"], len(kwargs["widths"]))
        if kwargs.get("archs") is not None:
            _check_archs(kwargs["archs"], kwargs["widths"])
    if allowed is not None:
        for k, v in kwargs.items():
            if arch == "dense-cnn-ensemble" and k in ("widths", "input_affine", "archs"):
                continue
            if k not in allowed:
                raise ModelError(f"architecture {arch!r} has no setting {k!r} (it takes: {', '.join(allowed) or 'none'})")
            lo, hi = allowed[k]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (lo <= v <= hi):
                raise ModelError(f"architecture {arch!r}: {k} must lie in [{lo:g}, {hi:g}], found {v!r:.40}")
        if "width" in kwargs and not isinstance(kwargs["width"], int):
            raise ModelError(f"architecture {arch!r}: width must be an integer, found {kwargs['width']!r}")
    if arch == "dense-cnn":
        return DenseCNN(**kwargs)
    if arch == "dense-cnn-p4m":
        return DenseP4M(**kwargs)
    if arch == "dense-cnn-ensemble":
        return DenseEnsemble(**kwargs)
    if arch == "resnet18":
        return _resnet18()
    raise ModelError(
        f"unknown architecture {arch!r}: expected one of {', '.join(ARCHITECTURES)}; "
        "a model from elsewhere can be used as TorchScript with a JSON card"
    )
