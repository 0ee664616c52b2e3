import itertools
import os

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.engine import HookBase  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from stage_helpers import StopAt as _StopAt  # noqa: E402
from stage_helpers import params, save_teacher, stage_cfg

from afigan.engine import Stage1Trainer  # noqa: E402

CFG = "toy/pipeline/stage1.yaml"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_teacher(str(tmp_path_factory.mktemp("teacher") / "teacher.pth"))


def _trainer(tmp_path, teacher, *opts):
    torch.manual_seed(0)
    return Stage1Trainer(stage_cfg(CFG, str(tmp_path), "MODEL.GUIDE_WEIGHTS", teacher, *opts))


def _features(trainer):
    data, _ = trainer.next_batch()
    real, low, guides = trainer.teacher_features(data)
    assert guides is None  # the AF interpolator is not guided
    return real, low


# One adversarial term per level of MODEL.AFI.LEVELS (p2..p6 in the toy stage-1 config).
ADV_KEYS = ["loss_adv_p2", "loss_adv_p3", "loss_adv_p4", "loss_adv_p5", "loss_adv_p6"]


def test_g_step_leaves_d_alone_and_gets_adversarial_gradient(tmp_path, teacher):
    t = _trainer(tmp_path, teacher, "MODEL.AFI.CONTENT_WEIGHT", 0.0)
    with EventStorage():
        real, low = _features(t)
        fake = t.G_ddp(low)
        t.d_step(real, fake)
        d_before = params(t.D)
        d_grads = [p.grad.clone() for p in t.D.parameters()]
        g_before = params(t.model)
        losses = t.g_step(real, fake)
    assert sorted(k for k in losses if k.startswith("loss_adv")) == ADV_KEYS  # the term whose gradient is checked
    for k, v in params(t.D).items():
        assert torch.equal(v, d_before[k]), k  # parameters and BN statistics
    assert all(torch.equal(p.grad, g) for p, g in zip(t.D.parameters(), d_grads))  # no gradient from the G step
    # Content weight 0: any change of G comes from the adversarial term alone.
    grads = [p.grad for p in t.model.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert any(not torch.equal(v, g_before[k]) for k, v in params(t.model).items())


def test_legacy_detached_adversarial_term_gives_g_no_gradient(tmp_path, teacher):
    t = _trainer(tmp_path, teacher, "MODEL.AFI.CONTENT_WEIGHT", 0.0, "MODEL.AFI.ADV_GRAD_TO_G", False)
    with EventStorage():
        real, low = _features(t)
        fake = t.G_ddp(low)
        losses = t.g_step(real, fake)
    assert sorted(k for k in losses if k.startswith("loss_adv")) == ADV_KEYS  # computed, just without gradient
    assert all(losses[k] > 0 for k in ADV_KEYS)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in t.model.parameters())


def test_content_loss_falls_on_a_fixed_batch_and_teacher_never_changes(tmp_path, teacher):
    # SGD on an L1 loss through a x0.1-initialised branch moves slowly: a high G learning rate
    # (D kept at 1e-3, it diverges otherwise) makes the fall visible in 20 steps (measured ~3 %).
    t = _trainer(
        tmp_path,
        teacher,
        "SOLVER.MAX_ITER",
        20,
        "SOLVER.BASE_LR",
        0.3,
        "MODEL.AFI.DIS.BASE_LR",
        0.001,
        "SOLVER.CHECKPOINT_PERIOD",
        1000,
    )
    batch, _ = t.next_batch()
    t.data_loader = itertools.repeat(batch)
    teacher_before = params(t.teacher)
    t.train()
    hist = t.storage.history("loss_content_p3").values()
    values = [v for v, _ in hist]
    assert values[-1] < 0.985 * values[0], values
    assert sum(b < a for a, b in zip(values, values[1:])) >= 17, values  # falls at (almost) every step
    for k, v in params(t.teacher).items():
        assert torch.equal(v, teacher_before[k]), k
    assert all(p.grad is None and not p.requires_grad for p in t.teacher.parameters())
    assert not t.teacher.training
    # Separate, per-level logging of every loss term, and both schedules stepped.
    keys = set(t.storage.histories())
    for level in ("p2", "p6"):
        assert {f"loss_d_real_{level}", f"loss_d_fake_{level}", f"loss_adv_{level}", f"loss_content_{level}"} <= keys
    assert {"lr_G", "lr_D"} <= keys
    assert t.scheduler.last_epoch == 20 and t.scheduler_D.last_epoch == 20
    # Final checkpoints of both networks, reference layout.
    g = torch.load(os.path.join(str(tmp_path), "G_0", "model_final.pth"), weights_only=False)
    assert set(g) >= {"model", "optimizer", "scheduler", "iteration"} and g["iteration"] == 19
    assert all(k.startswith("Generators.0.") for k in g["model"])
    d = torch.load(os.path.join(str(tmp_path), "D_0", "model_final.pth"), weights_only=False)
    assert all(k.startswith("Discriminators.0.") for k in d["model"])


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, teacher):
    opts = ["SOLVER.MAX_ITER", 6, "SOLVER.CHECKPOINT_PERIOD", 3]
    full = _trainer(tmp_path / "full", teacher, *opts)
    full.resume_or_load(resume=True)
    full.train()

    part = _trainer(tmp_path / "part", teacher, *opts)
    part.register_hooks([_StopAt(2)])  # killed right after the iteration-2 checkpoint
    part.resume_or_load(resume=True)
    with pytest.raises(KeyboardInterrupt):
        part.train()
    resumed = _trainer(tmp_path / "part", teacher, *opts)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 3
    resumed.train()
    # CPU float32 arithmetic repeats exactly here; 1e-6 leaves room for BLAS reordering.
    for net in ("model", "D"):
        a, b = params(getattr(full, net)), params(getattr(resumed, net))
        for k in a:
            assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), (net, k)


def _scaler(scale, tracker):
    """A GradScaler in a state of its own (torch.amp.GradScaler("cpu") is enabled on a CPU: a real
    scaler, not a stub), as a float16 run would have it after some steps."""
    s = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=2000)
    s.load_state_dict(
        {
            "scale": scale,
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": 2000,
            "_growth_tracker": tracker,
        }
    )
    return s


def test_grad_scaler_states_travel_with_g_and_d_checkpoints(tmp_path, teacher):
    t = _trainer(tmp_path, teacher, "SOLVER.MAX_ITER", 1)
    assert t.scaler is None and t.scaler_D is None  # float32 on a CPU: no scaling ...
    t.scaler, t.scaler_D = _scaler(2.0**13, 37), _scaler(2.0**9, 5)  # ... so give it the float16 ones
    t.checkpointer.save("model_0000004", iteration=4)
    t.checkpointer_D.save("model_0000004", iteration=4)
    g = torch.load(tmp_path / "G_0" / "model_0000004.pth", weights_only=False)
    d = torch.load(tmp_path / "D_0" / "model_0000004.pth", weights_only=False)
    assert g["grad_scaler"] == t.scaler.state_dict() and g["grad_scaler"]["_growth_tracker"] == 37  # G's with G
    assert d["grad_scaler"] == t.scaler_D.state_dict() and d["grad_scaler"]["scale"] == 2.0**9  # D's with D

    resumed = _trainer(tmp_path, teacher, "SOLVER.MAX_ITER", 6)
    resumed.scaler, resumed.scaler_D = _scaler(65536.0, 0), _scaler(65536.0, 0)  # a fresh float16 run's
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 5
    assert resumed.scaler.state_dict() == g["grad_scaler"] and resumed.scaler_D.state_dict() == d["grad_scaler"]

    # A float32 run resumed from a float16 one's checkpoints has no scaler to restore: it goes on.
    f32 = _trainer(tmp_path, teacher, "SOLVER.MAX_ITER", 6)
    f32.resume_or_load(resume=True)
    assert f32.start_iter == 5 and f32.scaler is None and f32.scaler_D is None

    # A checkpoint written before scaler states were saved (or by a float32 run) still loads; the
    # scaler keeps its initial state.
    for net in ("G_0", "D_0"):
        path = tmp_path / net / "model_0000004.pth"
        old = torch.load(path, weights_only=False)
        del old["grad_scaler"]
        torch.save(old, path)
    older = _trainer(tmp_path, teacher, "SOLVER.MAX_ITER", 6)
    older.scaler, older.scaler_D = _scaler(65536.0, 0), _scaler(65536.0, 0)
    older.resume_or_load(resume=True)
    assert older.start_iter == 5 and older.scaler.state_dict()["scale"] == 65536.0
    assert older.scaler_D.state_dict()["_growth_tracker"] == 0
    # A float32 run (no scaler) writes an empty entry.
    assert older.checkpointer.checkpointables["grad_scaler"].state_dict() == older.scaler.state_dict()
    older.scaler = None
    assert older.checkpointer.checkpointables["grad_scaler"].state_dict() == {}


def test_missing_teacher_weights_is_one_sentence(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"MODEL.GUIDE_WEIGHTS: file '.*nope.pkl' does not exist"):
        _trainer(tmp_path, str(tmp_path / "nope.pkl"))
    with pytest.raises(ValueError, match="MODEL.GUIDE_WEIGHTS is empty"):
        _trainer(tmp_path, "")


def test_unregistered_dataset_is_one_sentence(tmp_path, teacher):
    with pytest.raises(KeyError, match=r"DATASETS.TRAIN: data set 'coco_2099_train' is not registered"):
        _trainer(tmp_path, teacher, "DATASETS.TRAIN", ("coco_2099_train",))


class _PoisonG(HookBase):
    """Fills one of G's weights with NaN before iteration ``iteration``."""

    def __init__(self, iteration):
        self.iteration = iteration

    def before_step(self):
        if self.trainer.iter == self.iteration:
            with torch.no_grad():
                next(self.trainer.model.parameters()).fill_(float("nan"))


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, teacher):
    t = _trainer(tmp_path, teacher, "SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 2)
    t.resume_or_load(resume=False)
    t.register_hooks([_PoisonG(2)])
    with pytest.raises(FloatingPointError, match=r"Loss became infinite or NaN at iteration=2"):
        t.train()
    assert sorted(os.listdir(tmp_path / "G_0")) == ["last_checkpoint", "model_0000001.pth"]
    assert open(tmp_path / "G_0" / "last_checkpoint").read() == "model_0000001.pth"
    # The check runs before D's optimiser step: D's weights are still finite.
    assert all(torch.isfinite(p).all() for p in t.D.parameters())


def test_one_g_pass_per_level_and_no_d_pass_on_real_in_the_g_step(tmp_path, teacher):
    t = _trainer(tmp_path, teacher)
    g_calls, d_calls = [], []
    t.model.register_forward_hook(lambda *a: g_calls.append(1))
    t.D.register_forward_hook(lambda *a: d_calls.append(1))
    with EventStorage() as storage:
        t.storage = storage
        t.iter = 0
        t.run_step()
    levels = len(t.levels)
    assert len(g_calls) == levels
    assert len(d_calls) == 2 * levels + levels  # D step: real + fake; G step: fake only


def test_legacy_d_pass_on_real_moves_bn_statistics_in_the_reference_order(tmp_path, teacher):
    import copy

    from afigan.layers import crop_to_common

    t = _trainer(tmp_path, teacher, "MODEL.AFI.LEGACY.RUN_D_ON_REAL_IN_G_STEP", True, "MODEL.AFI.ADV_GRAD_TO_G", False)
    with EventStorage() as storage:
        t.storage = storage
        t.iter = 0
        real, low = _features(t)
        fake = t.G_ddp(low)
        t.d_step(real, fake)
        expected = copy.deepcopy(t.D)  # D after its own step: the reference's G step starts here
        calls = []
        t.D.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
        t.g_step(real, fake)
    # The reference, per level: D(cropped fake), then D(cropped real), both in train mode.
    with torch.no_grad():
        order = []
        for level in t.levels:
            f, r = crop_to_common(fake[level], real[level])
            expected(f)
            expected(r)
            order += [tuple(f.shape), tuple(r.shape)]
    assert calls == order
    got, want = params(t.D), params(expected)
    bn = [k for k in want if "running_" in k]
    assert bn and all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]


def test_annotations_without_usable_boxes_are_one_sentence(tmp_path, teacher):
    import json

    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    from afigan.data.toy_shapes import make_toy_dataset, toy_paths

    root = make_toy_dataset(str(tmp_path / "crowd"), num_train=2, num_val=1)
    json_file, image_root = toy_paths(root, "train")
    coco = json.load(open(json_file))
    for a in coco["annotations"]:
        a["iscrowd"] = 1  # nothing a detector can train on
    json.dump(coco, open(json_file, "w"))
    name = "afigan_test_all_crowd"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, json_file, image_root)
    try:
        with pytest.raises(
            ValueError, match=r"DATASETS.TRAIN \('afigan_test_all_crowd',\) gives no usable training image"
        ):
            _trainer(tmp_path / "out", teacher, "DATASETS.TRAIN", (name,))
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
