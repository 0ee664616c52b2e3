"""Stage 2, the multi-scale AF extractor.

A detector M whose neck upsamples with G (``GeneralizedRCNN_AFExtractor``) is trained on the
low-resolution twin ``image_x0.5`` with its boxes, while its pyramid features are pulled towards
the frozen teacher's full-resolution features downsampled x0.5 (L1) and D keeps judging them:

    L_M = L_det + sum_l [adv_weight * BCE(D(A_l), 1) + content_weight * L1(A_l, T_l)]
    L_D = sum_l [BCE(D(T_l), 1) + BCE(D(sg(A_l)), 0)]

with ONE forward of M per step returning (losses, features). Initialisation (non-resume):
``MODEL.WEIGHTS`` into M, then the stage-1 G (``MODEL.AFI_GEN_WEIGHTS``) into
``backbone.srf_module``, and the stage-1 D (``MODEL.AFI_DIS_WEIGHTS``, model tensors only). D's
scheduler steps (``MODEL.AFI.LEGACY.FROZEN_DIS_LR`` keeps it at its warm-up value, O3 of
docs/differences_from_reference.md).
Checkpoints: ``OUTPUT_DIR/AFExtractor`` (M) and ``OUTPUT_DIR/Disc`` (D); resume restores both.
"""

import logging
from typing import Dict

import torch
from detectron2.modeling import build_model
from torch.nn import functional as F

from afigan.checkpoint import PartialLoad, load_interpolator_weights, read_checkpoint
from afigan.layers import generator_loss

from .adversarial import AdversarialTrainer, select
from .amp import backward_and_step, float32_losses
from .errors import require_file
from .parallel import ddp

__all__ = ["Stage2Trainer", "downsample_targets"]

logger = logging.getLogger(__name__)


def downsample_targets(features: Dict[str, torch.Tensor], mode: str = "nearest") -> Dict[str, torch.Tensor]:
    """Teacher HR features x0.5: "nearest" keeps even rows/columns (reference: O2 of "
    "docs/differences_from_reference.md), "avg" pools 2x2."""
    if mode == "nearest":
        return {k: F.interpolate(v, scale_factor=0.5, mode="nearest") for k, v in features.items()}
    if mode == "avg":
        return {k: F.avg_pool2d(v, 2, ceil_mode=True) for k, v in features.items()}
    raise ValueError(f"MODEL.AFI.TARGET_DOWNSAMPLE must be 'nearest' or 'avg', got {mode!r}.")


class Stage2Trainer(AdversarialTrainer):
    """Trains the AF extractor M (``model``) and D; ``train()`` runs SOLVER.MAX_ITER iterations."""

    model_name = "M"
    checkpoint_dirs = ("AFExtractor", "Disc")

    def __init__(self, cfg):
        if cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN_AFExtractor":
            raise ValueError(
                "Stage 2 needs MODEL.META_ARCHITECTURE 'GeneralizedRCNN_AFExtractor', got "
                f"{cfg.MODEL.META_ARCHITECTURE!r}."
            )
        self.freeze_dis_lr = cfg.MODEL.AFI.LEGACY.FROZEN_DIS_LR
        super().__init__(cfg, build_model(cfg))
        self.model_ddp = ddp(self.model)

    def resume_or_load(self, resume: bool = True) -> None:
        """Resume M and D from their last checkpoints when ``resume`` and they exist (B8 of
        docs/differences_from_reference.md); otherwise initialise from MODEL.WEIGHTS,
        MODEL.AFI_GEN_WEIGHTS and MODEL.AFI_DIS_WEIGHTS."""
        cfg = self.cfg.MODEL
        if not (resume and self.resume_both("stage 2")):
            if cfg.WEIGHTS:
                # The teacher's detector has no interpolator: it comes from MODEL.AFI_GEN_WEIGHTS next.
                partial = PartialLoad("the AF extractor M (MODEL.WEIGHTS)", missing_ok=("backbone.srf_module",))
                self.checkpointer.load(cfg.WEIGHTS, checkpointables=[], partial=partial)  # srf_module(s).
            load_interpolator_weights(
                self.model, require_file(cfg.AFI_GEN_WEIGHTS, "MODEL.AFI_GEN_WEIGHTS"), what="MODEL.AFI_GEN_WEIGHTS"
            )
            # Only D's tensors: stage 2 has its own optimiser and schedule (and the stage-1 file
            # need not carry optimizer/scheduler/iteration entries, B8).
            d_state = read_checkpoint(
                require_file(cfg.AFI_DIS_WEIGHTS, "MODEL.AFI_DIS_WEIGHTS"), "MODEL.AFI_DIS_WEIGHTS"
            )["model"]
            self.D.load_state_dict(d_state, strict=True)
            self.start_iter = 0

    def train(self):
        logger.info("Stage 2: training the AF extractor from iteration %d to %d.", self.start_iter, self.max_iter)
        super().train()

    def run_step(self):
        data, data_time = self.next_batch()
        a = self.cfg.MODEL.AFI
        targets = downsample_targets(
            select(self.teacher_pyramid(data, "image"), self.levels, "teacher"), a.TARGET_DOWNSAMPLE
        )
        with self.amp.autocast():
            det_losses, features = self.model_ddp(data)
            fake = select(features, self.levels, "AF extractor's neck")
        det_losses = float32_losses(det_losses)
        self.d_step(targets, fake, data_time)

        with self.amp.autocast():
            g_losses = generator_loss(
                self.D,
                fake,
                targets,
                self.levels,
                adv_weight=a.ADV_WEIGHT,
                content_weight=a.CONTENT_WEIGHT,
                adv_grad=a.ADV_GRAD_TO_G,
                patch_size=a.DIS.PATCH_SIZE,
            )
        m_losses = {**det_losses, **g_losses}
        self.write_metrics(m_losses, data_time, "M")
        backward_and_step(sum(m_losses.values()), self.optimizer, self.scaler)
