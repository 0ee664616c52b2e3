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
scheduler, iteration); ``resume_or_load(resume=True)`` restores both and continues.
"""

import logging
from typing import Dict, Optional

import torch
from torch import nn

from afigan.checkpoint import UPSAMPLER_TAG, UpsamplerTag
from afigan.config import lr_key
from afigan.layers import generator_loss
from afigan.modeling.necks import standalone_upsampler_from_config

from .adversarial import AdversarialTrainer, select
from .common import backward_and_step, ddp

__all__ = ["Stage1Trainer", "build_generator", "LevelwiseGenerator", "guided_levels"]

logger = logging.getLogger(__name__)


def build_generator(cfg) -> nn.Module:
    """G: the upsampler ``MODEL.AFI.INTERP`` of the neck (any learned kind, with its options), one
    shared or one per level (``MODEL.AFI.SHARED``), never frozen here: stage 1 trains it."""
    return standalone_upsampler_from_config(cfg, freeze=False, what="stage 1")


def guided_levels(levels) -> Dict[str, str]:
    """``{level: finer level}`` for the levels that have a finer one (``p3 -> p2``, ...); a
    guided upsampler is trained only on these (``p2`` has no finer level)."""
    # The teacher's pyramid has every level from p2 up, so each level above p2 has its finer one.
    return {l: f"p{int(l[1:]) - 1}" for l in levels if int(l[1:]) > 2}


class LevelwiseGenerator(nn.Module):
    """Runs G on every level in a single forward, so DDP sees one call per step.
    {"p2": (N, C, h, w), ...} -> {"p2": (N, C, 2h, 2w), ...}. ``generator`` is one shared
    upsampler or an ``nn.ModuleDict`` with one per level. A guided upsampler (FADE) gets, for
    level l, the low-resolution pyramid's finer level l-1 (``guides``), which has the target's
    size (never the target itself); levels without a guide are left out of the result."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def _for(self, level: str) -> nn.Module:
        return self.generator[level] if isinstance(self.generator, nn.ModuleDict) else self.generator

    def forward(
        self, features: Dict[str, torch.Tensor], guides: Optional[Dict[str, torch.Tensor]] = None
    ) -> Dict[str, torch.Tensor]:
        if guides is None:
            return {k: self._for(k)(v) for k, v in features.items()}
        return {
            k: self._for(k)(v, output_size=guides[k].shape[-2:], guide=guides[k])
            for k, v in features.items()
            if k in guides
        }


class Stage1Trainer(AdversarialTrainer):
    """Trains G (``model``) and D against the teacher; ``train()`` runs SOLVER.MAX_ITER iterations."""

    model_name = "G"
    checkpoint_dirs = ("G_0", "D_0")

    def __init__(self, cfg):
        generator = build_generator(cfg)
        super().__init__(cfg, generator)
        self.lr_key = lr_key("image", cfg.MODEL.AFI.SCALE_RATIO)
        self.G_ddp = ddp(LevelwiseGenerator(self.model))
        # Every G checkpoint says which upsampler it holds (only AFI's key names would tell).
        self.checkpointer.add_checkpointable(UPSAMPLER_TAG, UpsamplerTag(cfg.MODEL.AFI.INTERP, cfg.MODEL.AFI.SHARED))
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
