"""Device placement of afigan's layers, checked on a CPU: no tensor made inside a forward (or the
losses) without the input's device. The guard (tests/device_guard.py) sends every tensor factory
called from afigan's sources without ``device=`` to the meta device, so the next operation mixing
it with the CPU weights or inputs fails, as it would on a GPU; the tests below first show that it
does catch such a line, then run every layer under it."""

import os

import pytest
import torch
from device_guard import AFIGAN_SOURCES, META_ERRORS, stray_tensors_on_meta
from torch import nn

from afigan.layers import (
    FeaturePatchDiscriminator,
    build_upsampler,
    discriminator_loss,
    generator_loss,
    is_guided,
    upsampler_kinds,
)

THIS_FILE = os.path.abspath(__file__)


class _StrayZeros(nn.Module):
    """The bug the guard is for: ``torch.zeros(shape)`` with no device (the CPU on a GPU run)."""

    def __init__(self, fixed: bool):
        super().__init__()
        self.fixed = fixed

    def forward(self, x):
        pad = torch.zeros(x.shape, device=x.device) if self.fixed else torch.zeros(x.shape)
        return x + pad


class _StrayIndex(nn.Module):
    def forward(self, x):
        return x[torch.arange(x.shape[0]), 0]  # the index made on the CPU, whatever x's device


def test_the_guard_catches_a_tensor_made_without_the_inputs_device():
    x = torch.randn(2, 3, 4, 4)
    with stray_tensors_on_meta((THIS_FILE,)) as guard, pytest.raises(RuntimeError, match=META_ERRORS):
        _StrayZeros(fixed=False)(x)
    assert guard.caught == 1
    with stray_tensors_on_meta((THIS_FILE,)) as guard:
        assert torch.equal(_StrayZeros(fixed=True)(x), x)
    assert guard.caught == 0
    with stray_tensors_on_meta((THIS_FILE,)), pytest.raises(RuntimeError, match=META_ERRORS):
        _StrayIndex()(x)
    # Only the guarded files: the same module, guarded as afigan's code only, passes (it is not afigan's).
    with stray_tensors_on_meta((AFIGAN_SOURCES,)) as guard:
        _StrayZeros(fixed=False)(x)
    assert guard.caught == 0


def _inputs(kind, channels=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, channels, 5, 7, generator=g)
    guide = torch.randn(2, channels, 11, 13, generator=g) if is_guided(kind) else None
    return x, guide


@pytest.mark.parametrize("kind", upsampler_kinds())
def test_every_upsampler_forward_and_backward_makes_no_stray_tensor(kind):
    torch.manual_seed(0)
    up = build_upsampler(kind, 16)
    x, guide = _inputs(kind)
    x.requires_grad_(True)
    expected = up(x, output_size=(11, 13), guide=guide)
    (want,) = torch.autograd.grad(expected.square().sum(), x)
    with stray_tensors_on_meta() as guard:
        out = up(x, output_size=(11, 13), guide=guide)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        up.eval()
        with torch.no_grad():  # the inference paths (the AF interpolator's preallocated buffer)
            inferred = up(x.detach(), output_size=(11, 13), guide=guide)
    assert guard.caught == 0
    assert out.device.type == grad.device.type == inferred.device.type == "cpu"
    assert torch.equal(out, expected) and torch.equal(grad, want)
    assert torch.allclose(inferred, expected, atol=1e-6)


@pytest.mark.parametrize("patch_size", [0, 4])
def test_discriminator_and_both_gan_losses_make_no_stray_tensor(patch_size):
    torch.manual_seed(0)
    d = FeaturePatchDiscriminator(16, base_width=8)
    fake = {"p2": torch.randn(2, 16, 9, 9, requires_grad=True), "p3": torch.randn(2, 16, 5, 5, requires_grad=True)}
    real = {k: torch.randn_like(v) for k, v in fake.items()}
    with stray_tensors_on_meta() as guard:
        torch.manual_seed(1)
        d_losses = discriminator_loss(d, real, fake, patch_size=patch_size)
        sum(d_losses.values()).backward()
        g_losses = generator_loss(d, fake, real, patch_size=patch_size, run_d_on_real=True)
        sum(g_losses.values()).backward()
        d.eval()
        logits = d(real["p2"])
    assert guard.caught == 0 and logits.shape == (2, 1, 9, 9)
    assert sorted(d_losses) == ["loss_d_fake_p2", "loss_d_fake_p3", "loss_d_real_p2", "loss_d_real_p3"]
    assert all(torch.isfinite(v) for v in {**d_losses, **g_losses}.values())
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in fake.values())
