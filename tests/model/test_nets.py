"""The dense-exact network: a region's outputs equal the outputs of its windows, one by one."""

from __future__ import annotations

import pytest
import torch

from wsi_scan.errors import ModelError
from wsi_scan.model.nets import DenseCNN, DenseEnsemble, build_network
from wsi_scan.model.transforms import dihedral, dihedral_inverse, predict_logits


def _assert_each_window(net: torch.nn.Module, x: torch.Tensor, dense: torch.Tensor) -> None:
    """Each dense output equals the output of its own 96x96 window, classified alone."""
    for i in range(dense.shape[2]):
        for j in range(dense.shape[3]):
            one = net(x[..., 32 * i : 32 * i + 96, 32 * j : 32 * j + 96])
            torch.testing.assert_close(dense[0, 0, i, j], one[0, 0, 0, 0], atol=1e-5, rtol=0)


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
        _assert_each_window(net, x, dense)


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
        _assert_each_window(net, x, dense)


def test_ensemble_input_affine_maps_each_members_pixel_and_stays_dense_exact():
    torch.manual_seed(0)
    affine = [[1.0, 1.0, 1.0, 0.0, 0.0, 0.0], [1.2, 0.8, 1.1, -0.3, 0.2, 0.1]]
    net = _random_bn(build_network("dense-cnn-ensemble", widths=[8, 4], input_affine=affine))
    x = torch.randn(1, 3, 96 + 32, 96 + 64)
    scale = torch.tensor(affine[1][:3]).view(1, 3, 1, 1)
    shift = torch.tensor(affine[1][3:]).view(1, 3, 1, 1)
    with torch.no_grad():
        dense = net(x)
        torch.testing.assert_close(dense, (net.members[0](x) + net.members[1](x * scale + shift)) / 2, atol=1e-6, rtol=0)
        _assert_each_window(net, x, dense)
    assert not any("affine" in k for k in net.state_dict())  # the card holds it, not the weights


def test_member_affine_is_the_change_of_normalisation():
    from wsi_scan.model.nets import member_affine

    big_m, big_s, m, s = [0.7, 0.5, 0.6], [0.2, 0.3, 0.25], [0.65, 0.55, 0.6], [0.25, 0.2, 0.25]
    row = member_affine(big_m, big_s, m, s)
    p = torch.tensor([0.1, 0.9, 0.42])
    ensemble_px = (p - torch.tensor(big_m)) / torch.tensor(big_s)
    torch.testing.assert_close(
        ensemble_px * torch.tensor(row[:3]) + torch.tensor(row[3:]), (p - torch.tensor(m)) / torch.tensor(s)
    )


@pytest.mark.parametrize(
    "affine",
    [
        [[1, 1, 1, 0, 0, 0]],
        [[1, 1, 1, 0, 0]] * 2,
        [[0, 1, 1, 0, 0, 0]] * 2,
        [[1, 1, 1, float("nan"), 0, 0]] * 2,
        [[1, 1, 1, 1e3, 0, 0]] * 2,
        "x",
        [[True, 1, 1, 0, 0, 0]] * 2,
    ],
)
def test_ensemble_input_affine_is_checked(affine):
    with pytest.raises(ModelError, match="input_affine must be a list of one row per member"):
        build_network("dense-cnn-ensemble", widths=[8, 8], input_affine=affine)


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


def _random_field_bn(net: torch.nn.Module) -> torch.nn.Module:
    for mod in net.modules():  # non-trivial statistics, scales and shifts, one per field
        if isinstance(mod, torch.nn.BatchNorm3d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


@pytest.mark.parametrize("k", range(8))
def test_p4m_output_turns_with_its_input_exactly(k):
    """Every layer is equivariant to the 8 rotations/flips, so a transformed region's logits are
    the region's logits transformed the same way (a non-square region too: a quarter turn swaps
    its sides), and a window's logit does not change at all: the 8-view TTA is built in."""
    torch.manual_seed(k)
    net = _random_field_bn(build_network("dense-cnn-p4m", width=16))
    x = torch.randn(2, 3, 96 + 64, 96 + 32)
    with torch.no_grad():
        y = net(x)
        torch.testing.assert_close(net(dihedral(x, k)), dihedral(y, k), atol=1e-5, rtol=0)
        w = x[..., :96, :96]
        torch.testing.assert_close(net(dihedral(w, k)), net(w), atol=1e-5, rtol=0)


def test_tta_runs_an_invariant_network_once():
    """The 8 views of a p4m network are one logit (the test above), so TTA costs one pass."""
    net = build_network("dense-cnn-p4m", width=8).eval()
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        predict_logits(net, torch.randn(1, 3, 96, 96), tta=True)
    assert len(calls) == 1
    plain = DenseCNN(width=8).eval()
    plain.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        predict_logits(plain, torch.randn(1, 3, 96, 96), tta=True)
    assert len(calls) == 9


def test_tta_runs_the_invariant_members_of_an_ensemble_once():
    """Mixed ensemble: the p4m member's share is the same in every view, so it runs once, the
    plain member 8 times, and the result is the 8-pass TTA's (dense, to rounding)."""
    torch.manual_seed(5)
    net = _random_field_bn(DenseEnsemble([8, 4], archs=["dense-cnn-p4m", "dense-cnn"]))
    calls = {0: 0, 1: 0}
    for i, m in enumerate(net.members):
        m.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    x = torch.randn(2, 3, 96 + 32, 96 + 64)
    with torch.no_grad():
        got = predict_logits(net, x, tta=True)
        assert calls == {0: 1, 1: 8}
        probs = sum(torch.sigmoid(dihedral_inverse(net(dihedral(x, k)), k)) for k in range(8)) / 8
    torch.testing.assert_close(torch.sigmoid(got), probs, atol=1e-6, rtol=0)
    assert not net.dihedral_invariant
    assert DenseEnsemble([8, 8], archs=["dense-cnn-p4m"] * 2).dihedral_invariant
    assert DenseEnsemble([8, 8]).tta_parts() is None


@pytest.mark.parametrize(("m", "n"), [(0, 0), (2, 1)])
def test_p4m_is_dense_exact(m, n):
    torch.manual_seed(3)
    net = _random_field_bn(build_network("dense-cnn-p4m", width=8))
    x = torch.randn(1, 3, 96 + 32 * m, 96 + 32 * n)
    with torch.no_grad():
        dense = net(x)
        assert dense.shape == (1, 1, 1 + m, 1 + n)
        _assert_each_window(net, x, dense)


def test_p4m_costs_what_dense_cnn_costs_at_one_width_with_an_eighth_of_the_filters():
    from torch.utils.flop_counter import FlopCounterMode

    def flops(net: torch.nn.Module) -> int:
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            net.eval()(torch.zeros(1, 3, 96, 96))
        return fc.get_total_flops()

    p4m, plain = build_network("dense-cnn-p4m", width=16), DenseCNN(width=16)
    # the last 1x1 layer gives the 8 orientations' logits (their mean is the output), not one
    assert flops(p4m) == flops(plain) + 2 * 7 * 64
    convs = [m for m in p4m.modules() if type(m).__name__ == "_P4MConv"]
    n_p4m = sum(c.weight.numel() for c in convs)
    n_plain = sum(m.weight.numel() for m in plain.modules() if isinstance(m, torch.nn.Conv2d))
    assert n_p4m * 8 == n_plain + 7 * 64  # every filter serves 8 orientations, but the last layer's


def test_p4m_batch_norm_keeps_one_statistic_per_field():
    """Training normalises each channel by its batch; the running statistics, which inference
    uses, are the field's over its 8 orientations (so inference stays exactly equivariant)."""
    torch.manual_seed(0)
    net = build_network("dense-cnn-p4m", width=8)
    bn = net.features[1]
    assert isinstance(bn, torch.nn.BatchNorm3d) and bn.running_mean.shape == (1,)
    bn.momentum = 1.0
    x = torch.randn(4, 3, 96, 96) * 3 + 1
    net.train()
    with torch.no_grad():
        h = net.features[0](x)
        net.features[1](h)
    field = h.transpose(0, 1).reshape(-1)
    torch.testing.assert_close(bn.running_mean, field.mean().view(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, field.var(unbiased=False).view(1), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("width", [12, 4, 300, 16.0])
def test_p4m_width_is_checked(width):
    with pytest.raises(ModelError, match="width"):
        build_network("dense-cnn-p4m", width=width)


def test_ensemble_of_a_p4m_and_a_dense_cnn_member_is_dense_exact():
    torch.manual_seed(2)
    net = _random_field_bn(_random_bn(build_network("dense-cnn-ensemble", widths=[16, 8], archs=["dense-cnn-p4m", "dense-cnn"])))
    x = torch.randn(1, 3, 96 + 32, 96 + 64)
    with torch.no_grad():
        dense = net(x)
        torch.testing.assert_close(dense, (net.members[0](x) + net.members[1](x)) / 2, atol=1e-6, rtol=0)
        _assert_each_window(net, x, dense)


@pytest.mark.parametrize("archs", [["dense-cnn"], ["dense-cnn", "resnet18"], ["dense-cnn-p4m", "dense-cnn"], "dense-cnn", [1, 2]])
def test_ensemble_archs_are_checked(archs):
    # widths [12, 8]: a p4m member needs a multiple of 8, so the third case is refused too
    with pytest.raises(ModelError, match="archs must be a list of one architecture per member"):
        build_network("dense-cnn-ensemble", widths=[12, 8], archs=archs)


def test_p4m_expanded_filters_kept_between_calls_follow_the_weights():
    """A scan reuses the expanded filters; a loaded state, a step or an in-place edit of the
    weights must reach the next call, never the filters of the weights before."""
    torch.manual_seed(4)
    net = _random_field_bn(build_network("dense-cnn-p4m", width=8))
    other = _random_field_bn(build_network("dense-cnn-p4m", width=8))
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        a = net(x)
        torch.testing.assert_close(net(x), a, atol=0, rtol=0)
        net.load_state_dict(other.state_dict())
        torch.testing.assert_close(net(x), other(x), atol=0, rtol=0)
        net.features[0].weight.mul_(2)
        fresh = build_network("dense-cnn-p4m", width=8).eval()
        fresh.load_state_dict(net.state_dict())
        torch.testing.assert_close(net(x), fresh(x), atol=0, rtol=0)
    net.train()
    net(x).sum().backward()  # with gradients the filters are expanded in the graph
    assert net.features[0].weight.grad is not None and net.features[0].weight.grad.abs().sum() > 0
