"""CUDA tier: one training step on the GPU of deformable ResNeSt (torchvision's deform_conv2d),
CenterMask, FCOS and Swin, in float32 and under bfloat16 autocast (the CPU suite's set-up:
tests/detector_helpers.py)."""

import os

import pytest
import torch
from cuda_helpers import CUDA_TIER
from d2_helpers import make_cfg
from detector_helpers import mapped, toy_dicts
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import afigan  # noqa: F401  (registers components)

pytestmark = CUDA_TIER

DCN = [
    *("MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False, True, True, True], "MODEL.RESNETS.DEFORM_MODULATED", True),
    *("MODEL.RESNETS.DEFORM_NUM_GROUPS", 2),
]
MODELS = {
    "deformable_resnest": ("detectors/cascade_mask_rcnn_S_101_PAFPN_toy_afi.yaml", DCN),
    "centermask": ("detectors/centermask_R_50_BiFPN_toy_afi.yaml", []),
    "fcos": ("detectors/fcos_R_50_FPN_toy_afi.yaml", []),
    "swin": ("detectors/cascade_rcnn_Swin_T_BiFPN_toy_afi.yaml", []),
}


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("toy") / "afigan_toy")


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_training_step_on_the_gpu(name, dtype, toy_root):
    config, opts = MODELS[name]
    cfg = make_cfg(os.path.join("toy", config), "MODEL.DEVICE", "cuda", *opts)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = mapped(cfg, toy_dicts(toy_root)[:2], is_train=True)
    with EventStorage(), torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        losses = model(batch)
    sum(v.float() for v in losses.values()).backward()
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads if g is not None)
    assert all(g.device.type == "cuda" for g in grads if g is not None)
