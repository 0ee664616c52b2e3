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
import os
import time
from typing import Dict, Sequence

import torch
from torch import nn

from detectron2.engine import TrainerBase, hooks
from detectron2.solver import build_lr_scheduler, build_optimizer
from detectron2.utils import comm

from afigan.checkpoint import AFICheckpointer
from afigan.data.hr_lr_mapper import HRLRDatasetMapper, lr_key
from afigan.data.loader import build_resumable_train_loader
from afigan.layers import AFInterpolator, FeaturePatchDiscriminator, discriminator_loss, generator_loss
from afigan.modeling.meta_arch.teacher import build_guide_model

from .common import (GradScalerOrNone, wrap_ddp, NamedLRScheduler, SeedEachIteration, backward_and_step, check_finite, default_writers,
                     write_metrics)

__all__ = ["Stage1Trainer", "build_generator", "build_discriminator", "LevelwiseGenerator", "DiscriminatorLoss"]

logger = logging.getLogger(__name__)


def build_generator(cfg) -> AFInterpolator:
    """The AF interpolator G with ``MODEL.FPN.OUT_CHANNELS`` channels and ``MODEL.AFI.*`` sizes."""
    a = cfg.MODEL.AFI
    return AFInterpolator(cfg.MODEL.FPN.OUT_CHANNELS, a.NUM_BLOCKS, a.GROWTH, a.RES_SCALE, a.SKIP)


def build_discriminator(cfg) -> FeaturePatchDiscriminator:
    """The feature patch discriminator D for ``MODEL.FPN.OUT_CHANNELS`` channels."""
    d = cfg.MODEL.AFI.DIS
    return FeaturePatchDiscriminator(cfg.MODEL.FPN.OUT_CHANNELS, norm=d.NORM, spectral_norm=d.SPECTRAL_NORM,
                                     base_width=d.BASE_WIDTH)


def discriminator_cfg(cfg):
    """cfg whose SOLVER.BASE_LR is D's (``MODEL.AFI.DIS.BASE_LR`` when > 0)."""
    if cfg.MODEL.AFI.DIS.BASE_LR <= 0:
        return cfg
    c = cfg.clone()
    c.defrost()
    c.SOLVER.BASE_LR = cfg.MODEL.AFI.DIS.BASE_LR
    return c


class LevelwiseGenerator(nn.Module):
    """Runs one G on every level in a single forward, so DDP sees one call per step.
    {"p2": (N, C, h, w), ...} -> {"p2": (N, C, 2h, 2w), ...}."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {k: self.generator(v) for k, v in features.items()}


class DiscriminatorLoss(nn.Module):
    """The discriminator loss of all levels in one forward (one DDP call per step)."""

    def __init__(self, discriminator: nn.Module, levels: Sequence[str]):
        super().__init__()
        self.discriminator = discriminator
        self.levels = list(levels)

    def forward(self, real: Dict[str, torch.Tensor], fake: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return discriminator_loss(self.discriminator, real, fake, self.levels)


def select(features: Dict[str, torch.Tensor], levels: Sequence[str], what: str) -> Dict[str, torch.Tensor]:
    missing = [l for l in levels if l not in features]
    if missing:
        raise KeyError(f"MODEL.AFI.LEVELS names {missing[0]!r}, but the {what} returns only {sorted(features)}.")
    return {l: features[l] for l in levels}


class Stage1Trainer(TrainerBase):
    """Trains G and D against the teacher; ``train()`` runs SOLVER.MAX_ITER iterations."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.device = torch.device(cfg.MODEL.DEVICE)
        self.levels = list(cfg.MODEL.AFI.LEVELS)
        self.lr_key = lr_key("image", cfg.MODEL.AFI.SCALE_RATIO)
        self.teacher = build_guide_model(cfg)
        self.G = build_generator(cfg).to(self.device)
        self.D = build_discriminator(cfg).to(self.device)
        # DDP wrappers: every forward that needs synchronised gradients goes through them (fixes B3).
        self.G_ddp = wrap_ddp(LevelwiseGenerator(self.G), broadcast_buffers=False)
        self.D_loss = wrap_ddp(DiscriminatorLoss(self.D, self.levels), broadcast_buffers=False)
        self.optimizer_G = build_optimizer(cfg, self.G)
        self.optimizer_D = build_optimizer(discriminator_cfg(cfg), self.D)
        self.scheduler_G = build_lr_scheduler(cfg, self.optimizer_G)
        self.scheduler_D = build_lr_scheduler(discriminator_cfg(cfg), self.optimizer_D)
        self.amp = GradScalerOrNone(cfg, self.device)
        self.scaler_G, self.scaler_D = self.amp.scaler(), self.amp.scaler()
        self.data_loader = build_resumable_train_loader(cfg, HRLRDatasetMapper(cfg, is_train=True))
        self._data_iter = None
        self.checkpointer_G = AFICheckpointer(self.G, os.path.join(cfg.OUTPUT_DIR, "G_0"),
                                              optimizer=self.optimizer_G, scheduler=self.scheduler_G)
        self.checkpointer_D = AFICheckpointer(self.D, os.path.join(cfg.OUTPUT_DIR, "D_0"),
                                              optimizer=self.optimizer_D, scheduler=self.scheduler_D)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        cfg = self.cfg
        ret = [
            hooks.IterationTimer(),
            SeedEachIteration(cfg.SEED),
            NamedLRScheduler(self.optimizer_G, self.scheduler_G, "G"),
            NamedLRScheduler(self.optimizer_D, self.scheduler_D, "D"),
        ]
        if comm.is_main_process():
            ret += [
                hooks.PeriodicCheckpointer(self.checkpointer_G, cfg.SOLVER.CHECKPOINT_PERIOD, max_iter=self.max_iter),
                hooks.PeriodicCheckpointer(self.checkpointer_D, cfg.SOLVER.CHECKPOINT_PERIOD, max_iter=self.max_iter),
                hooks.PeriodicWriter(default_writers(cfg.OUTPUT_DIR, self.max_iter), period=20),
            ]
        return ret

    def resume_or_load(self, resume: bool = True) -> None:
        """Resume G and D from ``OUTPUT_DIR/{G_0,D_0}/last_checkpoint`` when ``resume`` and one
        exists; otherwise load ``MODEL.AFI_GEN_WEIGHTS`` / ``MODEL.AFI_DIS_WEIGHTS`` if given."""
        g = self.checkpointer_G.resume_or_load(self.cfg.MODEL.AFI_GEN_WEIGHTS, resume=resume)
        d = self.checkpointer_D.resume_or_load(self.cfg.MODEL.AFI_DIS_WEIGHTS, resume=resume)
        if resume and self.checkpointer_G.has_checkpoint():
            it_g, it_d = g.get("iteration", -1), d.get("iteration", -1)
            if it_g != it_d:
                raise ValueError(
                    f"Cannot resume stage 1: G_0 is at iteration {it_g} but D_0 at {it_d}; "
                    f"point both last_checkpoint files at checkpoints of the same iteration."
                )
            self.start_iter = it_g + 1
        self.data_loader.dataset.start_iter = self.start_iter

    def train(self):
        logger.info("Stage 1: training G and D from iteration %d to %d.", self.start_iter, self.max_iter)
        super().train(self.start_iter, self.max_iter)

    def next_batch(self):
        """The next training batch and the seconds spent waiting for it."""
        if self._data_iter is None:
            self._data_iter = iter(self.data_loader)
        t0 = time.perf_counter()
        data = next(self._data_iter)
        return data, time.perf_counter() - t0

    def teacher_features(self, data):
        """(real, low): the teacher's pyramids of ``image`` and of its low-resolution twin."""
        real = select(self.teacher(data, "image"), self.levels, "teacher")
        low = select(self.teacher(data, self.lr_key), self.levels, "teacher")
        return real, low

    def d_step(self, real, fake) -> Dict[str, torch.Tensor]:
        """One discriminator update on real vs detached fake features; returns its losses."""
        with self.amp.autocast():
            d_losses = self.D_loss(real, {k: v.detach() for k, v in fake.items()})
        check_finite(d_losses, self.iter)
        backward_and_step(sum(d_losses.values()), self.optimizer_D, self.scaler_D)
        return d_losses

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
