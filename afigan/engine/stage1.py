"""Stage 1, AFI-GAN training: the AF interpolator G and the feature patch discriminator D learn
to turn a frozen teacher's half-resolution pyramid into its full-resolution one.

Per iteration, for the levels ``MODEL.AFI.LEVELS``:

1. teacher features of ``image`` (real, P^hr) and ``image_x0.5`` (P^lr), under no_grad;
2. fake = G(P^lr) — ONE G pass per level, through G's DDP wrapper;
3. D step: sum_l BCE(D(real), 1) + BCE(D(sg(fake)), 0), through D's DDP wrapper;
4. G step: sum_l adv_weight * BCE(D(fake), 1) + content_weight * L1(fake, real), with D's
   parameters frozen so the adversarial gradient reaches G but nothing touches D
   (``MODEL.AFI.ADV_GRAD_TO_G False`` reproduces the reference's detached term, B1 of docs/differences_from_reference.md).

Both networks have their own SGD optimiser and warm-up multi-step schedule (both stepped) and
their own checkpoints under ``OUTPUT_DIR/G_0`` and ``OUTPUT_DIR/D_0`` (model, optimizer,
scheduler, iteration); ``resume_or_load(resume=True)`` restores both and continues.
"""
import logging
from typing import Dict

import torch
from torch import nn

from afigan.config import lr_key
from afigan.layers import AFInterpolator, generator_loss
from afigan.modeling.necks import upsampler_from_config

from .adversarial import AdversarialTrainer, select
from .common import backward_and_step, ddp

__all__ = ["Stage1Trainer", "build_generator", "LevelwiseGenerator"]

logger = logging.getLogger(__name__)


def build_generator(cfg) -> AFInterpolator:
    """The AF interpolator G with ``MODEL.FPN.OUT_CHANNELS`` channels and the ``MODEL.AFI.*``
    sizes of the neck's interpolator (never frozen here: stage 1 trains it)."""
    return upsampler_from_config(cfg, cfg.MODEL.FPN.OUT_CHANNELS, kind="afi", freeze=False)


class LevelwiseGenerator(nn.Module):
    """Runs one G on every level in a single forward, so DDP sees one call per step.
    {"p2": (N, C, h, w), ...} -> {"p2": (N, C, 2h, 2w), ...}."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {k: self.generator(v) for k, v in features.items()}


class Stage1Trainer(AdversarialTrainer):
    """Trains G (``model``) and D against the teacher; ``train()`` runs SOLVER.MAX_ITER iterations."""

    model_name = "G"
    checkpoint_dirs = ("G_0", "D_0")

    def __init__(self, cfg):
        super().__init__(cfg, build_generator(cfg))
        self.lr_key = lr_key("image", cfg.MODEL.AFI.SCALE_RATIO)
        self.G_ddp = ddp(LevelwiseGenerator(self.model))

    def resume_or_load(self, resume: bool = True) -> None:
        """Resume G and D from ``OUTPUT_DIR/{G_0,D_0}/last_checkpoint`` when ``resume`` and one
        exists; otherwise load ``MODEL.AFI_GEN_WEIGHTS`` / ``MODEL.AFI_DIS_WEIGHTS`` if given."""
        if not (resume and self.resume_both("stage 1")):
            self.checkpointer.load(self.cfg.MODEL.AFI_GEN_WEIGHTS, checkpointables=[])
            self.checkpointer_D.load(self.cfg.MODEL.AFI_DIS_WEIGHTS, checkpointables=[])
            self.start_iter = 0

    def train(self):
        logger.info("Stage 1: training G and D from iteration %d to %d.", self.start_iter, self.max_iter)
        super().train()

    def teacher_features(self, data):
        """(real, low): the teacher's pyramids of ``image`` and of its low-resolution twin."""
        real = select(self.teacher(data, "image"), self.levels, "teacher")
        low = select(self.teacher(data, self.lr_key), self.levels, "teacher")
        return real, low

    def g_step(self, real, fake, data_time: float = 0.0) -> Dict[str, torch.Tensor]:
        """One generator update (D frozen, so D's parameters and gradients stay untouched)."""
        a = self.cfg.MODEL.AFI
        with self.amp.autocast():
            g_losses = generator_loss(self.D, fake, real, self.levels, adv_weight=a.ADV_WEIGHT,
                                      content_weight=a.CONTENT_WEIGHT, adv_grad=a.ADV_GRAD_TO_G,
                                      run_d_on_real=a.LEGACY.RUN_D_ON_REAL_IN_G_STEP)
        self.write_metrics(g_losses, data_time, "G")
        backward_and_step(sum(g_losses.values()), self.optimizer, self.scaler)
        return g_losses

    def run_step(self):
        data, data_time = self.next_batch()
        real, low = self.teacher_features(data)
        with self.amp.autocast():
            fake = self.G_ddp(low)  # ONE G pass: its detached output feeds the D step
        self.d_step(real, fake, data_time)
        self.g_step(real, fake, data_time)
