import pytest
import torch
from torch.nn import functional as F

from afigan.layers import AFInterpolator, build_upsampler, is_guided, upsampler_kinds


def test_kinds_and_what_they_build():
    assert {"nearest", "bilinear", "afi"} <= set(upsampler_kinds())
    counts = {
        kind: sum(p.numel() for p in build_upsampler(kind, 256).parameters()) for kind in ("nearest", "bilinear", "afi")
    }
    assert counts == {"nearest": 0, "bilinear": 0, "afi": 7_834_624}  # afi: the reference interpolator


def test_bilinear_matches_torch_bilinear_upsampling():
    x = torch.randn(2, 4, 3, 5)
    up = build_upsampler("bilinear", 4)
    expected = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
    assert torch.allclose(up(x), expected, atol=1e-6)


@pytest.mark.parametrize("kind", ["nearest", "bilinear", "afi"])
def test_same_call_signature(kind):
    up = build_upsampler(kind, 8, growth=4)
    x = torch.randn(1, 8, 5, 3)
    assert up(x).shape == (1, 8, 10, 6)
    assert up(x, output_size=(9, 7)).shape == (1, 8, 9, 7)
    assert up(x, (10, 6)).shape == (1, 8, 10, 6)


def test_nearest_matches_detectron2_fpn_upsampling():
    x = torch.randn(2, 4, 3, 5)
    up = build_upsampler("nearest", 4)
    assert torch.equal(up(x), F.interpolate(x, scale_factor=2.0, mode="nearest"))
    assert sum(p.numel() for p in up.parameters()) == 0


def test_afi_factory_passes_hyper_parameters():
    up = build_upsampler("afi", 32, num_blocks=1, growth=8)
    assert isinstance(up, AFInterpolator)
    assert len(up.Generators[0][1].RDBs) == 1


def test_unknown_kind_is_a_clear_error():
    expected = (
        r"Unknown upsampler kind 'bicubic'; expected one of "
        r"\['afi', 'bilinear', 'carafe', 'deconv', 'dysample', 'fade', "
    )
    with pytest.raises(ValueError, match=expected + r"'nearest', 'pixelshuffle'\]\.$"):
        build_upsampler("bicubic", 8)


@pytest.mark.parametrize("kind", ["nearest", "bilinear", "afi"])
def test_guide_is_accepted_and_ignored(kind):
    up = build_upsampler(kind, 8, growth=4)
    x = torch.randn(1, 8, 5, 3)
    assert not is_guided(kind) and not is_guided(up)
    assert torch.equal(up(x, (9, 7), guide=torch.randn(1, 8, 9, 7)), up(x, (9, 7)))
