import pytest
import torch
from conftest import load_listing, random_state_dict

from afigan.layers import FeaturePatchDiscriminator


def test_parameter_count_is_reference():
    d = FeaturePatchDiscriminator()
    assert sum(p.numel() for p in d.parameters()) == 15_352_321
    listing = load_listing("feature_patch_discriminator.json")
    buffers = sum(b.numel() for k, b in d.state_dict().items() if not k.endswith("num_batches_tracked"))
    assert buffers == listing["elements_excluding_num_batches_tracked"]


def test_keys_and_shapes_equal_reference_listing():
    listing = load_listing("feature_patch_discriminator.json")["state_dict_shapes"]
    ours = {k: list(v.shape) for k, v in FeaturePatchDiscriminator().state_dict().items()}
    assert ours == listing
    d = FeaturePatchDiscriminator()
    d.load_state_dict(random_state_dict(load_listing("feature_patch_discriminator.json")), strict=True)


@pytest.mark.parametrize("h,w", [(7, 10), (1, 1), (25, 38)])
def test_one_logit_per_location(h, w):
    d = FeaturePatchDiscriminator(channels=32)
    assert d(torch.randn(2, 32, h, w)).shape == (2, 1, h, w)


def test_init_is_msra_fan_out_with_zero_bias():
    d = FeaturePatchDiscriminator()
    last = d.Discriminators[0][3][0]
    assert torch.count_nonzero(last.bias) == 0
    # fan-out of the last conv is 1 * 3 * 3, so std = sqrt(2 / 9) ~ 0.47.
    assert abs(last.weight.std().item() - (2 / 9) ** 0.5) < 0.03


def test_no_norm_and_wrong_channels():
    d = FeaturePatchDiscriminator(channels=16, norm="")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules())
    with pytest.raises(ValueError, match=r"\(N, 16, H, W\)"):
        d(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="norm must be"):
        FeaturePatchDiscriminator(norm="GN")


def test_base_width_makes_a_smaller_discriminator():
    d = FeaturePatchDiscriminator(channels=32, base_width=16)
    assert [b[0].out_channels for b in d.Discriminators[0]] == [32, 64, 64, 1]
    assert d(torch.randn(1, 32, 5, 6)).shape == (1, 1, 5, 6)
