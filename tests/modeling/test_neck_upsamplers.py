"""Every upsampler kind in every afigan neck, shared or one per top-down step; stages 1-3 with the
learned kinds; the kind and layout travelling through the checkpoints; bad input."""

import os

import pytest
import torch

pytest.importorskip("detectron2")

from d2_helpers import make_cfg  # noqa: E402
from detectron2.modeling import build_backbone  # noqa: E402
from stage_helpers import save_teacher, stage_cfg  # noqa: E402

from afigan.checkpoint import load_interpolator_weights  # noqa: E402
from afigan.engine import DetectorTrainer, Stage1Trainer, Stage2Trainer  # noqa: E402
from afigan.layers import build_upsampler, upsampler_kinds  # noqa: E402
from afigan.modeling.interpolator import finer_level, guided_levels  # noqa: E402
from afigan.modeling.necks import upsampler_options  # noqa: E402

KINDS = upsampler_kinds()
LEARNED = ["dysample", "carafe", "fade", "deconv", "pixelshuffle"]
NECKS = {  # config, expected top-down step levels
    "fpn": ("toy/fpn_toy.yaml", ["p2", "p3", "p4"]),
    "pafpn": ("toy/pafpn_toy.yaml", ["p2", "p3", "p4"]),
    "bifpn": ("toy/bifpn_toy.yaml", ["p6", "p5", "p4", "p3"]),
}


def _neck(neck, *opts):
    cfg = make_cfg(NECKS[neck][0], *opts)
    torch.manual_seed(0)
    return cfg, build_backbone(cfg).eval()


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_the_learned_kinds_are_registered():
    assert set(LEARNED) <= set(KINDS)


def _nearest_x2(x, size):
    """x2 nearest upsampling to ``size``: each pixel repeated 2x2, cut (or edge-extended) at the bottom/right."""
    import torch.nn.functional as F

    y = F.interpolate(x, scale_factor=2.0, mode="nearest")[..., : size[0], : size[1]]
    return F.pad(y, (0, size[1] - y.shape[-1], 0, size[0] - y.shape[-2]), mode="replicate")


def _own_upsampler(net):
    """The top-down step of ``net`` as its own upsampler module computes it (guided kinds see the lateral)."""

    def up(x, level, lateral):
        module = net.srf_module if net.srf_modules is None else net.srf_modules[level]
        guide = dict(guide=lateral) if getattr(module, "guided", False) else {}
        return module(x, output_size=lateral.shape[-2:], **guide)

    return up


def _recompute(neck, net, x, up):
    """``net``'s outputs re-computed from its weights with plain torch ops (its convs called one by one,
    by name), the top-down x2 steps done by ``up(x, level, lateral)``. FPN: P_i = out_i(T_i),
    T_i = lat_i + up(T_{i+1}); PAFPN: M_2 = T_2, M_i = T_i + relu(down_i(M_{i-1})), P_i = out_i(M_i);
    both: P6 = P5[::2, ::2]. BiFPN (faithful): 7 layers of swish-fused separable-conv nodes with the
    raw fusion weights, top-down p7 -> p3 then bottom-up with 3x3/2 "same" max pools."""
    import math

    import torch.nn.functional as F

    feats = net.bottom_up(x)
    if neck == "bifpn":
        c3, c4, c5 = (feats[f] for f in net.in_features)
        pre = net.before_bifpn

        def pool(t, size=None):  # TF "SAME" 3x3/2 max pool: zero pixels right/bottom, then fit to ``size``
            h, w = t.shape[-2:]
            t = F.max_pool2d(F.pad(t, (0, max(1, 3 - w), 0, max(1, 3 - h))), 3, 2)
            if size is None:
                return t
            t = t[..., : size[0], : size[1]]
            return F.pad(t, (0, size[1] - t.shape[-1], 0, size[0] - t.shape[-2]), mode="replicate")

        p6 = pool(pre.top_block.p6(c5))
        p7 = pool(p6)
        first = [pre.lateral3(c3), pre.lateral4(c4), pre.lateral5(c5), p6, p7]
        a = first
        for k in range(7):
            s4, s5, s6, s7 = [pre.p4_skip(c4), pre.p5_skip(c5), p6, p7] if k == 0 else first[1:]

            def node(conv, weight, inputs):
                w = getattr(net, f"BiFPNLayer_{k}_{weight}")
                fused = sum(w[i] * t for i, t in enumerate(inputs))
                return getattr(net, f"BiFPNLayer_{k}_{conv}")(F.silu(fused))

            a3, a4, a5, a6, a7 = a
            u6 = node("conv6_up", "p6_w1", [a6, up(a7, "p6", a6)])
            u5 = node("conv5_up", "p5_w1", [a5, up(u6, "p5", a5)])
            u4 = node("conv4_up", "p4_w1", [a4, up(u5, "p4", a4)])
            u3 = node("conv3_up", "p3_w1", [a3, up(u4, "p3", a3)])
            o4 = node("conv4_down", "p4_w2", [s4, u4, pool(u3, u4.shape[-2:])])
            o5 = node("conv5_down", "p5_w2", [s5, u5, pool(o4, u5.shape[-2:])])
            o6 = node("conv6_down", "p6_w2", [s6, u6, pool(o5, u6.shape[-2:])])
            o7 = node("conv7_down", "p7_w2", [s7, pool(o6, s7.shape[-2:])])
            a = [u3, o4, o5, o6, o7]
        return {f"p{i}": t for i, t in zip(range(3, 8), a)}

    stages = [int(math.log2(net.bottom_up.output_shape()[f].stride)) for f in net.in_features]
    lateral = {i: getattr(net, f"fpn_lateral{i}")(feats[f]) for i, f in zip(stages, net.in_features)}
    t = {stages[-1]: lateral[stages[-1]]}
    for i in reversed(stages[:-1]):
        t[i] = lateral[i] + up(t[i + 1], f"p{i}", lateral[i])
    if neck == "fpn":
        out = {f"p{i}": getattr(net, f"fpn_output{i}")(t[i]) for i in stages}
    else:
        m = t[stages[0]]
        out = {f"p{stages[0]}": getattr(net, f"pafpn_output{stages[0]}")(m)}
        for i in stages[1:]:
            m = t[i] + F.relu(getattr(net, f"pafpn_downsample{i}")(m))
            out[f"p{i}"] = getattr(net, f"pafpn_output{i}")(m)
    out[f"p{stages[-1] + 1}"] = out[f"p{stages[-1]}"][..., ::2, ::2]
    return out


# Outputs on no upsampler's path: FPN's top level and the P6 pooled from it. Every PAFPN and BiFPN
# output passes a top-down step (the bottom-up path starts from the finest, upsampled, level).
NO_UPSAMPLER = {"fpn": ["p5", "p6"], "pafpn": [], "bifpn": []}


@pytest.mark.parametrize("neck", sorted(NECKS))
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_in_every_neck_keeps_the_stock_outputs(neck, kind):
    x = torch.randn(1, 3, 130, 150)  # not a multiple of the strides: odd laterals on the way down
    _, stock = _neck(neck, "MODEL.AFI.INTERP", "nearest")
    _, net = _neck(neck, "MODEL.AFI.INTERP", kind)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # distinct BiFPN fusion weights (all ones at init), so a swapped input shows
        for name, p in stock.named_parameters():
            if name.startswith("BiFPNLayer_") and name.endswith(("_w1", "_w2")):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    # The kind's net gets every stock weight; only its upsampler's own tensors are its own.
    missing, unexpected = net.load_state_dict(stock.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith(("srf_module.", "srf_modules.")) for k in missing)
    with torch.no_grad():
        ref, out = stock(x), net(x)
        independent = _recompute(neck, stock, x, lambda t, level, lateral: _nearest_x2(t, lateral.shape[-2:]))
        wired = _recompute(neck, net, x, _own_upsampler(net))
    assert list(out) == list(ref) == list(independent) == list(wired)
    for k in ref:
        torch.testing.assert_close(ref[k], independent[k], msg=f"nearest {neck} {k}")
        torch.testing.assert_close(out[k], wired[k], msg=f"{kind} {neck} {k}")
    assert all(torch.equal(out[k], ref[k]) for k in NO_UPSAMPLER[neck])
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in ref.items()}
    assert net.output_shape() == stock.output_shape()
    assert all(torch.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("neck", sorted(NECKS))
@pytest.mark.parametrize("kind", ["afi", "dysample", "carafe", "fade"])
def test_per_level_upsamplers_are_one_per_step_with_steps_times_the_parameters(neck, kind):
    cfg, shared = _neck(neck, "MODEL.AFI.INTERP", kind)
    _, per = _neck(neck, "MODEL.AFI.INTERP", kind, "MODEL.AFI.SHARED", "False")
    steps = NECKS[neck][1]
    channels = cfg.MODEL.BIFPN.OUT_CHANNELS if neck == "bifpn" else cfg.MODEL.FPN.OUT_CHANNELS
    one = _count(build_upsampler(kind, channels, **upsampler_options(cfg, kind)[1]))
    assert one > 0 and _count(shared.srf_module) == one and shared.srf_modules is None
    assert not hasattr(per, "srf_module") or per.srf_module is None
    assert sorted(per.srf_modules) == sorted(steps)
    assert _count(per) - _count(shared) == one * (len(steps) - 1)
    keys = [k for k in per.state_dict() if "srf_modules." in k]
    assert {k.split(".")[1] for k in keys} == set(steps)
    with torch.no_grad():
        assert per(torch.randn(1, 3, 128, 128)).keys() == shared(torch.randn(1, 3, 128, 128)).keys()


def test_shared_layout_keeps_the_reference_keys():
    _, net = _neck("fpn")
    keys = [k for k in net.state_dict() if "srf" in k]
    assert keys and all(k.startswith("srf_module.Generators.0.") for k in keys)


@pytest.mark.parametrize("neck", ["fpn", "bifpn"])
def test_a_guided_kind_is_given_the_finer_lateral(neck):
    _, net = _neck(neck, "MODEL.AFI.INTERP", "fade")
    seen = []
    net.srf_module.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0].shape, kwargs["guide"].shape, kwargs["output_size"])),
        with_kwargs=True,
    )
    with torch.no_grad():
        net(torch.randn(1, 3, 128, 160))
    assert seen and all(tuple(g[-2:]) == tuple(size) for _, g, size in seen)
    assert all(g[-2] in (2 * x[-2] - 1, 2 * x[-2], 2 * x[-2] + 1) for x, g, _ in seen)


def test_guided_levels_leave_out_the_finest():
    assert guided_levels(["p2", "p3", "p4", "p5", "p6"]) == {"p3": "p2", "p4": "p3", "p5": "p4", "p6": "p5"}
    assert guided_levels(["p2"]) == {}
    assert [finer_level(level) for level in ("p2", "p3", "p7")] == [None, "p2", "p6"]


# ---------------------------------------------------------------- stages 1-3 with learned kinds


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_teacher(str(tmp_path_factory.mktemp("teacher") / "teacher.pth"))


def _chain(teacher, root, kind, *opts):
    """Stage 1 (1 iteration) and stage 2 (1 iteration) of ``kind``; returns their checkpoints."""
    common = ("MODEL.AFI.INTERP", kind, "MODEL.GUIDE_WEIGHTS", teacher, "SOLVER.MAX_ITER", 1, *opts)
    s1 = Stage1Trainer(stage_cfg("toy/pipeline/stage1.yaml", str(root / "s1"), *common))
    s1.resume_or_load(resume=False)
    s1.train()
    g, d = str(root / "s1" / "G_0" / "model_final.pth"), str(root / "s1" / "D_0" / "model_final.pth")
    s2 = Stage2Trainer(
        stage_cfg(
            "toy/pipeline/stage2.yaml",
            str(root / "s2"),
            *common,
            "MODEL.WEIGHTS",
            teacher,
            "MODEL.AFI_GEN_WEIGHTS",
            g,
            "MODEL.AFI_DIS_WEIGHTS",
            d,
        )
    )
    s2.resume_or_load(resume=False)
    sd = {k: v.clone() for k, v in s2.model.state_dict().items()}  # before training moves them
    g_state = torch.load(g, weights_only=False)
    assert g_state["upsampler"] == {"kind": kind, "shared": "False" not in [str(o) for o in opts]}
    s2.train()
    return s1, s2, g, str(root / "s2" / "AFExtractor" / "model_final.pth"), sd, g_state["model"]


@pytest.mark.parametrize("kind", ["dysample", "carafe", "fade"])
def test_stages_1_to_3_train_and_hand_over_a_learned_kind(teacher, tmp_path, kind):
    s1, s2, g, m, s2_init, g_model = _chain(teacher, tmp_path, kind)
    # Stage 1 trained G's levels (a guided kind: all but p2), and its losses are finite.
    hist = s1.storage.histories()
    levels = ["p3", "p4", "p5", "p6"] if kind == "fade" else ["p2", "p3", "p4", "p5", "p6"]
    assert s1.levels == levels
    assert all(torch.isfinite(torch.tensor(hist[k].latest())) for k in hist if k.endswith("loss"))
    # Stage 2 started from exactly stage 1's G.
    for k, v in g_model.items():
        assert torch.equal(s2_init["backbone.srf_module." + k], v), k
    # Stage 3 loads the stage-2 upsampler: every upsampler key, nothing else.
    torch.manual_seed(0)
    t = DetectorTrainer(
        stage_cfg(
            "toy/pipeline/stage3.yaml",
            str(tmp_path / "s3"),
            "MODEL.AFI.INTERP",
            kind,
            "MODEL.AF_EXTRACTOR_WEIGHTS",
            m,
            "SOLVER.MAX_ITER",
            1,
        )
    )
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.resume_or_load(resume=False)
    after, stage2 = t.model.state_dict(), torch.load(m, weights_only=False)["model"]
    srf = [k for k in after if k.startswith("backbone.srf_module.")]
    assert srf and all(torch.equal(after[k], stage2[k]) for k in srf)
    assert all(torch.equal(after[k], before[k]) for k in after if k not in srf)
    t.train()  # one stage-3 step
    assert t.iter == 1 and torch.isfinite(torch.tensor(t.storage.history("total_loss").latest()))


def test_per_level_chain_and_a_shared_g_initialising_every_step(teacher, tmp_path):
    _, s2, g, m, s2_init, g_model = _chain(teacher, tmp_path, "dysample", "MODEL.AFI.SHARED", "False")
    assert sorted({k.split(".")[0] for k in g_model}) == ["p2", "p3", "p4", "p5", "p6"]
    for level in ("p2", "p3", "p4"):  # the neck's steps; G's p5/p6 have no step to go to
        for k, v in g_model.items():
            if k.startswith(level + "."):
                assert torch.equal(s2_init["backbone.srf_modules." + k], v), k
    # A shared stage-1 G initialises each per-level copy of a per-level detector.
    cfg = make_cfg("toy/fpn_toy.yaml", "MODEL.AFI.INTERP", "dysample", "MODEL.AFI.SHARED", "False")
    net = build_backbone(cfg)
    s1 = Stage1Trainer(
        stage_cfg(
            "toy/pipeline/stage1.yaml",
            str(tmp_path / "shared"),
            "MODEL.AFI.INTERP",
            "dysample",
            "MODEL.GUIDE_WEIGHTS",
            teacher,
            "SOLVER.MAX_ITER",
            1,
        )
    )
    s1.resume_or_load(resume=False)
    s1.train()
    shared_g = str(tmp_path / "shared" / "G_0" / "model_final.pth")
    loaded = load_interpolator_weights(net, shared_g)
    assert len(loaded) == 3 * len(s1.model.state_dict())
    for level in ("p2", "p3", "p4"):
        for k, v in s1.model.state_dict().items():
            assert torch.equal(net.srf_modules[level].state_dict()[k], v)
    # ...but a per-level file does not go into one shared upsampler.
    shared_net = build_backbone(make_cfg("toy/fpn_toy.yaml", "MODEL.AFI.INTERP", "dysample"))
    with pytest.raises(ValueError, match=r"one upsampler per level .* set MODEL.AFI.SHARED False"):
        load_interpolator_weights(shared_net, m)


# ---------------------------------------------------------------- bad input


def test_a_checkpoint_of_one_kind_into_another_names_both_and_the_key(teacher, tmp_path):
    _, _, g, m, _, _ = _chain(teacher, tmp_path, "carafe")
    net = build_backbone(make_cfg("toy/fpn_toy.yaml", "MODEL.AFI.INTERP", "dysample"))
    for path in (g, m):
        with pytest.raises(ValueError) as e:
            load_interpolator_weights(net, path, what="MODEL.AF_EXTRACTOR_WEIGHTS")
        msg = str(e.value)
        assert "holds a 'carafe' upsampler" in msg and "MODEL.AFI.INTERP" in msg and "'dysample'" in msg, msg
        assert msg.count(". ") == 0 and "\n" not in msg
    # Resuming stage 1 with another kind in the same OUTPUT_DIR stops too.
    s1 = Stage1Trainer(
        stage_cfg(
            "toy/pipeline/stage1.yaml",
            str(tmp_path / "s1"),
            "MODEL.AFI.INTERP",
            "dysample",
            "MODEL.GUIDE_WEIGHTS",
            teacher,
            "SOLVER.MAX_ITER",
            2,
        )
    )
    with pytest.raises(
        ValueError, match=r"holds a shared 'carafe' upsampler but the config asks for a shared 'dysample'"
    ):
        s1.resume_or_load(resume=True)


@pytest.mark.parametrize(
    "opts, match",
    [
        (
            ("MODEL.AFI.INTERP", "nearest"),
            r"MODEL.AFI.INTERP 'nearest' has no parameters, so stage 1 has nothing to train or show; "
            r"set it to a learned kind \(afi, ",
        ),
        (("MODEL.AFI.INTERP", "sapa"), r"MODEL.AFI.INTERP: Unknown upsampler kind 'sapa'; expected one of \['afi', "),
        (
            ("MODEL.AFI.INTERP", "dysample", "MODEL.AFI.DYSAMPLE.GROUPS", 3),
            r"MODEL.AFI.INTERP 'dysample' with MODEL.AFI.DYSAMPLE: .*groups",
        ),
        (
            ("MODEL.AFI.INTERP", "dysample", "MODEL.AFI.DYSAMPLE.STYLE", "xy"),
            r"MODEL.AFI.INTERP 'dysample' with MODEL.AFI.DYSAMPLE: .*style",
        ),
        (
            ("MODEL.AFI.INTERP", "carafe", "MODEL.AFI.CARAFE.UP_KERNEL", 4),
            r"MODEL.AFI.INTERP 'carafe' with MODEL.AFI.CARAFE: ",
        ),
    ],
)
def test_bad_upsampler_settings_are_one_sentence(teacher, tmp_path, opts, match):
    with pytest.raises(ValueError, match=match):
        Stage1Trainer(stage_cfg("toy/pipeline/stage1.yaml", str(tmp_path), "MODEL.GUIDE_WEIGHTS", teacher, *opts))
    if opts[1] != "nearest":  # the detector's neck says the same
        with pytest.raises(ValueError, match=match):
            build_backbone(make_cfg("toy/fpn_toy.yaml", *opts))


def test_per_level_upsamplers_must_match_the_steps():
    from afigan.modeling.necks import AFIFPN

    cfg = make_cfg("toy/fpn_toy.yaml", "MODEL.AFI.INTERP", "nearest")
    stock = build_backbone(cfg)
    kwargs = AFIFPN.from_config(cfg, stock.bottom_up)
    kwargs["upsampler"] = {"p2": build_upsampler("nearest", 32)}
    with pytest.raises(ValueError, match=r"keyed by the neck's top-down levels \['p2', 'p3', 'p4'\], got \['p2'\]"):
        AFIFPN(**kwargs)


def test_configs_of_each_kind_differ_from_the_baseline_only_in_the_upsampler():
    from d2_helpers import CONFIGS

    from afigan.config import changed_keys

    base = make_cfg("upsamplers/mask_rcnn_R_50_FPN_1x_nn.yaml")
    names = sorted(f for f in os.listdir(os.path.join(CONFIGS, "upsamplers")) if f.endswith(".yaml"))
    assert len(names) == 9
    for name in names:
        cfg = make_cfg(f"upsamplers/{name}")
        diff = {key for key, _, _ in changed_keys(base, cfg)}
        assert diff <= {"OUTPUT_DIR", "MODEL.AFI.INTERP", "MODEL.AFI.SHARED", "MODEL.AFI.DYSAMPLE.DYSCOPE"}, (
            name,
            diff,
        )


# ---------------------------------------------------------------- a new kind: one file + its registration


class _Gain(torch.nn.Module):
    """A toy learned upsampler: nearest x2 times a per-channel gain (its only tensor)."""

    guided = False

    def __init__(self, channels: int, gain: float, bias: bool):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.full((1, channels, 1, 1), gain))
        self.bias = torch.nn.Parameter(torch.zeros(1, channels, 1, 1)) if bias else None

    def forward(self, x, output_size=None, guide=None):
        size = output_size if output_size is not None else (2 * x.shape[-2], 2 * x.shape[-1])
        y = _nearest_x2(x, size) * self.gain
        return y + self.bias if self.bias is not None else y


@pytest.fixture
def toy_kind():
    """Registers "toy_gain" as a user would (the factory's keyword defaults are its options), and
    takes it away again."""
    from afigan.layers import register_upsampler, unregister_upsampler

    @register_upsampler("toy_gain")
    def _toy_gain(channels: int, *, gain: float = 1.5, bias: bool = False):
        return _Gain(channels, gain, bias)

    yield "toy_gain"
    unregister_upsampler("toy_gain")


def test_a_kind_registered_in_a_test_is_built_by_every_neck_from_its_config_keys(toy_kind, tmp_path):
    from d2_helpers import CONFIGS
    from detectron2.config import get_cfg

    from afigan.config import add_afigan_config
    from afigan.layers import upsampler_kind_of

    # Its keys exist from its factory's signature alone, with its defaults ...
    assert add_afigan_config(get_cfg()).MODEL.AFI.TOY_GAIN == {"GAIN": 1.5, "BIAS": False}
    # ... a YAML file and KEY VALUE overrides set them like any other key ...
    yaml = tmp_path / "toy_gain.yaml"
    yaml.write_text(
        f'_BASE_: "{os.path.join(CONFIGS, "toy", "fpn_toy.yaml")}"\n'
        "MODEL:\n  AFI:\n    INTERP: toy_gain\n    TOY_GAIN:\n      GAIN: 0.25\n"
    )
    cfg = make_cfg(str(yaml), "MODEL.AFI.TOY_GAIN.BIAS", "True")
    assert upsampler_options(cfg, toy_kind) == ("MODEL.AFI.TOY_GAIN", {"gain": 0.25, "bias": True})
    # ... and every neck builds the kind with them, shared or one per step.
    x = torch.randn(1, 3, 96, 128)
    for neck in sorted(NECKS):
        for shared in ("True", "False"):
            cfg, net = _neck(
                neck,
                "MODEL.AFI.INTERP",
                toy_kind,
                "MODEL.AFI.TOY_GAIN.GAIN",
                0.25,
                "MODEL.AFI.TOY_GAIN.BIAS",
                "True",
                "MODEL.AFI.SHARED",
                shared,
            )
            ups = [net.srf_module] if shared == "True" else list(net.srf_modules.values())
            assert len(ups) == (1 if shared == "True" else len(NECKS[neck][1]))
            for up in ups:
                assert upsampler_kind_of(up) == toy_kind and isinstance(up, _Gain)
                assert torch.equal(up.gain, torch.full_like(up.gain, 0.25)) and up.bias is not None
            with torch.no_grad():
                out = net(x)
                wired = _recompute(neck, net, x, _own_upsampler(net))
            for k in out:
                torch.testing.assert_close(out[k], wired[k], msg=f"{neck} {shared} {k}")
