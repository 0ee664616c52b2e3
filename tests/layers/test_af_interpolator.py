import pytest
import torch
from conftest import load_listing, random_state_dict
from torch.nn import functional as F

from afigan.layers import AFInterpolator


def test_parameter_count_is_reference():
    g = AFInterpolator()
    assert sum(p.numel() for p in g.parameters()) == 7_834_624
    assert all(p.requires_grad for p in g.parameters())


def test_state_dict_keys_and_shapes_equal_reference_listing():
    listing = load_listing("af_interpolator.json")["state_dict_shapes"]
    ours = {k: list(v.shape) for k, v in AFInterpolator().state_dict().items()}
    assert list(ours) == list(listing)
    assert ours == listing


def test_reference_layout_state_dict_loads_strictly():
    sd = random_state_dict(load_listing("af_interpolator.json"))
    g = AFInterpolator()
    g.load_state_dict(sd, strict=True)
    for k, v in g.state_dict().items():
        assert torch.equal(v, sd[k])


@pytest.mark.parametrize("h,w", [(4, 4), (5, 7), (1, 1), (13, 19), (8, 3)])
def test_output_is_exactly_twice_the_input(h, w):
    g = AFInterpolator(channels=16, growth=8)
    assert g(torch.randn(2, 16, h, w)).shape == (2, 16, 2 * h, 2 * w)


def test_output_size_crops_and_pads():
    g = AFInterpolator(channels=8, growth=4)
    x = torch.randn(1, 8, 5, 6)
    full = g(x)
    cropped = g(x, output_size=(9, 11))
    assert cropped.shape == (1, 8, 9, 11)
    assert torch.allclose(cropped, full[..., :9, :11])
    padded = g(x, output_size=(11, 13))
    assert padded.shape == (1, 8, 11, 13)
    assert torch.allclose(padded[..., :10, :12], full)
    # Padding repeats the last row / column.
    assert torch.allclose(padded[..., 10, :12], full[..., 9, :])
    assert torch.allclose(padded[..., :10, 12], full[..., :, 11])


def test_fresh_interpolator_is_close_to_bilinear():
    # Kaiming x 0.1 init makes the learned branch tiny: measured ~1.1e-4 relative L2 distance
    # for unit-variance input; the test bound is 1e-2.
    torch.manual_seed(0)
    g = AFInterpolator()
    x = torch.randn(2, 256, 9, 11)
    bil = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
    rel = (g(x) - bil).norm() / bil.norm()
    assert rel < 1e-2
    assert rel > 0  # the learned branch is not exactly zero


def test_gradients_reach_every_parameter():
    g = AFInterpolator(channels=16, growth=8)
    g(torch.randn(2, 16, 6, 5)).square().mean().backward()
    for name, p in g.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_configurable_sizes():
    g = AFInterpolator(channels=64, num_blocks=2, growth=16, res_scale=0.1)
    assert len(g.Generators[0][1].RDBs) == 2
    assert g.Generators[0][1].RDBs[0].conv1[0].out_channels == 16
    assert g(torch.randn(1, 64, 3, 3)).shape == (1, 64, 6, 6)


@pytest.mark.parametrize(
    "x,kwargs,match",
    [
        (torch.randn(1, 8, 4, 4), {}, r"\(N, 16, H, W\).*8 channels"),
        (torch.randn(16, 4, 4), {}, r"4-D tensor of shape \(N, 16, H, W\)"),
        (torch.randn(1, 16, 4, 4), {"output_size": (10, 8)}, r"1 <= H <= 9"),
    ],
)
def test_bad_input_raises_value_error_naming_expected_shape(x, kwargs, match):
    g = AFInterpolator(channels=16, growth=8)
    with pytest.raises(ValueError, match=match):
        g(x, **kwargs)


def test_bad_state_dict_names_first_offending_key():
    sd = random_state_dict(load_listing("af_interpolator.json"))
    sd["Generators.0.2.0.bias"] = torch.zeros(128)
    with pytest.raises(ValueError, match=r"'Generators.0.2.0.bias' has shape \[128\].*\[256\]"):
        AFInterpolator().load_state_dict(sd)
    sd = random_state_dict(load_listing("af_interpolator.json"))
    del sd["Generators.0.3.0.weight"]
    with pytest.raises(ValueError, match=r"'Generators.0.3.0.weight' is missing"):
        AFInterpolator().load_state_dict(sd)
    sd = random_state_dict(load_listing("af_interpolator.json"))
    sd["Generators.0.9.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected key 'Generators.0.9.weight'"):
        AFInterpolator().load_state_dict(sd)
