import math

import pytest
import torch
from torch import nn

from afigan.layers import FeaturePatchDiscriminator, crop_to_common, discriminator_loss, generator_loss


class ConstantD(nn.Module):
    """A 'discriminator' returning scale * mean over channels, for hand computation."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, x):
        return self.scale * x.mean(1, keepdim=True)


def softplus(z):
    return math.log1p(math.exp(z))


def test_hand_computed_losses():
    real = {"p2": torch.full((1, 2, 2, 2), 1.0)}
    fake = {"p2": torch.full((1, 2, 2, 2), -1.0)}
    d = ConstantD()
    dl = discriminator_loss(d, real, fake)
    # BCE(z=1, y=1) = softplus(-1); BCE(z=-1, y=0) = softplus(-1).
    assert dl["loss_d_real_p2"].item() == pytest.approx(softplus(-1))
    assert dl["loss_d_fake_p2"].item() == pytest.approx(softplus(-1))
    gl = generator_loss(d, fake, real, adv_weight=0.5, content_weight=2.0)
    # BCE(z=-1, y=1) = softplus(1); L1 = |(-1) - 1| = 2.
    assert gl["loss_adv_p2"].item() == pytest.approx(0.5 * softplus(1))
    assert gl["loss_content_p2"].item() == pytest.approx(4.0)


def test_default_weights_and_level_sum():
    real = {"p2": torch.zeros(1, 1, 2, 2), "p3": torch.zeros(1, 1, 1, 1)}
    fake = {"p2": torch.ones(1, 1, 2, 2), "p3": torch.ones(1, 1, 1, 1)}
    gl = generator_loss(ConstantD(0.0), fake, real)
    assert set(gl) == {"loss_adv_p2", "loss_content_p2", "loss_adv_p3", "loss_content_p3"}
    assert gl["loss_adv_p3"].item() == pytest.approx(1e-3 * math.log(2))
    assert sum(gl.values()).item() == pytest.approx(2 * (1.0 + 1e-3 * math.log(2)))
    assert set(generator_loss(ConstantD(), fake, real, levels=["p3"])) == {"loss_adv_p3", "loss_content_p3"}


def test_adversarial_term_gives_generator_gradient_and_leaves_d_alone():
    d = FeaturePatchDiscriminator(channels=4)
    fake = torch.randn(2, 4, 6, 6, requires_grad=True)
    real = torch.randn(2, 4, 6, 6)
    # Content weight 0 isolates the adversarial term.
    loss = sum(generator_loss(d, {"p2": fake}, {"p2": real}, content_weight=0.0).values())
    loss.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.parameters())
    assert all(p.requires_grad for p in d.parameters())  # restored after the call


def test_generator_loss_leaves_discriminator_statistics_alone():
    d = FeaturePatchDiscriminator(channels=4)
    before = {k: v.clone() for k, v in d.state_dict().items()}
    generator_loss(d, {"p2": torch.randn(2, 4, 5, 5)}, {"p2": torch.randn(2, 4, 5, 5)})
    for k, v in d.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_legacy_detached_adversarial_term_gives_zero_gradient():
    d = FeaturePatchDiscriminator(channels=4)
    fake = torch.randn(1, 4, 5, 5, requires_grad=True)
    gl = generator_loss(d, {"p2": fake}, {"p2": torch.randn(1, 4, 5, 5)}, adv_grad=False)
    assert gl["loss_adv_p2"].item() > 0
    assert not gl["loss_adv_p2"].requires_grad


def test_discriminator_loss_detaches_fake():
    d = ConstantD()
    fake = torch.randn(1, 2, 3, 3, requires_grad=True)
    loss = sum(discriminator_loss(d, {"p2": torch.randn(1, 2, 3, 3)}, {"p2": fake}).values())
    loss.backward()
    assert fake.grad is None
    assert d.scale.grad is not None


def test_crop_alignment_uses_top_left_window():
    real = torch.arange(5 * 6.0).reshape(1, 1, 5, 6)
    fake = torch.zeros(1, 1, 6, 4)
    f, r = crop_to_common(fake, real)
    assert f.shape == r.shape == (1, 1, 5, 4)
    assert torch.equal(r, real[..., :5, :4])
    gl = generator_loss(ConstantD(), {"p2": fake}, {"p2": real}, adv_weight=0.0)
    assert gl["loss_content_p2"].item() == pytest.approx(real[..., :5, :4].abs().mean().item())
    assert "loss_adv_p2" not in gl


def test_missing_level_is_named():
    with pytest.raises(KeyError, match="'p6'"):
        generator_loss(
            ConstantD(), {"p2": torch.zeros(1, 1, 1, 1)}, {"p2": torch.zeros(1, 1, 1, 1)}, levels=["p2", "p6"]
        )
