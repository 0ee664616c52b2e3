"""Device placement of whole toy detectors, checked on a CPU (tests/device_guard.py): a training
step and an inference pass of every detector family make no tensor from afigan's code without the
input's device. Detectron2's own code creates host tensors on purpose, and the guard shows where
when it is applied to Detectron2's sources as well."""

import os
import traceback

import pytest
import torch

pytest.importorskip("detectron2")

from d2_helpers import make_cfg  # noqa: E402
from detector_helpers import mapped, one_thread, toy_dicts  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from device_guard import AFIGAN_SOURCES, META_ERRORS, stray_tensors_on_meta  # noqa: E402

import afigan  # noqa: E402,F401  (registers components)

_one_thread = pytest.fixture(autouse=True)(one_thread)

D2_SOURCES = os.path.dirname(os.path.dirname(os.path.abspath(__import__("detectron2").__file__))) + os.sep
SCORES_ALL = ["MODEL.FCOS.INFERENCE_TH_TEST", 0.0, "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0]
SCORES_ALL += ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0]

# config (under configs/toy) -> extra options; every neck (FPN, PAFPN, BiFPN) and head family.
MODELS = {
    "detectors/mask_rcnn_R_50_FPN_toy_afi.yaml": [],
    "detectors/mask_rcnn_R_50_PAFPN_toy_afi.yaml": [],
    "detectors/fcos_R_50_FPN_toy_afi.yaml": [],
    # "all": the normaliser averaged over processes with a tensor made in the loss (NCCL needs it on the GPU)
    "detectors/fcos_R_50_BiFPN_toy_afi.yaml": ["MODEL.FCOS.LOSS_NORMALIZER_CLS", "all"],
    "detectors/retinanet_R_50_FPN_toy_afi.yaml": [],
    "detectors/centermask_R_50_BiFPN_toy_afi.yaml": [],
    "detectors/cascade_mask_rcnn_S_101_PAFPN_toy_afi.yaml": [],
    "detectors/cascade_rcnn_Swin_T_BiFPN_toy_afi.yaml": [],
    "fe_retinanet_R_18_FPN.yaml": [],  # the feature-enhancement regulariser's loss terms
}


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("toy") / "afigan_toy")


def _model_and_batches(config, opts, toy_root):
    cfg = make_cfg(os.path.join("toy", config), *SCORES_ALL, *opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    train = mapped(cfg, toy_dicts(toy_root)[:2], is_train=True)
    val = mapped(cfg, toy_dicts(toy_root, "val")[:2], is_train=False)
    return model, train, val


@pytest.mark.parametrize("config", sorted(MODELS))
def test_training_step_and_inference_make_no_stray_tensor(config, toy_root):
    model, train, val = _model_and_batches(config, MODELS[config], toy_root)
    with stray_tensors_on_meta() as guard:
        with EventStorage():
            losses = model(train)
            sum(losses.values()).backward()
        model.eval()
        with torch.no_grad():
            outputs = model(val)
    assert guard.caught == 0
    assert losses and all(v.device.type == "cpu" and torch.isfinite(v) for v in losses.values())
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained if p.dim() == 4)  # every conv was in the step
    assert len(outputs) == 2 and all(len(o["instances"]) > 0 for o in outputs)


def test_the_teacher_makes_no_stray_tensor(toy_root):
    from afigan.modeling.meta_arch import build_guide_model

    cfg = make_cfg("toy/pipeline/stage1.yaml")
    teacher = build_guide_model(cfg, load_weights=False)
    batch = mapped(cfg, toy_dicts(toy_root)[:2], is_train=False)
    with stray_tensors_on_meta() as guard:
        features = teacher(batch, "image")
    assert guard.caught == 0 and sorted(features) == ["p2", "p3", "p4", "p5", "p6"]


def test_detectron2_itself_makes_host_tensors_where_the_guard_would_trip(toy_root):
    """Why the guard is limited to afigan's sources: guarding Detectron2's as well, the very first
    step, its image batching, trips it (the image sizes are stacked on the host and read with
    .item(), on purpose), in every meta-architecture."""
    model, train, _ = _model_and_batches("detectors/mask_rcnn_R_50_FPN_toy_afi.yaml", [], toy_root)
    with stray_tensors_on_meta((AFIGAN_SOURCES, D2_SOURCES)) as guard, EventStorage():
        with pytest.raises(RuntimeError, match=META_ERRORS) as e:
            model(train)
    assert guard.caught >= 1
    frames = [(os.path.relpath(f.filename, D2_SOURCES), f.name) for f in traceback.extract_tb(e.value.__traceback__)]
    ours = [f for f in frames if not f[0].startswith("..")]
    assert ours[-1] == (os.path.join("detectron2", "structures", "image_list.py"), "from_tensors"), frames
