"""Mixed precision (SOLVER.AMP.*) in all three stages, MODEL.AFI.CHANNELS_LAST, MODEL.AFI.COMPILE,
MODEL.AFI.DIS.PATCH_SIZE in the trainers, and no wasted work in stages 1-2 (the teacher runs once
per scale, without a graph)."""

import logging

import pytest
import torch

pytest.importorskip("detectron2")

from d2_helpers import make_cfg  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from stage_helpers import stage1_chain, stage_cfg  # noqa: E402

from afigan.engine import DetectorTrainer, Stage1Trainer, Stage2Trainer  # noqa: E402
from afigan.engine.amp import AMPPolicy, cpu_supports_bfloat16  # noqa: E402
from afigan.engine.speed import compile_modules, upsampler_modules  # noqa: E402


@pytest.fixture
def afigan_log(caplog):
    """caplog listening on the afigan logger itself (the trainers' setup_logger stops its
    propagation to the root logger caplog listens on)."""
    log = logging.getLogger("afigan")
    log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="afigan"):
            yield caplog
    finally:
        log.removeHandler(caplog.handler)


# The toy stage-1/2 configs' levels (MODEL.AFI.LEVELS) and the loss names one GAN step writes.
LEVELS = ["p2", "p3", "p4", "p5", "p6"]
GAN_LOSSES = {f"loss_{term}_{level}" for term in ("adv", "content", "d_real", "d_fake") for level in LEVELS}
RCNN_LOSSES = {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"}  # stage 2's detector

needs_bf16 = pytest.mark.skipif(not cpu_supports_bfloat16(), reason="this CPU has no bfloat16 kernels")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return stage1_chain(tmp_path_factory.mktemp("amp_chain"), iters=1)


def _stage1(tmp_path, chain, *opts):
    torch.manual_seed(0)
    t = Stage1Trainer(
        stage_cfg("toy/pipeline/stage1.yaml", str(tmp_path), "MODEL.GUIDE_WEIGHTS", chain["teacher"], *opts)
    )
    t.resume_or_load(resume=False)
    return t


def _stage2(tmp_path, chain, *opts):
    torch.manual_seed(0)
    t = Stage2Trainer(
        stage_cfg(
            "toy/pipeline/stage2.yaml",
            str(tmp_path),
            "MODEL.GUIDE_WEIGHTS",
            chain["teacher"],
            "MODEL.WEIGHTS",
            chain["teacher"],
            "MODEL.AFI_GEN_WEIGHTS",
            chain["G"],
            "MODEL.AFI_DIS_WEIGHTS",
            chain["D"],
            *opts,
        )
    )
    t.resume_or_load(resume=False)
    return t


def _losses_of_one_step(trainer):
    """Run one step, returning every loss the step wrote (name -> (value, dtype))."""
    written = {}
    owner, name = (trainer._trainer, "_write_metrics") if hasattr(trainer, "_trainer") else (trainer, "write_metrics")
    orig = getattr(owner, name)

    def spy(losses, *a, **k):
        written.update({n: (v.item(), v.dtype) for n, v in losses.items()})
        return orig(losses, *a, **k)

    setattr(owner, name, spy)
    with EventStorage(0) as storage:
        trainer.storage = storage
        if hasattr(trainer, "_trainer"):
            trainer._trainer.storage = storage
        trainer.run_step()
    return written


@needs_bf16
def test_bf16_autocast_steps_of_stages_1_and_2_give_finite_float32_losses(tmp_path, chain):
    for trainer in (
        _stage1(tmp_path / "s1", chain, "SOLVER.AMP.ENABLED", True),
        _stage2(tmp_path / "s2", chain, "SOLVER.AMP.ENABLED", True),
    ):
        assert trainer.amp.enabled and trainer.amp.dtype == torch.bfloat16 and trainer.scaler is None
        seen = []
        trainer.D.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        losses = _losses_of_one_step(trainer)
        # D really ran in bfloat16: per level on real and fake in the D step, on fake in the G step.
        assert len(seen) == 3 * len(LEVELS) and all(d == torch.bfloat16 for d in seen)
        assert set(losses) == (GAN_LOSSES if isinstance(trainer, Stage1Trainer) else GAN_LOSSES | RCNN_LOSSES)
        assert all(dt == torch.float32 for _, dt in losses.values()), losses
        assert all(torch.isfinite(torch.tensor(v)) for v, _ in losses.values()), losses


@needs_bf16
@pytest.mark.parametrize(
    "config, expected",
    [
        ("toy/pipeline/stage3.yaml", {"loss_cls", "loss_box_reg", "loss_mask"}),
        ("toy/detectors/fcos_R_50_BiFPN_toy_afi.yaml", {"loss_fcos_loc", "loss_fcos_cls"}),
    ],
    ids=["mask_rcnn", "fcos"],
)
def test_bf16_autocast_stage3_step_trains_in_bfloat16_with_float32_losses(tmp_path, config, expected):
    torch.manual_seed(0)
    t = DetectorTrainer(stage_cfg(config, str(tmp_path), "SOLVER.AMP.ENABLED", True))
    t.resume_or_load(resume=False)
    t._trainer.data_loader = t.build_train_loader(t.cfg)
    assert type(t._trainer).__name__ == "AutocastTrainer"
    seen = []
    t.model.backbone.srf_module.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    losses = _losses_of_one_step(t)
    assert len(seen) == (7 * 4 if "BiFPN" in config else 3)  # top-down steps: 7 layers x 4 (BiFPN), 3 (FPN)
    assert all(d == torch.bfloat16 for d in seen)
    assert expected <= set(losses)
    assert all(dt == torch.float32 for _, dt in losses.values()) and all(
        torch.isfinite(torch.tensor(v)) for v, _ in losses.values()
    )
    after = t.model.state_dict()
    assert list(after) == list(before) and all(after[k].dtype == v.dtype for k, v in before.items())  # float32
    assert any(not torch.equal(after[k], v) for k, v in before.items())  # and were updated


def test_amp_on_a_cpu_without_bfloat16_kernels_warns_and_trains_in_float32(monkeypatch, afigan_log):
    import afigan.engine.amp as amp_module

    monkeypatch.setattr(amp_module, "cpu_supports_bfloat16", lambda: False)
    amp = AMPPolicy(make_cfg(None, "SOLVER.AMP.ENABLED", True), torch.device("cpu"))
    assert not amp.enabled and amp.grad_scaler() is None
    assert "SOLVER.AMP.ENABLED is ignored on cpu: it has no bfloat16 convolution kernels" in afigan_log.text


def test_amp_precision_must_be_a_known_dtype():
    with pytest.raises(ValueError, match=r"SOLVER.AMP.PRECISION must be 'float16' or 'bfloat16', got 'fp8'"):
        AMPPolicy(make_cfg(None, "SOLVER.AMP.PRECISION", "fp8"), torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_cuda_amp_stage1_step(tmp_path, chain, precision):
    t = _stage1(tmp_path, chain, "SOLVER.AMP.ENABLED", True, "SOLVER.AMP.PRECISION", precision, "MODEL.DEVICE", "cuda")
    assert t.amp.enabled and (t.scaler is not None) == (precision == "float16")
    losses = _losses_of_one_step(t)
    assert set(losses) == GAN_LOSSES
    assert all(dt == torch.float32 for _, dt in losses.values()) and all(
        torch.isfinite(torch.tensor(v)) for v, _ in losses.values()
    )


def test_channels_last_stage1_step_equals_the_plain_one(tmp_path, chain):
    results = []
    for flag in (False, True):
        t = _stage1(tmp_path / str(flag), chain, "MODEL.AFI.CHANNELS_LAST", flag)
        if flag:
            convs = [p for p in t.D.parameters() if p.dim() == 4]
            assert len(convs) == 4 and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
        losses = _losses_of_one_step(t)
        results.append((losses, {k: v.clone() for k, v in t.model.state_dict().items()}))
    (plain, g_plain), (fast, g_fast) = results
    assert plain.keys() == fast.keys() and list(g_plain) == list(g_fast)
    for k, (v, _) in plain.items():
        assert abs(fast[k][0] - v) <= 1e-5 * abs(v) + 1e-7, k
    for k, v in g_plain.items():
        assert torch.allclose(g_fast[k], v, rtol=1e-5, atol=1e-7), k


def test_patch_size_as_large_as_every_level_equals_the_full_map_step(tmp_path, chain):
    steps = [_losses_of_one_step(_stage1(tmp_path / str(p), chain, "MODEL.AFI.DIS.PATCH_SIZE", p)) for p in (0, 1000)]
    assert steps[0] == steps[1]


def test_small_patches_make_d_see_fewer_pixels(tmp_path, chain):
    t = _stage1(tmp_path, chain, "MODEL.AFI.DIS.PATCH_SIZE", 8)
    sizes = []
    t.D.register_forward_hook(lambda m, i, o: sizes.append(tuple(i[0].shape[-2:])))
    losses = _losses_of_one_step(t)
    assert len(sizes) == 3 * len(LEVELS) and all(h <= 8 and w <= 8 for h, w in sizes)
    assert any(h == 8 and w == 8 for h, w in sizes)  # p2 is larger than 8 x 8
    assert set(losses) == GAN_LOSSES and all(torch.isfinite(torch.tensor(v)) for v, _ in losses.values())


def test_teacher_runs_once_per_scale_without_a_graph(tmp_path, chain):
    calls, grad_modes = [], []

    def count(m, inputs, out):
        calls.append(inputs[1] if len(inputs) > 1 else "image")
        assert sorted(out) == LEVELS and all(not v.requires_grad for v in out.values())

    def inside(m, inputs, out):  # inside the teacher's forward
        grad_modes.append(torch.is_grad_enabled())

    t1 = _stage1(tmp_path / "s1", chain)
    t1.teacher.register_forward_hook(count)
    t1.teacher.backbone.register_forward_hook(inside)
    _losses_of_one_step(t1)
    assert sorted(calls) == ["image", t1.lr_key]  # the full-size image and its half-size twin, once each
    calls.clear()
    t2 = _stage2(tmp_path / "s2", chain)
    t2.teacher.register_forward_hook(count)
    t2.teacher.backbone.register_forward_hook(inside)
    _losses_of_one_step(t2)
    assert calls == ["image"]
    assert grad_modes == [False, False, False]


def test_compile_keeps_keys_and_outputs(tmp_path, chain):
    # "eager" backend: dynamo's capture without code generation, quick enough for a test
    t = _stage2(tmp_path, chain, "MODEL.AFI.COMPILE", True, "MODEL.AFI.COMPILE_BACKEND", "eager")
    srf = t.model.backbone.srf_module
    assert srf._compiled_call_impl is not None and t.D._compiled_call_impl is not None
    from afigan.modeling.necks import upsampler_from_config

    # The keys of an eager upsampler of the same kind, all under Generators. (no _orig_mod. prefix).
    keys = list(srf.state_dict())
    assert keys == list(upsampler_from_config(t.cfg, srf.channels).state_dict())
    assert keys and all(k.startswith("Generators.") for k in keys)
    x = torch.randn(1, srf.channels, 5, 7)
    with torch.no_grad():
        assert torch.allclose(srf(x), srf._call_impl(x), rtol=1e-5, atol=1e-6)


def test_compile_unavailable_keeps_eager_mode_with_one_warning(monkeypatch, afigan_log):
    import afigan.engine.speed as speed

    monkeypatch.setattr(speed.shutil, "which", lambda name: None)  # no C++ compiler
    cfg = make_cfg("toy/pipeline/stage3.yaml", "MODEL.AFI.COMPILE", True)
    from detectron2.modeling import build_model

    model = build_model(cfg)
    ups = upsampler_modules(model)
    assert len(ups) == 1
    assert not compile_modules(cfg, ups, "the neck's upsampler")
    assert ups[0]._compiled_call_impl is None
    assert (
        "MODEL.AFI.COMPILE: the inductor backend needs a C++ compiler (g++) on a CPU, and none is on PATH; "
        "the neck's upsampler runs in eager mode." in afigan_log.text
    )
