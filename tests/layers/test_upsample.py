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


# ---------------------------------------------------------------- registry: config nodes, kind stamp


def test_every_module_built_carries_its_kind_and_each_kind_names_its_config_node():
    from afigan.layers import upsampler_config_node, upsampler_kind_of

    assert {k: upsampler_kind_of(build_upsampler(k, 16)) for k in upsampler_kinds()} == {
        k: k for k in upsampler_kinds()
    }
    assert upsampler_kind_of(torch.nn.Conv2d(1, 1, 1)) is None  # a module the registry did not build
    nodes = {k: upsampler_config_node(k) for k in ("afi", "dysample", "carafe", "fade", "deconv", "nearest")}
    assert nodes == {
        "afi": "",  # the reference's flat keys MODEL.AFI.NUM_BLOCKS, ...
        "dysample": "DYSAMPLE",
        "carafe": "CARAFE",
        "fade": "FADE",
        "deconv": "DECONV",
        "nearest": "NEAREST",
    }


def test_register_and_unregister_a_kind_with_its_own_node():
    from afigan.layers import register_upsampler, unregister_upsampler, upsampler_config_node, upsampler_kwargs

    @register_upsampler("toy_scaled", config_node="SCALED")
    def _toy(channels: int, *, gain: float = 2.0):
        return build_upsampler("nearest", channels)

    try:
        assert upsampler_config_node("toy_scaled") == "SCALED" and upsampler_kwargs("toy_scaled") == {"gain": 2.0}
        assert build_upsampler("toy_scaled", 4).upsampler_kind == "toy_scaled"  # the stamp is the kind built
        with pytest.raises(KeyError, match="'toy_scaled' is already registered"):
            register_upsampler("toy_scaled")(_toy)
    finally:
        unregister_upsampler("toy_scaled")
    assert "toy_scaled" not in upsampler_kinds()
    with pytest.raises(ValueError, match=r"Unknown upsampler kind 'toy_scaled'"):
        unregister_upsampler("toy_scaled")


# ---------------------------------------------------------------- interpolator state (pure torch)


def test_upsampler_tag_of_a_model_says_kind_and_layout():
    from afigan.layers import FeaturePatchDiscriminator
    from afigan.layers.interpolator_state import find_interpolators, upsampler_tag

    g = build_upsampler("dysample", 16)
    per_level = torch.nn.ModuleDict({"p2": build_upsampler("carafe", 16), "p3": build_upsampler("carafe", 16)})
    neck = torch.nn.Module()
    neck.srf_modules = per_level
    assert upsampler_tag(g) == {"kind": "dysample", "shared": True}
    assert upsampler_tag(per_level) == {"kind": "carafe", "shared": False}
    assert upsampler_tag(neck) == {"kind": "carafe", "shared": False}
    # D lives in afigan.layers too, but it is no upsampler: its checkpoints carry no tag.
    assert upsampler_tag(FeaturePatchDiscriminator(16)) is None and find_interpolators(torch.nn.Linear(1, 1)) == []


def test_extract_takes_the_kind_from_the_tag_and_never_from_key_names():
    from afigan.layers.interpolator_state import extract_interpolator_state

    g = build_upsampler("afi", 8, num_blocks=1, growth=4).state_dict()
    # Untagged reference G (Generators.*): shared, kind unknown, with or without DDP's prefix.
    assert extract_interpolator_state({"model": g}) == (g, True, None)
    assert extract_interpolator_state({"model": {f"module.{k}": v for k, v in g.items()}}).state.keys() == g.keys()
    # A tagged detector checkpoint is a detector (its srf keys), not a stand-alone upsampler.
    det = {"model": {f"backbone.srf_module.{k}": v for k, v in g.items()}, "upsampler": {"kind": "x", "shared": True}}
    det["model"]["backbone.fpn_lateral2.weight"] = torch.zeros(1)
    assert extract_interpolator_state(det) == (g, True, "x")
    per = {f"p2.{k}": v for k, v in g.items()}
    assert extract_interpolator_state({"model": per, "upsampler": {"kind": "afi", "shared": False}}) == (
        per,
        False,
        "afi",
    )
    assert extract_interpolator_state({"model": {"backbone.fpn_lateral2.weight": torch.zeros(1)}}) == ({}, None, None)
