"""Stage 1, AFI-GAN training: the AF interpolator G and the feature patch discriminator D learn
to turn a frozen teacher's half-resolution pyramid into its full-resolution one.

Per iteration, for the levels ``MODEL.AFI.LEVELS``:

1. teacher features of ``image`` (real, P^hr) and ``image_x0.5`` (P^lr), under no_grad;
2. fake = G(P^lr) — ONE G pass per level, through G's DDP wrapper;
3. D step: sum_l BCE(D(real), 1) + BCE(D(sg(fake)), 0), through D's DDP wrapper;
4. G step: sum_l adv_weight * BCE(D(fake), 1) + content_weight * L1(fake, real), with D's
   parameters frozen so the adversarial gradient reaches G but nothing touches D
   (``MODEL.AFI.ADV_GRAD_TO_G False`` reproduces the reference's detached term, B1 of
   docs/differences_from_reference.md).

Both networks have their own SGD optimiser and warm-up multi-step schedule (both stepped) and
their own checkpoints under ``OUTPUT_DIR/G_0`` and ``OUTPUT_DIR/D_0`` (model, optimizer,
scheduler, iteration, GradScaler; G's also the upsampler's kind and layout);
``resume_or_load(resume=True)`` restores both and continues.
"""

import logging
from typing import Dict

import torch
from torch import nn

from afigan.config import lr_key
from afigan.layers import generator_loss
from afigan.modeling.interpolator import LevelwiseGenerator, guided_levels
from afigan.modeling.necks import standalone_upsampler_from_config

from .adversarial import AdversarialTrainer, select
from .amp import backward_and_step
from .parallel import ddp

# LevelwiseGenerator and guided_levels live in afigan.modeling.interpolator (imported here too).
__all__ = ["Stage1Trainer", "build_generator"]

logger = logging.getLogger(__name__)


def build_generator(cfg) -> nn.Module:
    """G: the upsampler ``MODEL.AFI.INTERP`` of the neck (any learned kind, with its options), one
    shared or one per level (``MODEL.AFI.SHARED``), never frozen here: stage 1 trains it."""
    return standalone_upsampler_from_config(cfg, freeze=False, what="stage 1")


class Stage1Trainer(AdversarialTrainer):
    """Trains G (``model``) and D against the teacher; ``train()`` runs SOLVER.MAX_ITER iterations."""

    model_name = "G"
    checkpoint_dirs = ("G_0", "D_0")

    def __init__(self, cfg):
        generator = build_generator(cfg)
        super().__init__(cfg, generator)
        self.lr_key = lr_key("image", cfg.MODEL.AFI.SCALE_RATIO)
        self.G_ddp = ddp(LevelwiseGenerator(self.model))
        self.guides = None
        one = next(iter(generator.values())) if isinstance(generator, nn.ModuleDict) else generator
        if getattr(one, "guided", False):
            self.guides = guided_levels(self.levels)
            if not self.guides:
                raise ValueError(
                    f"MODEL.AFI.INTERP {cfg.MODEL.AFI.INTERP!r} is guided by the next finer level, and none of "
                    f"MODEL.AFI.LEVELS {list(self.levels)} has one; add levels above p2."
                )
            left_out = [l for l in self.levels if l not in self.guides]
            if left_out:
                logger.info(
                    "Stage 1: %r is guided by the next finer level; %s has none and is left out of the losses.",
                    cfg.MODEL.AFI.INTERP,
                    ", ".join(left_out),
                )
            self.levels = [l for l in self.levels if l in self.guides]
            getattr(self.D_loss, "module", self.D_loss).levels = self.levels  # DDP-wrapped or not

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
        """(real, low, guides): the teacher's pyramids of ``image`` and of its low-resolution twin,
        and for a guided G each level's finer low-resolution level (else None)."""
        real = select(self.teacher_pyramid(data, "image"), self.levels, "teacher")
        low_all = self.teacher_pyramid(data, self.lr_key)
        guides = None if self.guides is None else {l: low_all[f] for l, f in self.guides.items()}
        return real, select(low_all, self.levels, "teacher"), guides

    def g_step(self, real, fake, data_time: float = 0.0) -> Dict[str, torch.Tensor]:
        """One generator update (D frozen, so D's parameters and gradients stay untouched)."""
        a = self.cfg.MODEL.AFI
        with self.amp.autocast():
            g_losses = generator_loss(
                self.D,
                fake,
                real,
                self.levels,
                adv_weight=a.ADV_WEIGHT,
                content_weight=a.CONTENT_WEIGHT,
                adv_grad=a.ADV_GRAD_TO_G,
                run_d_on_real=a.LEGACY.RUN_D_ON_REAL_IN_G_STEP,
                patch_size=a.DIS.PATCH_SIZE,
            )
        self.write_metrics(g_losses, data_time, "G")
        backward_and_step(sum(g_losses.values()), self.optimizer, self.scaler)
        return g_losses

    def run_step(self):
        data, data_time = self.next_batch()
        real, low, guides = self.teacher_features(data)
        with self.amp.autocast():
            fake = self.G_ddp(low, guides)  # ONE G pass: its detached output feeds the D step
        self.d_step(real, fake, data_time)
        self.g_step(real, fake, data_time)
