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


def test_syncbn_fallback_leaves_other_norms_and_names_what_it_changed(caplog):
    from afigan.config import fallback_syncbn

    cfg = afigan.add_afigan_config(get_cfg())
    cfg.MODEL.FPN.NORM, cfg.MODEL.AFI.DIS.NORM, cfg.MODEL.ROI_BOX_HEAD.NORM = "GN", "naiveSyncBN", "SyncBN"
    cfg.freeze()
    with caplog.at_level("INFO", logger="afigan.config"):
        fallback_syncbn(cfg)
    assert (cfg.MODEL.FPN.NORM, cfg.MODEL.AFI.DIS.NORM, cfg.MODEL.ROI_BOX_HEAD.NORM) == ("GN", "BN", "BN")
    assert cfg.is_frozen()
    assert [r.getMessage() for r in caplog.records] == [
        "Not running distributed on GPUs: SyncBN -> BN for MODEL.ROI_BOX_HEAD.NORM, MODEL.BIFPN.NORM, "
        "MODEL.AFI.DIS.NORM."
    ]


# ---- the one config loader ----


def _yaml(tmp_path, text: str, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text("VERSION: 2\n" + text)
    return str(path)


def test_load_config_merges_the_file_then_the_overrides_and_is_not_frozen(tmp_path):
    from afigan.config import config_changes, load_config

    f = _yaml(tmp_path, "MODEL:\n  AFI:\n    INTERP: nearest\nSOLVER:\n  MAX_ITER: 7\n")
    cfg = load_config(f, ["SOLVER.MAX_ITER", "9", "MODEL.AFI.LEVELS", "['p3']"])
    assert not cfg.is_frozen()
    assert config_changes(cfg) == [
        ("MODEL.AFI.INTERP", "nearest"),
        ("MODEL.AFI.LEVELS", ["p3"]),
        ("SOLVER.MAX_ITER", 9),
    ]
    assert config_changes(load_config()) == []


def test_load_config_names_an_unknown_key_and_the_closest_valid_one(tmp_path):
    from afigan.config import load_config

    f = _yaml(tmp_path, "MODEL:\n  AFI:\n    INTREP: nearest\n")
    with pytest.raises(KeyError) as e:
        load_config(f)
    assert e.value.args == (f"{f}: unknown config key MODEL.AFI.INTREP; did you mean MODEL.AFI.INTERP?",)
    with pytest.raises(KeyError) as e:
        load_config(None, ["SOLVER.BASE_LRR", "0.1"])
    assert e.value.args == ("the command line: unknown config key SOLVER.BASE_LRR; did you mean SOLVER.BASE_LR?",)
    with pytest.raises(KeyError) as e:
        load_config(None, ["QQQ.ZZZ", "1"])
    assert e.value.args == (
        "the command line: unknown config key QQQ.ZZZ; see afigan/config.py and Detectron2's defaults for the "
        "valid keys.",
    )


def test_load_config_names_a_value_of_the_wrong_type(tmp_path):
    from afigan.config import load_config

    with pytest.raises(ValueError) as e:
        load_config(None, ["SOLVER.MAX_ITER", "many"])
    assert str(e.value) == (
        "the command line: SOLVER.MAX_ITER takes a value of type int (it was 40000), not the str many; give a "
        "value of that type."
    )
    f = _yaml(tmp_path, "MODEL:\n  AFI:\n    SHARED: [1, 2]\n")
    with pytest.raises(ValueError, match=rf"^{f}: MODEL.AFI.SHARED takes a value of type bool \(it was True\), not "):
        load_config(f)
    with pytest.raises(ValueError) as e:
        load_config(None, ["SOLVER.MAX_ITER"])
    assert (
        str(e.value) == "the command line: the trailing overrides must be KEY VALUE pairs, got an odd number of words."
    )


def test_load_config_names_a_missing_file_and_a_broken_one(tmp_path):
    from afigan.config import load_config

    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(FileNotFoundError) as e:
        load_config(missing, option="--interpolation")
    assert str(e.value) == (
        f"--interpolation {missing!r} does not exist; give the path of a YAML config, e.g. "
        "configs/toy/pipeline/stage3.yaml."
    )
    child = _yaml(tmp_path, "_BASE_: base.yaml\n", "child.yaml")
    with pytest.raises(FileNotFoundError, match=rf"^{child}: its _BASE_ file '.*base.yaml' does not exist; fix"):
        load_config(child)
    broken = _yaml(tmp_path, "MODEL:\n  AFI: [\n", "broken.yaml")
    with pytest.raises(ValueError, match=rf"^YAML syntax error in {broken}, line 4, column 1: "):
        load_config(broken)


def test_device_fallback_moves_only_a_cuda_config_and_only_without_cuda(tmp_path, monkeypatch, caplog):
    import torch
    from omegaconf import OmegaConf

    from afigan.config import cuda_missing, device_fallback, load_config

    f = _yaml(tmp_path, "MODEL:\n  DEVICE: cuda:1\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (cuda_missing("cuda:1"), cuda_missing(torch.device("cuda")), cuda_missing("cpu")) == (True, True, False)
    assert load_config(f).MODEL.DEVICE == "cuda:1"  # no fallback asked for: check_launch stops such a run
    with caplog.at_level("WARNING", logger="afigan.config"):
        assert load_config(f, fallback="training").MODEL.DEVICE == "cpu"
    assert [r.getMessage() for r in caplog.records] == ["CUDA is not available: training on CPU (MODEL.DEVICE cpu)."]
    assert load_config(f, device="cpu").MODEL.DEVICE == "cpu"  # the analysis tools' CPU default
    assert load_config(f, ["MODEL.DEVICE", "cuda:0"], device="cpu").MODEL.DEVICE == "cuda:0"  # opts come last
    lazy = OmegaConf.create({"train": {"device": "cuda"}})  # a LazyConfig keeps its device elsewhere
    assert device_fallback(lazy, key="train.device").train.device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert load_config(f, fallback="training").MODEL.DEVICE == "cuda:1" and not cuda_missing("cuda")


def test_cfg_get_reads_dotted_keys_of_configs_and_dicts():
    from afigan.config import cfg_get, load_config

    cfg = load_config(None, ["MODEL.AFI.INTERP", "carafe"])
    assert cfg_get(cfg, "MODEL.AFI.INTERP") == "carafe"
    assert cfg_get(cfg, "MODEL.AFI.DIS") is cfg.MODEL.AFI.DIS
    assert cfg_get(cfg, "MODEL.AFI.NOPE", 3) == 3
    assert cfg_get(cfg, "MODEL.AFI.INTERP.DEEPER", None) is None  # a leaf has no children
    with pytest.raises(KeyError) as e:
        cfg_get(cfg, "MODEL.AFI.NOPE")
    assert e.value.args == ("unknown config key MODEL.AFI.NOPE",)
    assert cfg_get({"A": {"B": [1, 2]}}, "A.B") == [1, 2]


def test_flatten_and_changed_keys_walk_configs_and_dicts():
    from afigan.config import changed_keys, flatten, load_config

    assert flatten({"A": {"B": 1, "C": {"D": [2]}}, "E": "x"}) == {"A.B": 1, "A.C.D": [2], "E": "x"}
    old = load_config()
    new = load_config(None, ["SOLVER.MAX_ITER", "9", "MODEL.AFI.INTERP", "nearest", "SEED", "5"])
    assert changed_keys(old, new) == [
        ("MODEL.AFI.INTERP", "afi", "nearest"),
        ("SOLVER.MAX_ITER", 40000, 9),
        ("SEED", -1, 5),
    ]  # in the config's key order, not the order of the overrides
    assert changed_keys(new, new.clone()) == []
    # Flat and nested dicts, in the new one's key order; a key on one side only is None on the other.
    assert changed_keys({"A.B": 1, "A.C": 2, "X": 0}, {"A": {"C": 3, "B": 1, "D": 4}}) == [
        ("A.C", 2, 3),
        ("A.D", None, 4),
        ("X", 0, None),
    ]
