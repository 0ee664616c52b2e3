"""The Feature Enhancement weight terms (pure PyTorch): hand-computed values, gradients, options."""

import math

import pytest
import torch
from torch import nn

from afigan.layers import FeatureEnhancementRegularizer, frobenius_term, stage_weights, variance_term


def _conv(weight, bias=None):
    w = torch.tensor(weight, dtype=torch.float32)
    conv = nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), bias=bias is not None)
    with torch.no_grad():
        conv.weight.copy_(w)
        if bias is not None:
            conv.bias.copy_(torch.tensor(bias, dtype=torch.float32))
    return conv


def tiny_net():
    """res3: A = [1, 2, 3, 4] (var 5/3), B = [-1, 1] (var 2) + bias [0.5, -0.5] (var 1/2) + a BN
    with weight [1, 3] (var 2) and bias [0, 0]; res4: C = [1, 1]; res5: D = [3, 4] (norm 5),
    E = [[1, 2], [2, 4]] (norm 5)."""
    net = nn.Module()
    bn = nn.BatchNorm2d(2)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 3.0]))
    net.res3 = nn.Sequential(_conv([[[[1, 2], [3, 4]]]]), _conv([[[[-1]]], [[[1]]]], bias=[0.5, -0.5]), bn)
    net.res4 = nn.Sequential(_conv([[[[1, 1]]]]))
    net.res5 = nn.Sequential(_conv([[[[3, 4]]]]), _conv([[[[1, 2], [2, 4]]]]))
    return net


def test_terms_equal_hand_computed_values():
    reg = FeatureEnhancementRegularizer(sharp_weight=0.5, smooth_weight=0.1)
    losses, stats = reg.compute(tiny_net())
    assert set(losses) == {"loss_fe_sharp", "loss_fe_smooth"}
    assert stats["fe/sharp_var"].item() == pytest.approx(5 / 3 + 2)
    assert stats["fe/smooth_norm"].item() == pytest.approx(10.0)
    assert losses["loss_fe_sharp"].item() == pytest.approx(-0.5 * (5 / 3 + 2))
    assert losses["loss_fe_smooth"].item() == pytest.approx(0.1 * 10.0)
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in losses.values())


@pytest.mark.parametrize(
    "options,sharp,smooth",
    [
        (dict(params="conv"), 5 / 3 + 2 + 0.5, 10.0),  # + conv bias
        (dict(params="all"), 5 / 3 + 2 + 0.5 + 2 + 0, 10.0),  # + BN weight and bias
        (dict(var_unbiased=False), 5 / 4 + 1, 10.0),
        (dict(smooth_norm="fro_sq"), 5 / 3 + 2, 50.0),
        (dict(reduction="mean"), (5 / 3 + 2) / 2, 5.0),
        (dict(sharp_stages=("res3", "res4"), smooth_stages=("res4", "res5")), 5 / 3 + 2 + 0, 10.0 + math.sqrt(2)),
    ],
)
def test_options_change_the_terms_as_documented(options, sharp, smooth):
    _, stats = FeatureEnhancementRegularizer(sharp_weight=1.0, smooth_weight=1.0, **options).compute(tiny_net())
    assert stats["fe/sharp_var"].item() == pytest.approx(sharp)
    assert stats["fe/smooth_norm"].item() == pytest.approx(smooth)


def test_gradients_are_the_analytic_ones():
    net = tiny_net()
    lam_e, lam_s = 0.3, 0.7
    losses = FeatureEnhancementRegularizer(sharp_weight=lam_e, smooth_weight=lam_s)(net)
    sum(losses.values()).backward()
    for w in stage_weights(net.res5):
        torch.testing.assert_close(w.grad, lam_s * w / w.norm())
    for w in stage_weights(net.res3):
        n = w.numel()
        torch.testing.assert_close(w.grad, -2 * lam_e * (w - w.mean()) / (n - 1))
    # Stages that are not named, and tensors of other kinds, get no gradient from the terms.
    assert net.res4[0].weight.grad is None
    assert net.res3[1].bias.grad is None and net.res3[2].weight.grad is None


def test_sign_smooth_norm_falls_and_sharp_variance_rises():
    torch.manual_seed(0)
    net = nn.Module()
    net.res3, net.res5 = nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)
    reg = FeatureEnhancementRegularizer(sharp_weight=1.0, smooth_weight=1.0)
    opt = torch.optim.SGD(stage_weights(net.res3) + stage_weights(net.res5), lr=0.05)
    _, before = reg.compute(net)
    for _ in range(5):
        opt.zero_grad()
        sum(reg(net).values()).backward()
        opt.step()
    _, after = reg.compute(net)
    assert after["fe/smooth_norm"] < before["fe/smooth_norm"]
    assert after["fe/sharp_var"] > before["fe/sharp_var"]


def test_zero_lambda_gives_no_terms_and_frozen_stage_contributes_nothing():
    net = tiny_net()
    assert FeatureEnhancementRegularizer(sharp_weight=0, smooth_weight=0)(net) == {}
    assert not FeatureEnhancementRegularizer(sharp_weight=0, smooth_weight=0).active
    assert set(FeatureEnhancementRegularizer(sharp_weight=0, smooth_weight=1)(net)) == {"loss_fe_smooth"}
    for p in net.res3.parameters():
        p.requires_grad_(False)
    reg = FeatureEnhancementRegularizer(sharp_weight=1.0, smooth_weight=1.0)
    assert reg.frozen_stages(net) == ["res3"]
    losses = reg(net)
    assert losses["loss_fe_sharp"].item() == 0.0 and not losses["loss_fe_sharp"].requires_grad
    assert losses["loss_fe_smooth"].item() == pytest.approx(10.0)


def test_float32_under_autocast():
    net = nn.Module()
    net.res3, net.res5 = nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3)
    reg = FeatureEnhancementRegularizer(sharp_weight=1.0, smooth_weight=1.0)
    ref = reg(net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = reg(net)
    for k in ref:
        assert amp[k].dtype == torch.float32
        assert amp[k].item() == ref[k].item()
    # The reductions themselves keep float32 for low-precision weights.
    assert frobenius_term([torch.ones(4, dtype=torch.bfloat16)]).dtype == torch.float32
    assert variance_term([torch.tensor([0.0, 2.0], dtype=torch.float16)]).item() == 2.0


def test_strength_relative_to_weight_decay():
    # smooth "fro": lambda_s / (wd * ||W||) = 1e-5 / (1e-4 * 5); sharp: 2 lambda_e / ((n - 1) wd).
    s = FeatureEnhancementRegularizer(sharp_weight=1e-5, smooth_weight=1e-5).strength(tiny_net(), 1e-4)
    assert s["loss_fe_smooth"] == pytest.approx((0.02, 0.02))
    assert s["loss_fe_sharp"] == pytest.approx((2e-5 / (3 * 1e-4), 2e-5 / (1 * 1e-4)))
    assert FeatureEnhancementRegularizer(smooth_norm="fro_sq").strength(tiny_net(), 1e-4)[
        "loss_fe_smooth"
    ] == pytest.approx((0.2, 0.2))
    assert FeatureEnhancementRegularizer().strength(tiny_net(), 0.0) == {}


def test_bad_arguments_fail_with_a_clear_error():
    with pytest.raises(KeyError, match="res9"):
        FeatureEnhancementRegularizer(sharp_stages=("res9",))(tiny_net())
    with pytest.raises(ValueError, match="parameter kind"):
        FeatureEnhancementRegularizer(params="bias")
    with pytest.raises(ValueError, match=">= 0"):
        FeatureEnhancementRegularizer(sharp_weight=-1.0)
    with pytest.raises(ValueError, match="smooth norm"):
        FeatureEnhancementRegularizer(smooth_norm="l1")
