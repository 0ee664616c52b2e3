"""What stages 1 and 2 share: a frozen teacher, a main network trained against a feature patch
discriminator D, two optimisers and schedules, checkpoints for both, hooks, the D update.

Subclasses set ``main_name`` ("G" / "M", for the logged learning rate), ``main_dir`` and
``dis_dir`` (checkpoint folders under OUTPUT_DIR), build the main network, and implement
``resume_or_load`` and ``run_step``.
"""
import os
import time
from typing import Dict

import torch
from torch import nn

from detectron2.engine import TrainerBase, hooks
from detectron2.solver import build_lr_scheduler, build_optimizer
from detectron2.utils import comm

from afigan.checkpoint import AFICheckpointer
from afigan.data.hr_lr_mapper import HRLRDatasetMapper
from afigan.data.loader import build_resumable_train_loader
from afigan.layers import FeaturePatchDiscriminator, discriminator_loss
from afigan.modeling.meta_arch.teacher import build_guide_model

from .common import (GradScalerOrNone, NamedLRScheduler, SeedEachIteration, backward_and_step, check_finite,
                     default_writers, wrap_ddp)

__all__ = ["AdversarialTrainer", "DiscriminatorLoss", "build_discriminator", "discriminator_cfg", "select"]


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


class DiscriminatorLoss(nn.Module):
    """The discriminator loss of all levels in one forward (one DDP call per step)."""

    def __init__(self, discriminator: nn.Module, levels):
        super().__init__()
        self.discriminator = discriminator
        self.levels = list(levels)

    def forward(self, real: Dict[str, torch.Tensor], fake: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return discriminator_loss(self.discriminator, real, fake, self.levels)


def select(features: Dict[str, torch.Tensor], levels, what: str) -> Dict[str, torch.Tensor]:
    """The ``levels`` of a feature dict, or a KeyError naming the missing one."""
    missing = [l for l in levels if l not in features]
    if missing:
        raise KeyError(f"MODEL.AFI.LEVELS names {missing[0]!r}, but the {what} returns only {sorted(features)}.")
    return {l: features[l] for l in levels}


class AdversarialTrainer(TrainerBase):
    """Base of the stage-1 and stage-2 trainers (see module docstring)."""

    main_name = "G"
    main_dir = "G_0"
    dis_dir = "D_0"
    freeze_dis_lr = False

    def __init__(self, cfg, main: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.device = torch.device(cfg.MODEL.DEVICE)
        self.levels = list(cfg.MODEL.AFI.LEVELS)
        self.teacher = build_guide_model(cfg)
        self.main = main.to(self.device)
        self.D = build_discriminator(cfg).to(self.device)
        # Every forward whose parameter gradients must be synchronised goes through a DDP wrapper (fixes B3).
        self.D_loss = wrap_ddp(DiscriminatorLoss(self.D, self.levels))
        self.optimizer_main = build_optimizer(cfg, self.main)
        self.optimizer_D = build_optimizer(discriminator_cfg(cfg), self.D)
        self.scheduler_main = build_lr_scheduler(cfg, self.optimizer_main)
        self.scheduler_D = build_lr_scheduler(discriminator_cfg(cfg), self.optimizer_D)
        self.amp = GradScalerOrNone(cfg, self.device)
        self.scaler_main, self.scaler_D = self.amp.scaler(), self.amp.scaler()
        self.data_loader = build_resumable_train_loader(cfg, HRLRDatasetMapper(cfg, is_train=True))
        self._data_iter = None
        self.checkpointer_main = AFICheckpointer(self.main, os.path.join(cfg.OUTPUT_DIR, self.main_dir),
                                                 optimizer=self.optimizer_main, scheduler=self.scheduler_main)
        self.checkpointer_D = AFICheckpointer(self.D, os.path.join(cfg.OUTPUT_DIR, self.dis_dir),
                                              optimizer=self.optimizer_D, scheduler=self.scheduler_D)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        cfg = self.cfg
        ret = [
            hooks.IterationTimer(),
            SeedEachIteration(cfg.SEED),
            NamedLRScheduler(self.optimizer_main, self.scheduler_main, self.main_name),
            NamedLRScheduler(self.optimizer_D, self.scheduler_D, "D", enabled=not self.freeze_dis_lr),
        ]
        if comm.is_main_process():
            ret += [
                hooks.PeriodicCheckpointer(self.checkpointer_main, cfg.SOLVER.CHECKPOINT_PERIOD, max_iter=self.max_iter),
                hooks.PeriodicCheckpointer(self.checkpointer_D, cfg.SOLVER.CHECKPOINT_PERIOD, max_iter=self.max_iter),
                hooks.PeriodicWriter(default_writers(cfg.OUTPUT_DIR, self.max_iter), period=20),
            ]
        return ret

    def resume_both(self, stage: str) -> bool:
        """Resume the main network and D from their last checkpoints if they exist; returns
        whether it did. The two must be at the same iteration."""
        if not self.checkpointer_main.has_checkpoint():
            return False
        if not self.checkpointer_D.has_checkpoint():
            raise FileNotFoundError(
                f"Cannot resume {stage}: {self.checkpointer_main.save_dir} has a checkpoint but {self.checkpointer_D.save_dir} has none."
            )
        it_main = self.checkpointer_main.resume_or_load("", resume=True).get("iteration", -1)
        it_d = self.checkpointer_D.resume_or_load("", resume=True).get("iteration", -1)
        if it_main != it_d:
            raise ValueError(
                f"Cannot resume {stage}: {self.main_dir} is at iteration {it_main} but {self.dis_dir} at {it_d}; "
                f"point both last_checkpoint files at checkpoints of the same iteration."
            )
        self.start_iter = it_main + 1
        return True

    def train(self):
        super().train(self.start_iter, self.max_iter)

    def next_batch(self):
        """The next training batch and the seconds spent waiting for it."""
        if self._data_iter is None:
            self._data_iter = iter(self.data_loader)
        t0 = time.perf_counter()
        data = next(self._data_iter)
        return data, time.perf_counter() - t0

    def d_step(self, real, fake) -> Dict[str, torch.Tensor]:
        """One discriminator update on real vs detached fake features; returns its losses."""
        with self.amp.autocast():
            d_losses = self.D_loss(real, {k: v.detach() for k, v in fake.items()})
        check_finite(d_losses, self.iter)
        backward_and_step(sum(d_losses.values()), self.optimizer_D, self.scaler_D)
        return d_losses
