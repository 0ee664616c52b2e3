"""Stage 1, AFI-GAN training: the AF interpolator G and the feature patch discriminator D learn
to turn a frozen teacher's half-resolution pyramid into its full-resolution one (spec §7).

Per iteration, for the levels ``MODEL.AFI.LEVELS``:

1. teacher features of ``image`` (real, P^hr) and ``image_x0.5`` (P^lr), under no_grad;
2. fake = G(P^lr) — ONE G pass per level, through G's DDP wrapper;
3. D step: sum_l BCE(D(real), 1) + BCE(D(sg(fake)), 0), through D's DDP wrapper;
4. G step: sum_l adv_weight * BCE(D(fake), 1) + content_weight * L1(fake, real), with D's
   parameters frozen so the adversarial gradient reaches G but nothing touches D
   (``MODEL.AFI.ADV_GRAD_TO_G False`` reproduces the reference's detached term, bug B1).

Both networks have their own SGD optimiser and warm-up multi-step schedule (both stepped) and
their own checkpoints under ``OUTPUT_DIR/G_0`` and ``OUTPUT_DIR/D_0`` (model, optimizer,
scheduler, iteration); ``resume_or_load(resume=True)`` restores both and continues.
"""
import logging
from typing import Dict

import torch
from torch import nn

from afigan.data.hr_lr_mapper import lr_key
from afigan.layers import AFInterpolator, generator_loss

from .adversarial import AdversarialTrainer, DiscriminatorLoss, build_discriminator, discriminator_cfg, select
from .common import backward_and_step, check_finite, wrap_ddp, write_metrics

__all__ = ["Stage1Trainer", "build_generator", "build_discriminator", "discriminator_cfg", "LevelwiseGenerator",
           "DiscriminatorLoss", "select"]

logger = logging.getLogger(__name__)


def build_generator(cfg) -> AFInterpolator:
    """The AF interpolator G with ``MODEL.FPN.OUT_CHANNELS`` channels and ``MODEL.AFI.*`` sizes."""
    a = cfg.MODEL.AFI
    return AFInterpolator(cfg.MODEL.FPN.OUT_CHANNELS, a.NUM_BLOCKS, a.GROWTH, a.RES_SCALE, a.SKIP)


class LevelwiseGenerator(nn.Module):
    """Runs one G on every level in a single forward, so DDP sees one call per step.
    {"p2": (N, C, h, w), ...} -> {"p2": (N, C, 2h, 2w), ...}."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {k: self.generator(v) for k, v in features.items()}


class Stage1Trainer(AdversarialTrainer):
    """Trains G and D against the teacher; ``train()`` runs SOLVER.MAX_ITER iterations.
    ``G``, ``optimizer_G``, ``scheduler_G``, ``checkpointer_G`` name the main network's parts."""

    main_name, main_dir, dis_dir = "G", "G_0", "D_0"

    def __init__(self, cfg):
        super().__init__(cfg, build_generator(cfg))
        self.lr_key = lr_key("image", cfg.MODEL.AFI.SCALE_RATIO)
        self.G_ddp = wrap_ddp(LevelwiseGenerator(self.G))

    G = property(lambda self: self.main)
    optimizer_G = property(lambda self: self.optimizer_main)
    scheduler_G = property(lambda self: self.scheduler_main)
    checkpointer_G = property(lambda self: self.checkpointer_main)
    scaler_G = property(lambda self: self.scaler_main)

    def resume_or_load(self, resume: bool = True) -> None:
        """Resume G and D from ``OUTPUT_DIR/{G_0,D_0}/last_checkpoint`` when ``resume`` and one
        exists; otherwise load ``MODEL.AFI_GEN_WEIGHTS`` / ``MODEL.AFI_DIS_WEIGHTS`` if given."""
        if not (resume and self.resume_both("stage 1")):
            self.checkpointer_G.load(self.cfg.MODEL.AFI_GEN_WEIGHTS, checkpointables=[])
            self.checkpointer_D.load(self.cfg.MODEL.AFI_DIS_WEIGHTS, checkpointables=[])
            self.start_iter = 0
        self.data_loader.dataset.start_iter = self.start_iter

    def train(self):
        logger.info("Stage 1: training G and D from iteration %d to %d.", self.start_iter, self.max_iter)
        super().train()

    def teacher_features(self, data):
        """(real, low): the teacher's pyramids of ``image`` and of its low-resolution twin."""
        real = select(self.teacher(data, "image"), self.levels, "teacher")
        low = select(self.teacher(data, self.lr_key), self.levels, "teacher")
        return real, low

    def g_step(self, real, fake) -> Dict[str, torch.Tensor]:
        """One generator update (D frozen, so D's parameters and gradients stay untouched)."""
        a = self.cfg.MODEL.AFI
        with self.amp.autocast():
            if a.LEGACY.RUN_D_ON_REAL_IN_G_STEP:
                with torch.no_grad():  # the reference's unused pass; it only moves BN statistics
                    for v in real.values():
                        self.D(v)
            g_losses = generator_loss(self.D, fake, real, self.levels, adv_weight=a.ADV_WEIGHT,
                                      content_weight=a.CONTENT_WEIGHT, adv_grad=a.ADV_GRAD_TO_G)
        check_finite(g_losses, self.iter)
        backward_and_step(sum(g_losses.values()), self.optimizer_G, self.scaler_G)
        return g_losses

    def run_step(self):
        data, data_time = self.next_batch()
        real, low = self.teacher_features(data)
        with self.amp.autocast():
            fake = self.G_ddp(low)  # ONE G pass: its detached output feeds the D step
        d_losses = self.d_step(real, fake)
        g_losses = self.g_step(real, fake)
        losses = {**d_losses, **g_losses}
        losses["loss_D"] = sum(d_losses.values()).detach()
        losses["loss_G"] = sum(g_losses.values()).detach()
        write_metrics(self.storage, losses, data_time=data_time)
