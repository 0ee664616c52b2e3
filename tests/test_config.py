import warnings

import pytest

pytest.importorskip("detectron2")

from d2_helpers import make_cfg  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import BACKBONE_REGISTRY  # noqa: E402

import afigan  # noqa: E402
from afigan.config import afi_freeze  # noqa: E402


def test_reference_keys_and_defaults():
    cfg = afigan.add_afigan_config(get_cfg())
    m = cfg.MODEL
    assert (m.GUIDE_ARCHITECTURE, m.GUIDE_WEIGHTS, m.AFI_GEN_WEIGHTS, m.AFI_DIS_WEIGHTS, m.AF_EXTRACTOR_WEIGHTS) == (
        "",
    ) * 5
    assert m.AFI_FREEZE is False
    assert m.GUIDE_BACKBONE.NAME == "build_resnet_fpn_backbone" and m.GUIDE_BACKBONE.FREEZE_AT == 2
    assert (m.RESNETS.RADIX, m.RESNETS.BOTTLENECK_WIDTH, m.RESNETS.DEEP_STEM, m.RESNETS.AVD, m.RESNETS.AVG_DOWN) == (
        1,
        64,
        False,
        False,
        False,
    )
    assert (m.BIFPN.IN_FEATURES, m.BIFPN.OUT_CHANNELS, m.BIFPN.FPN_REPEAT, m.BIFPN.NORM, m.BIFPN.FUSE_TYPE) == (
        [],
        256,
        3,
        "SyncBN",
        "sum",
    )
    assert m.SWINT.EMBED_DIM == 96 and m.SWINT.DEPTHS == [2, 2, 6, 2] and m.SWINT.WINDOW_SIZE == 7
    assert m.AFI.INTERP == "afi" and m.AFI.ADV_WEIGHT == 1e-3 and m.AFI.CONTENT_WEIGHT == 1.0
    assert m.AFI.LEVELS == ["p2", "p3", "p4", "p5", "p6"] and m.AFI.SCALE_RATIO == 0.5 and m.AFI.ADV_GRAD_TO_G is True


def test_does_not_touch_detectron2_global_defaults_and_is_idempotent():
    cfg = afigan.add_afigan_config(get_cfg())
    assert "AFI" not in get_cfg().MODEL
    cfg.MODEL.AFI.INTERP = "nearest"
    cfg.MODEL.GUIDE_WEIGHTS = "x.pkl"
    afigan.add_afigan_config(cfg)  # second call keeps merged values
    assert cfg.MODEL.AFI.INTERP == "nearest" and cfg.MODEL.GUIDE_WEIGHTS == "x.pkl"
    cfg.freeze()
    afigan.add_afigan_config(cfg)
    assert cfg.is_frozen()


def test_srf_freeze_is_a_deprecated_alias(tmp_path):
    f = tmp_path / "ref.yaml"
    f.write_text("MODEL:\n  SRF_FREEZE: True\n")
    cfg = afigan.add_afigan_config(get_cfg())
    assert afi_freeze(cfg) is False
    cfg.merge_from_file(str(f))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert afi_freeze(cfg) is True
    assert any("SRF_FREEZE is deprecated" in str(x.message) for x in w)


P2_P6 = {f"p{l}": 2**l for l in range(2, 7)}
P3_P7 = {f"p{l}": 2**l for l in range(3, 8)}
# Every bottom-up x neck builder of afigan.modeling.necks.builders: a toy config that uses it, and
# the pyramid it must return (names and strides).
BUILDERS = {
    "build_resnet_fpn_sr_backbone": ("toy/fpn_toy.yaml", P2_P6),
    "build_resnet_pafpn_sr_backbone": ("toy/pafpn_toy.yaml", P2_P6),
    "build_resnet_bifpn_sr_backbone": ("toy/bifpn_toy.yaml", P3_P7),
    "build_resnest_fpn_sr_backbone": ("toy/detectors/cascade_mask_rcnn_S_101_PAFPN_toy_afi.yaml", P2_P6),
    "build_resnest_pafpn_sr_backbone": ("toy/detectors/cascade_mask_rcnn_S_101_PAFPN_toy_afi.yaml", P2_P6),
    "build_swint_bifpn_sr_backbone": ("toy/detectors/cascade_rcnn_Swin_T_BiFPN_toy_afi.yaml", P3_P7),
    "build_fcos_resnet_fpn_sr_backbone": ("toy/detectors/fcos_R_50_FPN_toy_afi.yaml", P3_P7),
    "build_retinanet_resnet_fpn_sr_backbone": ("toy/detectors/retinanet_R_50_FPN_toy_afi.yaml", P3_P7),
}


def test_every_neck_builder_is_registered_and_builds_its_pyramid():
    import torch
    from detectron2.modeling import build_backbone

    from afigan.modeling.necks import builders

    assert sorted(builders.__all__) == sorted(BUILDERS)
    registered = {name for name, _ in BACKBONE_REGISTRY if name.endswith("_sr_backbone") and "_fe_" not in name}
    assert registered == set(BUILDERS)  # no builder of a neck lives anywhere else
    for name, (config, strides) in BUILDERS.items():
        assert BACKBONE_REGISTRY.get(name) is getattr(builders, name)
        with torch.no_grad():
            backbone = build_backbone(make_cfg(config, "MODEL.BACKBONE.NAME", name))
        shapes = backbone.output_shape()
        assert {k: v.stride for k, v in shapes.items()} == strides, name
        assert sum(p.numel() for p in backbone.srf_module.parameters()) > 0, name  # the AF interpolator is in it
        with torch.no_grad():
            out = backbone.eval()(torch.zeros(1, 3, 128, 128))
        assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == {
            k: (128 // s, 128 // s) for k, s in strides.items()
        }, name


def test_unknown_key_is_rejected_with_its_name(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("MODEL:\n  AFI:\n    INTREP: nearest\n")
    cfg = afigan.add_afigan_config(get_cfg())
    with pytest.raises(KeyError, match="MODEL.AFI.INTREP"):
        cfg.merge_from_file(str(f))


def test_syncbn_falls_back_to_bn_in_a_single_process():
    from afigan.config import fallback_syncbn

    cfg = afigan.add_afigan_config(get_cfg())
    cfg.MODEL.RESNETS.NORM = "SyncBN"
    cfg.MODEL.FPN.NORM = "SyncBN"
    cfg.MODEL.ROI_BOX_HEAD.NORM = "SyncBN"
    fallback_syncbn(cfg)
    assert (cfg.MODEL.RESNETS.NORM, cfg.MODEL.FPN.NORM, cfg.MODEL.ROI_BOX_HEAD.NORM, cfg.MODEL.BIFPN.NORM) == (
        "BN",
    ) * 4
    assert cfg.MODEL.AFI.DIS.NORM == "BN"
