"""The fast paths of afigan.layers (pure PyTorch, tested on every machine): each equals the plain
one. The dense blocks' preallocated buffer (inference), channels_last G and D, and D on random
patches of each level."""

import pytest
import torch
from torch.nn import functional as F

from afigan.layers import (
    AFInterpolator,
    FeaturePatchDiscriminator,
    ResidualDenseBlock,
    discriminator_loss,
    generator_loss,
    random_window,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_dense_block_buffer_equals_the_concatenations_and_keeps_the_keys():
    torch.manual_seed(0)
    rdb = ResidualDenseBlock(channels=24, growth=8)
    x = torch.randn(2, 24, 9, 13)
    plain = rdb(x)  # grad enabled: the torch.cat path
    assert plain.requires_grad
    with torch.no_grad():
        fast = rdb(x)  # the buffer path
        # written by hand: conv_i(cat(x, c_1..c_{i-1})), then x + 0.2 conv5(cat(all))
        feats = [x]
        for i in range(1, 5):
            conv = getattr(rdb, f"conv{i}")[0]
            feats.append(F.leaky_relu(F.conv2d(torch.cat(feats, 1), conv.weight, padding=1), 0.2))
        by_hand = x + 0.2 * F.conv2d(torch.cat(feats, 1), rdb.conv5.weight, padding=1)
    assert torch.equal(fast, plain.detach())
    assert _rel(fast, by_hand) < 1e-5
    assert sorted(rdb.state_dict()) == sorted(f"conv{i}.0.weight" for i in range(1, 5)) + ["conv5.weight"]


def test_interpolator_inference_path_equals_training_path():
    torch.manual_seed(1)
    g = AFInterpolator(channels=16, num_blocks=2, growth=8)
    x = torch.randn(1, 16, 7, 10)
    with torch.no_grad():
        fast = g(x)
    assert torch.equal(fast, g(x).detach())


@pytest.mark.parametrize(
    "make",
    [
        lambda: AFInterpolator(channels=16, num_blocks=1, growth=8),
        lambda: FeaturePatchDiscriminator(channels=16, base_width=8),
    ],
    ids=["G", "D"],
)
def test_channels_last_gives_the_same_outputs_gradients_and_keys(make):
    torch.manual_seed(2)
    plain = make()
    fast = make()
    fast.load_state_dict(plain.state_dict())
    fast.to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 8, 11)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out, out_cl = plain(x), fast(x_cl)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    assert _rel(out_cl, out) < 1e-5
    out.square().mean().backward()
    out_cl.square().mean().backward()
    grads = dict(plain.named_parameters())
    for name, p in fast.named_parameters():
        ref = grads[name].grad
        # + 1e-5: a conv bias before BatchNorm has a zero gradient up to rounding (the others are O(1))
        assert (p.grad - ref).abs().max() <= 1e-4 * ref.abs().max() + 1e-5, name
    assert list(fast.state_dict()) == list(plain.state_dict())


def _pyramid(seed, sizes=((12, 16), (6, 8))):
    g = torch.Generator().manual_seed(seed)
    return {f"p{i + 2}": torch.randn(2, 16, h, w, generator=g) for i, (h, w) in enumerate(sizes)}


def test_patches_as_large_as_the_map_give_exactly_the_full_map_losses():
    torch.manual_seed(3)
    d = FeaturePatchDiscriminator(channels=16, base_width=8)
    real, fake = _pyramid(0), _pyramid(1)
    for size in (16, 100):  # >= every level's height and width
        state = torch.get_rng_state()
        full = discriminator_loss(d, real, fake)
        torch.set_rng_state(state)
        patched = discriminator_loss(d, real, fake, patch_size=size)
        assert torch.equal(torch.get_rng_state(), state)  # nothing drawn
        assert full.keys() == patched.keys() and all(torch.equal(full[k], patched[k]) for k in full)
        g_full = generator_loss(d, fake, real)
        g_patched = generator_loss(d, fake, real, patch_size=size)
        assert all(torch.equal(g_full[k], g_patched[k]) for k in g_full)


def test_patch_loss_is_the_loss_of_d_on_the_drawn_window():
    torch.manual_seed(4)
    d = FeaturePatchDiscriminator(channels=16, base_width=8, norm="")  # no BN: a window's logits equal a slice's
    real, fake = _pyramid(5), _pyramid(6)
    torch.manual_seed(11)
    windows = [random_window(fake[l], 4) for l in ("p2", "p3")]
    torch.manual_seed(11)
    losses = discriminator_loss(d, real, fake, patch_size=4)
    for level, (top, left, h, w) in zip(("p2", "p3"), windows):
        assert (h, w) == (4, 4)
        crop = lambda t: t[..., top : top + h, left : left + w]  # noqa: E731
        want_real = F.binary_cross_entropy_with_logits(d(crop(real[level])), torch.ones(2, 1, 4, 4))
        want_fake = F.binary_cross_entropy_with_logits(d(crop(fake[level])), torch.zeros(2, 1, 4, 4))
        assert torch.allclose(losses[f"loss_d_real_{level}"], want_real, rtol=1e-6)
        assert torch.allclose(losses[f"loss_d_fake_{level}"], want_fake, rtol=1e-6)
    # the content term keeps the whole map
    g = generator_loss(d, fake, real, patch_size=4)
    assert torch.allclose(g["loss_content_p2"], F.l1_loss(fake["p2"], real["p2"]))


def test_random_windows_cover_the_map_uniformly_and_stay_inside():
    t = torch.zeros(1, 1, 6, 9)
    torch.manual_seed(0)
    seen = set()
    for _ in range(400):
        top, left, h, w = random_window(t, 4)
        assert (h, w) == (4, 4) and 0 <= top <= 2 and 0 <= left <= 5
        seen.add((top, left))
    assert len(seen) == 3 * 6  # every position drawn
    assert random_window(t, 0) == (0, 0, 6, 9)
    top, left, h, w = random_window(t, 7)  # taller than the map: full height, a 7-wide window
    assert top == 0 and (h, w) == (6, 7) and 0 <= left <= 2
