"""CUDA tier: stages 0-3 and run_net --eval-only on the toy configs for 3 iterations in float32,
float16 (GradScaler) and bfloat16; the first forward in float32 (TF32 off) equal to the CPU's on
the same weights and batch; kill-and-resume under float16 equal to an uninterrupted run, the
GradScaler states included. Set-up as the CPU suite's (tests/stage_helpers.py)."""

import pytest
import torch
from cuda_helpers import CUDA_TIER, FIRST_FORWARD_RTOL, PRECISIONS, amp_opts, no_tf32, rel_error
from stage_helpers import TINY, StopAt, params, stage1_chain, stage_args, stage_cfg

from afigan.engine import DetectorTrainer, Stage1Trainer, Stage2Trainer
from afigan.engine.cli import eval_only

pytestmark = CUDA_TIER
QUIET = ["SOLVER.CHECKPOINT_PERIOD", 1000, "DATASETS.TEST", ()]
# float16 resume: RoIAlign's and grid_sample's CUDA backward add with atomics (not deterministic)
# and a float16 step rounds to 2^-11; 3 steps stay within 1e-3 relative (per tensor).
RESUME_RTOL = 1e-3


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return stage1_chain(tmp_path_factory.mktemp("cuda_chain"), iters=1)  # on the CPU: only files


def _trainer(stage, chain, out, device, *opts):
    torch.manual_seed(0)
    inputs = {
        "stage0": [],
        "stage1": ["MODEL.GUIDE_WEIGHTS", chain["teacher"]],
        "stage2": ["MODEL.GUIDE_WEIGHTS", chain["teacher"], "MODEL.WEIGHTS", chain["teacher"]]
        + ["MODEL.AFI_GEN_WEIGHTS", chain["G"], "MODEL.AFI_DIS_WEIGHTS", chain["D"]],
        "stage3": [],
    }[stage]
    cls = {"stage0": DetectorTrainer, "stage1": Stage1Trainer, "stage2": Stage2Trainer, "stage3": DetectorTrainer}
    cfg = stage_cfg(f"toy/pipeline/{stage}.yaml", str(out), "MODEL.DEVICE", device, *QUIET, *inputs, *opts)
    t = cls[stage](cfg)
    t.resume_or_load(resume=False)
    return t


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("stage", ["stage0", "stage1", "stage2", "stage3"])
def test_three_iterations_give_finite_losses(stage, precision, chain, tmp_path):
    t = _trainer(stage, chain, tmp_path, "cuda", "SOLVER.MAX_ITER", 3, *amp_opts(precision))
    scaler = t._trainer.grad_scaler if hasattr(t, "_trainer") and hasattr(t._trainer, "grad_scaler") else None
    scaler = getattr(t, "scaler", scaler)
    assert (scaler is not None) == (precision == "float16")
    t.train()
    losses = {k: [v for v, _ in h.values()] for k, h in t.storage.histories().items() if "loss" in k}
    assert losses and all(len(v) == 3 and all(torch.isfinite(torch.tensor(v))) for v in losses.values()), losses
    assert all(p.device.type == "cuda" for p in t.model.parameters())


def _first_forward(stage, trainer, data):
    """What the first forward computes before any random draw: the teacher's pyramids and G's output
    (stages 1, 2), the backbone's pyramid, neck and upsampler included (stages 0, 3)."""
    with torch.no_grad():
        if stage in ("stage1", "stage2"):
            real, low, guides = trainer.teacher_features(data)
            fake = trainer.G_ddp(low, guides) if stage == "stage1" else {}
            return {**{f"real_{k}": v for k, v in real.items()}, **{f"fake_{k}": v for k, v in fake.items()}}
        model = trainer.model
        return model.backbone(model.preprocess_image(data).tensor)


@pytest.mark.parametrize("stage", ["stage0", "stage1", "stage2", "stage3"])
def test_first_forward_in_float32_equals_the_cpus(stage, chain, tmp_path):
    cpu = _trainer(stage, chain, tmp_path / "cpu", "cpu")
    gpu = _trainer(stage, chain, tmp_path / "gpu", "cuda")
    for k, v in params(cpu.model).items():  # the same weights (same seed, same files)
        assert torch.equal(v, params(gpu.model)[k].cpu()), k
    data = next(iter(cpu.data_loader if stage in ("stage1", "stage2") else cpu.build_train_loader(cpu.cfg)))
    with no_tf32():
        want, got = _first_forward(stage, cpu, data), _first_forward(stage, gpu, data)
    assert sorted(want) == sorted(got) and want
    errors = {k: rel_error(got[k], want[k]) for k in want}
    assert all(e < FIRST_FORWARD_RTOL for e in errors.values()), errors


@pytest.mark.parametrize("precision", PRECISIONS)
def test_eval_only_on_the_gpu(precision, tmp_path):
    t = DetectorTrainer(stage_cfg("toy/pipeline/stage3.yaml", str(tmp_path), "MODEL.DEVICE", "cuda"))
    t.resume_or_load(resume=False)
    t.checkpointer.save("model_final")
    args = stage_args(
        "toy/pipeline/stage3.yaml",
        *TINY,
        *("OUTPUT_DIR", str(tmp_path / "eval"), "MODEL.DEVICE", "cuda"),
        *("MODEL.WEIGHTS", str(tmp_path / "model_final.pth"), *amp_opts(precision)),
        eval_only=True,
    )
    res = eval_only(args)
    assert set(res) == {"bbox", "segm"} and all(v == v for v in res["bbox"].values())  # numbers, not NaN


def _scalers(t):
    return [s.state_dict() for s in (getattr(t, "scaler", None), getattr(t, "scaler_D", None)) if s is not None] or [
        t._trainer.grad_scaler.state_dict()
    ]


@pytest.mark.parametrize("stage", ["stage1", "stage3"])
def test_float16_kill_and_resume_equals_an_uninterrupted_run(stage, chain, tmp_path):
    opts = ["SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 2, *amp_opts("float16")]
    full = _trainer(stage, chain, tmp_path / "full", "cuda", *opts)
    full.train()
    part = _trainer(stage, chain, tmp_path / "part", "cuda", *opts)
    part.register_hooks([StopAt(1)])  # killed right after the iteration-1 checkpoint
    with pytest.raises(KeyboardInterrupt):
        part.train()
    torch.manual_seed(0)
    resumed = _trainer(stage, chain, tmp_path / "part", "cuda", *opts)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    resumed.train()
    assert _scalers(resumed) == _scalers(full)  # loss scale and growth tracker, each network's
    nets = ["model", "D"] if stage == "stage1" else ["model"]
    for net in nets:
        a, b = params(getattr(full, net)), params(getattr(resumed, net))
        bad = {k: rel_error(b[k].float(), a[k].float()) for k in a if a[k].is_floating_point()}
        assert all(e < RESUME_RTOL for e in bad.values()), {k: e for k, e in bad.items() if e >= RESUME_RTOL}
