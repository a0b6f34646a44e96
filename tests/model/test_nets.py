"""The dense-exact network: a region's outputs equal the outputs of its windows, one by one."""

from __future__ import annotations

import pytest
import torch

from wsi_scan.errors import ModelError
from wsi_scan.model.nets import DenseCNN, DenseEnsemble, build_network
from wsi_scan.model.transforms import dihedral, dihedral_inverse, predict_logits


@pytest.mark.parametrize(("m", "n"), [(0, 0), (1, 3), (4, 2)])
def test_dense_cnn_output_per_window(m, n):
    torch.manual_seed(0)
    net = DenseCNN(width=8).eval()
    for mod in net.modules():  # non-trivial batch-norm statistics
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 3, 96 + 32 * m, 96 + 32 * n)
    with torch.no_grad():
        dense = net(x)
        assert dense.shape == (1, 1, 1 + m, 1 + n)
        for i in range(1 + m):
            for j in range(1 + n):
                one = net(x[..., 32 * i : 32 * i + 96, 32 * j : 32 * j + 96])
                torch.testing.assert_close(dense[0, 0, i, j], one[0, 0, 0, 0], atol=1e-5, rtol=0)


def _random_bn(net: torch.nn.Module) -> torch.nn.Module:
    for mod in net.modules():  # non-trivial batch-norm statistics
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_ensemble_is_the_mean_logit_of_its_members_and_dense_exact():
    torch.manual_seed(1)
    net = _random_bn(DenseEnsemble([8, 4, 6]))
    x = torch.randn(1, 3, 96 + 32 * 2, 96 + 32 * 3)
    with torch.no_grad():
        dense = net(x)
        mean = sum(m(x) for m in net.members) / 3
        torch.testing.assert_close(dense, mean, atol=1e-6, rtol=0)
        assert dense.shape == (1, 1, 3, 4)
        for i in range(3):
            for j in range(4):
                one = net(x[..., 32 * i : 32 * i + 96, 32 * j : 32 * j + 96])
                torch.testing.assert_close(dense[0, 0, i, j], one[0, 0, 0, 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("widths", [None, [8], [8, 8, 8, 8, 8], [8, 1000], [8, 7.5], [8, True], "8,8", [8, "8"]])
def test_ensemble_widths_are_checked_before_any_allocation(widths):
    kwargs = {} if widths is None else {"widths": widths}
    with pytest.raises(ModelError, match="widths must be a list of 2 to 4 integers"):
        build_network("dense-cnn-ensemble", **kwargs)
    with pytest.raises(ModelError, match="has no setting 'width'"):
        build_network("dense-cnn-ensemble", widths=[8, 8], width=8)


def test_resnet18_is_patch_only():
    net = build_network("resnet18").eval()
    assert not net.dense_exact
    with torch.no_grad():
        assert net(torch.randn(2, 3, 96, 96)).shape == (2, 1, 1, 1)


def test_unknown_arch():
    with pytest.raises(ModelError, match="unknown architecture"):
        build_network("vgg99")


def test_dihedral_roundtrip_and_dense_tta_exact():
    x = torch.randn(1, 1, 5, 7)
    for k in range(8):
        torch.testing.assert_close(dihedral_inverse(dihedral(x, k), k), x)
    torch.manual_seed(1)
    net = DenseCNN(width=8).eval()
    region = torch.randn(1, 3, 96 + 64, 96 + 32)
    with torch.no_grad():
        dense = predict_logits(net, region, tta=True)
        w = region[..., 64:160, 32:128]
        one = predict_logits(net, w, tta=True)
    torch.testing.assert_close(dense[0, 0, 2, 1], one[0, 0, 0, 0], atol=1e-5, rtol=0)
