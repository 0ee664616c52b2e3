import warnings

import pytest

pytest.importorskip("detectron2")

import afigan  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import BACKBONE_REGISTRY  # noqa: E402

from afigan.config import afi_freeze  # noqa: E402


def test_reference_keys_and_defaults():
    cfg = afigan.add_afigan_config(get_cfg())
    m = cfg.MODEL
    assert (m.GUIDE_ARCHITECTURE, m.GUIDE_WEIGHTS, m.AFI_GEN_WEIGHTS, m.AFI_DIS_WEIGHTS, m.AF_EXTRACTOR_WEIGHTS) == ("",) * 5
    assert m.AFI_FREEZE is False
    assert m.GUIDE_BACKBONE.NAME == "build_resnet_fpn_backbone" and m.GUIDE_BACKBONE.FREEZE_AT == 2
    assert (m.RESNETS.RADIX, m.RESNETS.BOTTLENECK_WIDTH, m.RESNETS.DEEP_STEM, m.RESNETS.AVD, m.RESNETS.AVG_DOWN) == (1, 64, False, False, False)
    assert (m.BIFPN.IN_FEATURES, m.BIFPN.OUT_CHANNELS, m.BIFPN.FPN_REPEAT, m.BIFPN.NORM, m.BIFPN.FUSE_TYPE) == ([], 256, 3, "SyncBN", "sum")
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


def test_reference_builders_are_registered_on_import():
    for name in ("build_resnet_fpn_sr_backbone", "build_resnet_pafpn_sr_backbone"):
        assert name in BACKBONE_REGISTRY, name


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
    assert (cfg.MODEL.RESNETS.NORM, cfg.MODEL.FPN.NORM, cfg.MODEL.ROI_BOX_HEAD.NORM, cfg.MODEL.BIFPN.NORM) == ("BN",) * 4
    assert cfg.MODEL.AFI.DIS.NORM == "BN"
