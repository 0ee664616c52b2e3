"""Feature Enhancement inside Detectron2: loss dict of every head, exact baseline at lambda = 0,
gradients only on the named stages, frozen stages, key-compatible checkpoints, every neck."""

import glob
import logging
import os

import pytest
import torch

pytest.importorskip("detectron2")

from d2_helpers import CONFIGS, make_cfg, toy_batch  # noqa: E402
from detectron2.layers import Conv2d  # noqa: E402
from detectron2.modeling import build_backbone, build_model  # noqa: E402
from detectron2.solver import build_optimizer  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from afigan.modeling import enable_feature_enhancement  # noqa: E402
from afigan.modeling.feature_enhancement import fe_losses, fe_regularizer, has_feature_enhancement  # noqa: E402

SIZES = ((64, 64), (64, 96))
CHEAP = ("MODEL.MASK_ON", False, "MODEL.AFI.INTERP", "nearest")  # where neither masks nor the AF interpolator matter
FE_ON = lambda meta: ["MODEL.META_ARCHITECTURE", "FeatureEnhanced", "MODEL.FE.META_ARCHITECTURE", meta]  # noqa: E731
RETINA = [
    "MODEL.META_ARCHITECTURE",
    "RetinaNet",
    "MODEL.BACKBONE.NAME",
    "build_retinanet_resnet_fpn_backbone",
    "MODEL.RESNETS.OUT_FEATURES",
    ["res3", "res4", "res5"],
    "MODEL.FPN.IN_FEATURES",
    ["res3", "res4", "res5"],
    "MODEL.RETINANET.NUM_CLASSES",
    3,
]

# Detectron2's own heads on the toy settings (R-18, FPN width 64); afigan's FCOS / CenterMask toy
# configs are picked up from configs/toy/detectors/ below.
D2_HEADS = {
    "mask_rcnn": ("toy/Base-toy.yaml", []),
    "faster_rcnn": ("toy/Base-toy.yaml", ["MODEL.MASK_ON", False]),
    "cascade_rcnn": (
        "toy/Base-toy.yaml",
        [
            "MODEL.MASK_ON",
            False,
            "MODEL.ROI_HEADS.NAME",
            "CascadeROIHeads",
            "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG",
            True,
        ],
    ),
    "retinanet": ("toy/Base-toy.yaml", RETINA),
}


def _afigan_head_configs():
    """One toy config (configs/toy/detectors/) per head type that afigan itself registers (FCOS,
    CenterMask, ...), the cheapest of each: nearest upsampling and no BiFPN where available.
    Detectron2's own heads are covered by D2_HEADS."""
    from detectron2.modeling import META_ARCH_REGISTRY, PROPOSAL_GENERATOR_REGISTRY, ROI_HEADS_REGISTRY

    picked = {}
    for path in sorted(glob.glob(os.path.join(CONFIGS, "toy", "detectors", "*.yaml"))):
        rel = os.path.relpath(path, CONFIGS)
        try:
            m = make_cfg(rel).MODEL
        except Exception:  # a config that does not load fails in the test itself, with its error
            picked[rel] = (rel, ())
            continue
        parts = [
            (META_ARCH_REGISTRY, m.META_ARCHITECTURE),
            (PROPOSAL_GENERATOR_REGISTRY, m.PROPOSAL_GENERATOR.NAME),
            (ROI_HEADS_REGISTRY, m.ROI_HEADS.NAME),
        ]
        # A name that is not registered (a broken registration) picks the config too: it then fails
        # in the test, instead of silently dropping its head from the list.
        if not any(name not in reg or reg.get(name).__module__.startswith("afigan.") for reg, name in parts):
            continue
        signature = tuple(name for _, name in parts) + (m.MASK_ON,)
        cost = (m.AFI.INTERP != "nearest", "bifpn" in m.BACKBONE.NAME.lower(), rel)
        if signature not in picked or cost < picked[signature][1]:
            picked[signature] = (rel, cost)
    return {rel: (rel, []) for rel, _ in sorted(picked.values())}


AFIGAN_HEADS = _afigan_head_configs()


def test_every_afigan_head_is_covered():
    # FCOS (proposal generator + OneStageDetector) and CenterMask (CenterROIHeads): one toy config each.
    assert sorted(AFIGAN_HEADS) == [
        "toy/detectors/centermask_R_50_BiFPN_toy_nn.yaml",
        "toy/detectors/fcos_R_50_FPN_toy_nn.yaml",
    ]


def _stage_convs(model, stage):
    return [m.weight for m in getattr(model.backbone.bottom_up, stage).modules() if isinstance(m, Conv2d)]


def _expected_terms(model, lam_e, lam_s):
    # Written independently of afigan.layers: Detectron2 Conv2d weights, torch reductions.
    smooth = lam_s * sum(w.detach().norm() for w in _stage_convs(model, "res5"))
    sharp = -lam_e * sum(w.detach().var() for w in _stage_convs(model, "res3"))
    return sharp, smooth


def _fe_cfg(config_file, overrides, *extra):
    """The config as written, then FE switched on by overrides only."""
    meta = make_cfg(config_file, *overrides).MODEL.META_ARCHITECTURE
    return make_cfg(config_file, *overrides, *FE_ON(meta), *extra)


@pytest.mark.parametrize("head", sorted(D2_HEADS) + sorted(AFIGAN_HEADS))
def test_terms_in_the_loss_dict_of_every_head(head):
    config_file, overrides = {**D2_HEADS, **AFIGAN_HEADS}[head]
    cfg = _fe_cfg(config_file, overrides, "MODEL.FE.SHARP_WEIGHT", 0.5, "MODEL.FE.SMOOTH_WEIGHT", 0.25)
    model = build_model(cfg).train()
    assert type(model).__name__ == "FE" + cfg.MODEL.FE.META_ARCHITECTURE
    with EventStorage() as storage:
        losses = model(toy_batch(SIZES))
    assert {"loss_fe_sharp", "loss_fe_smooth"} <= set(losses)
    sharp, smooth = _expected_terms(model, 0.5, 0.25)
    torch.testing.assert_close(losses["loss_fe_sharp"], sharp)
    torch.testing.assert_close(losses["loss_fe_smooth"], smooth)
    assert storage.latest()["fe/smooth_norm"][0] == pytest.approx(smooth.item() / 0.25, rel=1e-5)
    sum(losses.values()).backward()
    assert all(
        w.grad is not None and w.grad.abs().sum() > 0 for w in _stage_convs(model, "res3") + _stage_convs(model, "res5")
    )


def _train_step(model, cfg, batch, seed=1):
    torch.manual_seed(seed)  # RPN / ROI sampling draws random numbers
    opt = build_optimizer(cfg, model)
    with EventStorage():
        losses = model(batch)
    opt.zero_grad()
    sum(losses.values()).backward()
    opt.step()
    return {k: v.detach() for k, v in losses.items()}, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "switch,model",
    [
        (("MODEL.FE.SHARP_WEIGHT", 0.0, "MODEL.FE.SMOOTH_WEIGHT", 0.0), ()),  # Mask R-CNN, AF interpolator
        (("MODEL.FE.ENABLED", False), CHEAP),
    ],
)
def test_lambda_zero_training_step_is_bit_identical_to_the_plain_one(switch, model):
    plain_cfg = make_cfg("toy/Base-toy.yaml", *model)
    plain = build_model(plain_cfg).train()
    fe = build_model(
        make_cfg(
            "toy/Base-toy.yaml",
            *model,
            *FE_ON("GeneralizedRCNN"),
            "MODEL.BACKBONE.NAME",
            "build_fe_resnet_fpn_sr_backbone",
            *switch,
        )
    ).train()
    fe.load_state_dict(plain.state_dict())
    batch = toy_batch(SIZES)
    loss_a, state_a = _train_step(plain, plain_cfg, batch)
    loss_b, state_b = _train_step(fe, plain_cfg, batch)
    assert list(loss_a) == list(loss_b)
    assert all(torch.equal(loss_a[k], loss_b[k]) for k in loss_a)
    assert list(state_a) == list(state_b)
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_positive_lambda_step_moves_only_the_named_stages_by_the_analytic_gradient():
    lam_e, lam_s, lr = 1000.0, 0.5, 0.1  # large, so the terms' share of the step is far above rounding
    plain_cfg = make_cfg(
        "toy/Base-toy.yaml", *CHEAP, "SOLVER.BASE_LR", lr, "SOLVER.MOMENTUM", 0.0, "SOLVER.WEIGHT_DECAY", 0.0
    )
    plain = build_model(plain_cfg).train()
    fe = build_model(
        make_cfg(
            "toy/Base-toy.yaml",
            *CHEAP,
            *FE_ON("GeneralizedRCNN"),
            "MODEL.FE.SHARP_WEIGHT",
            lam_e,
            "MODEL.FE.SMOOTH_WEIGHT",
            lam_s,
        )
    ).train()
    fe.load_state_dict(plain.state_dict())
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    batch = toy_batch(SIZES)
    _, state_a = _train_step(plain, plain_cfg, batch)
    loss_b, state_b = _train_step(fe, plain_cfg, batch)
    assert loss_b["loss_fe_sharp"] < 0 < loss_b["loss_fe_smooth"]
    named = {}
    for stage in ("res3", "res5"):
        for name, m in getattr(fe.backbone.bottom_up, stage).named_modules():
            if isinstance(m, Conv2d):
                named[f"backbone.bottom_up.{stage}.{name}.weight"] = stage
    assert len(named) == 10  # 2 blocks x 2 convs + shortcut, in each stage
    for key in state_a:
        if key not in named:
            assert torch.equal(state_a[key], state_b[key]), f"{key} was changed by the FE terms"
            continue
        w = before[key]
        if named[key] == "res5":
            grad = lam_s * w / w.norm()
        else:
            grad = -2 * lam_e * (w - w.mean()) / (w.numel() - 1)
        torch.testing.assert_close(state_b[key] - state_a[key], -lr * grad, rtol=2e-3, atol=2e-8)
        assert not torch.equal(state_a[key], state_b[key])


def test_frozen_target_stage_contributes_nothing(caplog):
    # The trainers' setup_logger(name="afigan") stops propagation to the root logger that caplog
    # listens on, so listen on the afigan logger itself.
    logging.getLogger("afigan").addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="afigan"):
            model = build_model(_fe_cfg("toy/Base-toy.yaml", CHEAP, "MODEL.BACKBONE.FREEZE_AT", 3)).train()
    finally:
        logging.getLogger("afigan").removeHandler(caplog.handler)
    assert "res3" in caplog.text and "frozen" in caplog.text
    with EventStorage():
        losses = model(toy_batch(SIZES))
    assert losses["loss_fe_sharp"].item() == 0.0 and not losses["loss_fe_sharp"].requires_grad
    assert losses["loss_fe_smooth"].requires_grad
    sum(losses.values()).backward()
    assert all(w.grad is None for w in _stage_convs(model, "res3"))


def test_checkpoints_stay_key_compatible_and_inference_is_unchanged():
    plain = build_model(make_cfg("toy/Base-toy.yaml", *CHEAP)).eval()
    fe = build_model(
        _fe_cfg(
            "toy/Base-toy.yaml",
            CHEAP,
            "MODEL.BACKBONE.NAME",
            "build_fe_resnet_fpn_sr_backbone",
            "MODEL.FE.SHARP_WEIGHT",
            1.0,
        )
    ).eval()
    assert type(fe).__name__ == "FEGeneralizedRCNN" and has_feature_enhancement(fe.backbone)
    a, b = plain.state_dict(), fe.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in fe.parameters())
    fe.load_state_dict(a, strict=True)
    assert fe_losses(fe.backbone)[0]  # the terms exist, but eval never adds them
    inputs = [{"image": b["image"]} for b in toy_batch(SIZES)]
    with torch.no_grad():
        out_a, out_b = plain(inputs), fe(inputs)
    for x, y in zip(out_a, out_b):
        assert torch.equal(x["instances"].pred_boxes.tensor, y["instances"].pred_boxes.tensor)
        assert torch.equal(x["instances"].scores, y["instances"].scores)


def test_enhanced_backbone_in_a_plain_model_refuses_to_train_silently():
    cfg = make_cfg("toy/Base-toy.yaml", *CHEAP, "MODEL.BACKBONE.NAME", "build_fe_resnet_fpn_sr_backbone")
    model = build_model(cfg).train()
    assert type(model).__name__ == "GeneralizedRCNN" and has_feature_enhancement(model.backbone)
    with pytest.raises(RuntimeError, match="does not add its loss terms"), EventStorage():
        model(toy_batch(SIZES))
    enable_feature_enhancement(model)  # the Python switch keeps the backbone's own regulariser
    assert fe_regularizer(model.backbone).sharp_weight == cfg.MODEL.FE.SHARP_WEIGHT
    with EventStorage():
        assert "loss_fe_sharp" in model(toy_batch(SIZES))


NECKS = {
    "build_fe_resnet_fpn_backbone": ("build_resnet_fpn_backbone", "toy/Base-toy.yaml", []),
    "build_fe_retinanet_resnet_fpn_backbone": ("build_retinanet_resnet_fpn_backbone", "toy/Base-toy.yaml", RETINA[2:]),
    "build_fe_resnet_fpn_sr_backbone": ("build_resnet_fpn_sr_backbone", "toy/Base-toy.yaml", []),
    "build_fe_resnet_pafpn_sr_backbone": ("build_resnet_pafpn_sr_backbone", "toy/Base-toy.yaml", []),
    "build_fe_resnet_bifpn_sr_backbone": ("build_resnet_bifpn_sr_backbone", "toy/bifpn_toy.yaml", []),
    "build_fe_backbone": (
        "build_resnet_pafpn_sr_backbone",
        "toy/Base-toy.yaml",
        ["MODEL.FE.BASE_BACKBONE", "build_resnet_pafpn_sr_backbone"],
    ),
}


@pytest.mark.parametrize("name", sorted(NECKS))
def test_every_neck_builder_is_its_plain_builder_plus_the_terms(name):
    base, config_file, overrides = NECKS[name]
    overrides = [*overrides, "MODEL.AFI.INTERP", "bilinear"]
    torch.manual_seed(0)
    plain = build_backbone(make_cfg(config_file, *overrides, "MODEL.BACKBONE.NAME", base)).eval()
    fe = build_backbone(make_cfg(config_file, *overrides, "MODEL.BACKBONE.NAME", name)).eval()
    assert type(fe) is type(plain) and has_feature_enhancement(fe)
    assert list(plain.state_dict()) == list(fe.state_dict())
    fe.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        a, b = plain(x), fe(x)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    losses, stats = fe_losses(fe)
    assert set(losses) == {"loss_fe_sharp", "loss_fe_smooth"} and set(stats) == {"fe/sharp_var", "fe/smooth_norm"}


_PROBE_SEEN = []


def FEProbeDetector(cfg):  # noqa: N802 -- the registry key is the function name
    from detectron2.modeling import GeneralizedRCNN

    _PROBE_SEEN.append(cfg.MODEL.META_ARCHITECTURE)  # e.g. class-count checks read it while building
    return GeneralizedRCNN(cfg)


def test_the_wrapped_detector_is_built_from_its_own_config():
    from detectron2.modeling import META_ARCH_REGISTRY

    if "FEProbeDetector" not in META_ARCH_REGISTRY:
        META_ARCH_REGISTRY.register(FEProbeDetector)
    cfg = make_cfg("toy/Base-toy.yaml", *FE_ON("FEProbeDetector"), "MODEL.AFI.INTERP", "nearest")
    model = build_model(cfg)
    assert _PROBE_SEEN[-1] == "FEProbeDetector" and cfg.MODEL.META_ARCHITECTURE == "FeatureEnhanced"
    assert type(model).__name__ == "FEGeneralizedRCNN"


def test_bad_stage_names_and_meta_architectures_fail_clearly():
    with pytest.raises(KeyError, match="res6"):
        build_model(_fe_cfg("toy/Base-toy.yaml", [], "MODEL.FE.SMOOTH_STAGES", ["res6"]))
    with pytest.raises(KeyError, match="not a registered meta-architecture"):
        build_model(make_cfg("toy/Base-toy.yaml", *FE_ON("NoSuchDetector")))
    with pytest.raises(ValueError, match="MODEL.FE"):
        build_model(_fe_cfg("toy/Base-toy.yaml", [], "MODEL.FE.PARAMS", "biases"))


COCO_CONFIGS = sorted(os.path.relpath(p, CONFIGS) for p in glob.glob(os.path.join(CONFIGS, "enhanced", "fe_*.yaml")))
TOY_CONFIGS = sorted(os.path.relpath(p, CONFIGS) for p in glob.glob(os.path.join(CONFIGS, "toy", "fe_*.yaml")))


@pytest.mark.parametrize("config_file", COCO_CONFIGS)
def test_coco_configs_build_the_enhanced_detector(config_file):
    cfg = make_cfg(config_file)
    model = build_model(cfg)
    assert type(model).__name__ == "FE" + cfg.MODEL.FE.META_ARCHITECTURE
    reg = fe_regularizer(model.backbone)
    assert (reg.sharp_stages, reg.smooth_stages) == (("res3",), ("res5",))
    assert (reg.sharp_weight, reg.smooth_weight) == (cfg.MODEL.FE.SHARP_WEIGHT, cfg.MODEL.FE.SMOOTH_WEIGHT)
    assert cfg.MODEL.BACKBONE.NAME.startswith("build_fe_")
    assert (
        type(build_model(make_cfg(config_file, "MODEL.FE.ENABLED", False))).__name__ == cfg.MODEL.FE.META_ARCHITECTURE
    )


@pytest.mark.parametrize("config_file", TOY_CONFIGS)
def test_toy_configs_train_one_step_with_their_terms(config_file):
    cfg = make_cfg(config_file, "MODEL.AFI.INTERP", "nearest")
    model = build_model(cfg).train()
    with EventStorage():
        losses = model(toy_batch(SIZES))
    sharp, smooth = _expected_terms(model, cfg.MODEL.FE.SHARP_WEIGHT, cfg.MODEL.FE.SMOOTH_WEIGHT)
    torch.testing.assert_close(losses["loss_fe_sharp"], sharp)
    torch.testing.assert_close(losses["loss_fe_smooth"], smooth)
    assert all(torch.isfinite(v) for v in losses.values())


def test_fcos_lazy_configs_wrap_detectron2_fcos():
    from detectron2.config import LazyConfig, instantiate

    coco = LazyConfig.load(os.path.join(CONFIGS, "enhanced", "fe_fcos_R_50_FPN_1x_lazy.py"))
    assert coco.model.sharp_weight == coco.model.smooth_weight == 1e-5
    assert coco.model.weight_decay == coco.optimizer.weight_decay
    cfg = LazyConfig.load(os.path.join(CONFIGS, "toy", "fe_fcos_R_18_FPN_lazy.py"))
    assert cfg.dataloader.train.dataset.names == "afigan_toy_train" and cfg.train.device == "cpu"
    model = instantiate(cfg.model).train()
    assert type(model).__name__ == "FEFCOS"
    with EventStorage():
        losses = model(toy_batch(SIZES))
    assert {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr", "loss_fe_sharp", "loss_fe_smooth"} == set(losses)
    sharp, smooth = _expected_terms(model, 1e-5, 1e-5)
    torch.testing.assert_close(losses["loss_fe_sharp"], sharp)
    torch.testing.assert_close(losses["loss_fe_smooth"], smooth)
    cfg.model.enabled = False
    assert type(instantiate(cfg.model)).__name__ == "FCOS"
