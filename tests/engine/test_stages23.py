import os

import pytest
import torch

pytest.importorskip("detectron2")


from stage_helpers import TINY, params, stage1_chain, stage_args, stage_cfg
from stage_helpers import StopAt as _StopAt  # noqa: E402

from afigan.engine import DetectorTrainer, Stage2Trainer  # noqa: E402
from afigan.engine.cli import eval_only, stage_main  # noqa: E402

SRF = "backbone.srf_module."


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A teacher, and a 2-iteration stage-1 run giving G_0 / D_0 final checkpoints."""
    return stage1_chain(tmp_path_factory.mktemp("chain"), iters=2)


def _stage2(chain, out, *opts):
    torch.manual_seed(0)
    return Stage2Trainer(
        stage_cfg(
            "toy/pipeline/stage2.yaml",
            str(out),
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


def test_stage1_generator_lands_in_stage2_srf_module(chain, tmp_path):
    t = _stage2(chain, tmp_path)
    t.resume_or_load(resume=False)
    g = torch.load(chain["G"], weights_only=False)["model"]
    sd = t.model.state_dict()
    for k, v in g.items():
        assert torch.equal(sd[SRF + k], v), k
    teacher = torch.load(chain["teacher"], weights_only=False)["model"]
    # MODEL.WEIGHTS (here the teacher) initialises the rest of M; the srf tensors come from G.
    assert torch.equal(sd["backbone.fpn_lateral3.weight"], teacher["backbone.fpn_lateral3.weight"])
    d = torch.load(chain["D"], weights_only=False)["model"]
    for k, v in t.D.state_dict().items():
        assert torch.equal(v, d[k]), k


def test_stage2_trains_one_forward_per_step_and_checkpoints_both(chain, tmp_path):
    t = _stage2(chain, tmp_path, "SOLVER.MAX_ITER", 2, "SOLVER.WARMUP_ITERS", 100)
    t.resume_or_load(resume=False)
    calls = []
    t.model.backbone.register_forward_hook(lambda *a: calls.append(1))
    lr_d = t.optimizer_D.param_groups[0]["lr"]
    t.train()
    assert len(calls) == 2  # one backbone pass of M per iteration
    keys = set(t.storage.histories())
    assert {
        "loss_cls",
        "loss_mask",
        "loss_rpn_cls",
        "loss_content_p2",
        "loss_adv_p6",
        "loss_d_real_p3",
        "M_total_loss",
        "D_total_loss",
    } <= keys
    assert t.scheduler_D.last_epoch == 2  # D's schedule stepped every iteration
    assert t.optimizer_D.param_groups[0]["lr"] != lr_d  # and moved D's learning rate (warm-up)
    assert os.path.isfile(tmp_path / "AFExtractor" / "model_final.pth")
    assert os.path.isfile(tmp_path / "Disc" / "model_final.pth")
    # M's checkpoint names the upsampler it holds (as stage 1's G does); D's holds none.
    m = torch.load(tmp_path / "AFExtractor" / "model_final.pth", weights_only=False)
    assert m["upsampler"] == {"kind": "afi", "shared": True} and m["iteration"] == 1
    assert "upsampler" not in torch.load(tmp_path / "Disc" / "model_final.pth", weights_only=False)
    # Inference of the AF extractor on ordinary images works (B6 of docs/differences_from_reference.md of the
    # reference).
    t.model.eval()
    with torch.no_grad():
        out = t.model([{"image": torch.randint(0, 255, (3, 97, 131), dtype=torch.uint8), "height": 97, "width": 131}])
    assert "instances" in out[0]


def test_legacy_frozen_discriminator_lr(chain, tmp_path):
    t = _stage2(
        chain, tmp_path, "SOLVER.MAX_ITER", 2, "SOLVER.WARMUP_ITERS", 100, "MODEL.AFI.LEGACY.FROZEN_DIS_LR", True
    )
    t.resume_or_load(resume=False)
    lr_d = t.optimizer_D.param_groups[0]["lr"]
    t.train()
    assert t.optimizer_D.param_groups[0]["lr"] == lr_d
    assert t.optimizer.param_groups[0]["lr"] > lr_d


def test_stage2_srf_lands_in_stage3_and_nothing_else(chain, tmp_path):
    s2 = _stage2(chain, tmp_path / "s2", "SOLVER.MAX_ITER", 1)
    s2.resume_or_load(resume=False)
    s2.train()
    ckpt = str(tmp_path / "s2" / "AFExtractor" / "model_final.pth")
    torch.manual_seed(0)
    t = DetectorTrainer(stage_cfg("toy/pipeline/stage3.yaml", str(tmp_path / "s3"), "MODEL.AF_EXTRACTOR_WEIGHTS", ckpt))
    before = params(t.model.module if hasattr(t.model, "module") else t.model)
    # --resume with no checkpoint yet must still load the AF weights (B8 of docs/differences_from_reference.md).
    t.resume_or_load(resume=True)
    after = t.model.state_dict()
    stage2 = torch.load(ckpt, weights_only=False)["model"]
    srf = [k for k in after if k.startswith(SRF)]
    assert srf
    for k in after:
        if k in srf:
            assert torch.equal(after[k], stage2[k]), k
        else:
            assert torch.equal(after[k], before[k]), k


def _stage3(out):
    torch.manual_seed(0)
    return DetectorTrainer(
        stage_cfg("toy/pipeline/stage3.yaml", str(out), "SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 2)
    )


def test_stage3_resume_equals_uninterrupted_run(tmp_path):
    full = _stage3(tmp_path / "full")
    full.resume_or_load(resume=True)
    full.cfg.defrost()
    full.cfg.DATASETS.TEST = ()  # no evaluation needed here
    full.train()
    part = _stage3(tmp_path / "part")
    part.cfg.defrost()
    part.cfg.DATASETS.TEST = ()
    part.register_hooks([_StopAt(1)])
    part.resume_or_load(resume=True)
    with pytest.raises(KeyboardInterrupt):
        part.train()
    resumed = _stage3(tmp_path / "part")
    resumed.cfg.defrost()
    resumed.cfg.DATASETS.TEST = ()
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    resumed.train()
    assert torch.load(tmp_path / "full" / "model_final.pth", weights_only=False)["upsampler"] == {
        "kind": "afi",
        "shared": True,
    }
    a, b = full.model.state_dict(), resumed.model.state_dict()
    # Same batches, same sampling seeds, same optimizer state: equal up to float reordering.
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k


def test_a_kind_mismatch_at_stage_3_names_both_kinds_from_the_tags(tmp_path):
    """The file's kind comes from its tag, the model's from its upsampler: the tensors of the
    tagged file below fit the dysample model key for key, and still it is refused as carafe; a
    file without a tag is refused without a kind, never a guessed one."""
    torch.manual_seed(0)
    t = DetectorTrainer(
        stage_cfg(
            "toy/pipeline/stage3.yaml",
            str(tmp_path / "s3"),
            "MODEL.AFI.INTERP",
            "dysample",
            "MODEL.AF_EXTRACTOR_WEIGHTS",
            str(tmp_path / "m.pth"),
        )
    )
    own = t.model.state_dict()
    torch.save({"model": own, "upsampler": {"kind": "carafe", "shared": True}}, tmp_path / "m.pth")
    with pytest.raises(ValueError) as e:
        t.resume_or_load(resume=False)
    assert str(e.value) == (
        f"MODEL.AF_EXTRACTOR_WEIGHTS: {str(tmp_path / 'm.pth')!r} holds a 'carafe' upsampler, which does not fit "
        "the model's 'dysample'; set MODEL.AFI.INTERP to the kind it was trained with ('carafe') or give a "
        "'dysample' file."
    )
    # An older file (no tag) of the AF interpolator: the sentence without the file's kind.
    afi = _stage3(tmp_path / "afi").model.state_dict()
    torch.save({"model": afi}, tmp_path / "m.pth")
    with pytest.raises(ValueError) as e:
        t.resume_or_load(resume=False)
    assert str(e.value).startswith(
        f"MODEL.AF_EXTRACTOR_WEIGHTS: {str(tmp_path / 'm.pth')!r} holds an upsampler of another kind (the file "
        "does not name it), which does not fit the model's 'dysample'; set MODEL.AFI.INTERP to the kind it was "
        "trained with (one of ['afi', "
    )


def test_stage3_missing_af_extractor_file_is_one_sentence(tmp_path):
    t = DetectorTrainer(
        stage_cfg("toy/pipeline/stage3.yaml", str(tmp_path), "MODEL.AF_EXTRACTOR_WEIGHTS", str(tmp_path / "x.pth"))
    )
    with pytest.raises(FileNotFoundError, match=r"MODEL.AF_EXTRACTOR_WEIGHTS: file '.*x.pth' does not exist"):
        t.resume_or_load(resume=False)


def test_eval_only_prints_coco_ap(tmp_path):
    t = DetectorTrainer(stage_cfg("toy/pipeline/stage3.yaml", str(tmp_path), "SOLVER.MAX_ITER", 1))
    t.resume_or_load(resume=False)
    t.checkpointer.save("model_final")
    res = eval_only(
        stage_args(
            "toy/pipeline/stage3.yaml",
            *TINY,
            "OUTPUT_DIR",
            str(tmp_path),
            "MODEL.WEIGHTS",
            str(tmp_path / "model_final.pth"),
            eval_only=True,
        )
    )
    assert set(res) == {"bbox", "segm"}
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(res["bbox"])
    with pytest.raises(ValueError, match="MODEL.WEIGHTS is empty"):
        eval_only(stage_args("toy/pipeline/stage3.yaml", *TINY, "OUTPUT_DIR", str(tmp_path), eval_only=True))


def test_stage3_train_eval_only_evaluates_and_stages_1_2_refuse_it(tmp_path):
    t = DetectorTrainer(stage_cfg("toy/pipeline/stage3.yaml", str(tmp_path), "SOLVER.MAX_ITER", 1))
    t.resume_or_load(resume=False)
    t.checkpointer.save("model_final")
    args = stage_args(
        "toy/pipeline/stage3.yaml",
        *TINY,
        "OUTPUT_DIR",
        str(tmp_path / "eval"),
        "MODEL.WEIGHTS",
        str(tmp_path / "model_final.pth"),
        eval_only=True,
    )
    res = stage_main("stage3", args)
    assert set(res) == {"bbox", "segm"} and "AP" in res["bbox"]
    assert not os.path.exists(tmp_path / "eval" / "model_final.pth")  # evaluated, not trained
    assert os.path.isfile(tmp_path / "eval" / "inference" / "afigan_toy_val" / "coco_instances_results.json")
    for stage, what in (("stage1", "the AF interpolator G"), ("stage2", "the multi-scale AF extractor")):
        with pytest.raises(
            ValueError,
            match=rf"--eval-only: {stage} trains {what}.*evaluate a detector with tools/run_net.py --eval-only",
        ):
            stage_main(stage, stage_args(f"toy/pipeline/{stage}.yaml", eval_only=True))


def test_inputs_are_checked_before_anything_is_built(tmp_path):
    from afigan.engine.cli import train_stage

    config = "stage3/AFI-GAN_maskrcnn_R_50_FPN_3x.yaml"  # COCO: no data set here
    missing = str(tmp_path / "AFExtractor.pth")
    args = stage_args(
        config, "OUTPUT_DIR", str(tmp_path / "out"), "MODEL.WEIGHTS", "", "MODEL.AF_EXTRACTOR_WEIGHTS", missing
    )
    with pytest.raises(FileNotFoundError, match=r"MODEL.AF_EXTRACTOR_WEIGHTS: file '.*AFExtractor.pth' does not exist"):
        train_stage("stage3", args)
    torch.save({"model": {}}, missing)
    with pytest.raises(
        FileNotFoundError,
        match=r"DATASETS.TRAIN: data set 'coco_2017_train' reads '.*instances_train2017.json', "
        r"which does not exist; lay the data out as datasets/README.md says",
    ):
        train_stage("stage3", args)
    with pytest.raises(ValueError, match="MODEL.GUIDE_WEIGHTS is empty"):
        train_stage("stage1", stage_args("toy/pipeline/stage1.yaml", "OUTPUT_DIR", str(tmp_path / "s1")))


def test_checkpoints_keep_the_newest_no_periodic_copy_of_the_final_one_and_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        t = DetectorTrainer(
            stage_cfg(
                "toy/pipeline/stage3.yaml",
                str(tmp_path),
                "SOLVER.MAX_ITER",
                4,
                "SOLVER.CHECKPOINT_PERIOD",
                1,
                "SOLVER.CHECKPOINT_KEEP",
                2,
                "DATASETS.TEST",
                (),
            )
        )
        t.resume_or_load(resume=False)
        t.train()
    finally:
        os.umask(old)
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".pth"))
    assert files == ["model_0000001.pth", "model_0000002.pth", "model_final.pth"]  # iteration 3 is only the final one
    assert open(tmp_path / "last_checkpoint").read() == "model_final.pth"
    assert all(os.stat(tmp_path / f).st_mode & 0o777 == 0o644 for f in files + ["last_checkpoint"])
