"""Stage 2, the multi-scale AF extractor (spec §8).

A detector M whose neck upsamples with G (``GeneralizedRCNN_AFExtractor``) is trained on the
low-resolution twin ``image_x0.5`` with its boxes, while its pyramid features are pulled towards
the frozen teacher's full-resolution features downsampled x0.5 (L1) and D keeps judging them:

    L_M = L_det + sum_l [adv_weight * BCE(D(A_l), 1) + content_weight * L1(A_l, T_l)]
    L_D = sum_l [BCE(D(T_l), 1) + BCE(D(sg(A_l)), 0)]

with ONE forward of M per step returning (losses, features). Initialisation (non-resume):
``MODEL.WEIGHTS`` into M, then the stage-1 G (``MODEL.AFI_GEN_WEIGHTS``) into
``backbone.srf_module``, and the stage-1 D (``MODEL.AFI_DIS_WEIGHTS``, model tensors only). D's
scheduler steps (``MODEL.AFI.LEGACY.FROZEN_DIS_LR`` keeps it at its warm-up value, oddity O3).
Checkpoints: ``OUTPUT_DIR/AFExtractor`` (M) and ``OUTPUT_DIR/Disc`` (D); resume restores both.
"""
import logging
import os
import time
from typing import Dict

import torch
from torch.nn import functional as F

from detectron2.engine import TrainerBase, hooks
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler, build_optimizer
from detectron2.utils import comm

from afigan.checkpoint import AFICheckpointer, load_interpolator_weights, read_checkpoint
from afigan.data.hr_lr_mapper import HRLRDatasetMapper
from afigan.data.loader import build_resumable_train_loader
from afigan.layers import generator_loss
from afigan.modeling.meta_arch.teacher import build_guide_model

from .common import (GradScalerOrNone, wrap_ddp, NamedLRScheduler, SeedEachIteration, backward_and_step, check_finite, default_writers,
                     require_file, write_metrics)
from .stage1 import DiscriminatorLoss, build_discriminator, discriminator_cfg, select

__all__ = ["Stage2Trainer", "downsample_targets"]

logger = logging.getLogger(__name__)


def downsample_targets(features: Dict[str, torch.Tensor], mode: str = "nearest") -> Dict[str, torch.Tensor]:
    """Teacher HR features x0.5: "nearest" keeps even rows/columns (reference, O2), "avg" pools 2x2."""
    if mode == "nearest":
        return {k: F.interpolate(v, scale_factor=0.5, mode="nearest") for k, v in features.items()}
    if mode == "avg":
        return {k: F.avg_pool2d(v, 2, ceil_mode=True) for k, v in features.items()}
    raise ValueError(f"MODEL.AFI.TARGET_DOWNSAMPLE must be 'nearest' or 'avg', got {mode!r}.")


class Stage2Trainer(TrainerBase):
    """Trains the AF extractor M and D; ``train()`` runs SOLVER.MAX_ITER iterations."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN_AFExtractor":
            raise ValueError(f"Stage 2 needs MODEL.META_ARCHITECTURE 'GeneralizedRCNN_AFExtractor', got {cfg.MODEL.META_ARCHITECTURE!r}.")
        self.cfg = cfg
        self.device = torch.device(cfg.MODEL.DEVICE)
        self.levels = list(cfg.MODEL.AFI.LEVELS)
        self.teacher = build_guide_model(cfg)
        self.model = build_model(cfg)
        self.D = build_discriminator(cfg).to(self.device)
        self.model_ddp = wrap_ddp(self.model, broadcast_buffers=False)
        self.D_loss = wrap_ddp(DiscriminatorLoss(self.D, self.levels), broadcast_buffers=False)
        self.optimizer = build_optimizer(cfg, self.model)
        self.optimizer_D = build_optimizer(discriminator_cfg(cfg), self.D)
        self.scheduler = build_lr_scheduler(cfg, self.optimizer)
        self.scheduler_D = build_lr_scheduler(discriminator_cfg(cfg), self.optimizer_D)
        self.amp = GradScalerOrNone(cfg, self.device)
        self.scaler, self.scaler_D = self.amp.scaler(), self.amp.scaler()
        self.data_loader = build_resumable_train_loader(cfg, HRLRDatasetMapper(cfg, is_train=True))
        self._data_iter = None
        self.checkpointer = AFICheckpointer(self.model, os.path.join(cfg.OUTPUT_DIR, "AFExtractor"),
                                            optimizer=self.optimizer, scheduler=self.scheduler)
        self.checkpointer_D = AFICheckpointer(self.D, os.path.join(cfg.OUTPUT_DIR, "Disc"),
                                              optimizer=self.optimizer_D, scheduler=self.scheduler_D)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        cfg = self.cfg
        ret = [
            hooks.IterationTimer(),
            SeedEachIteration(cfg.SEED),
            NamedLRScheduler(self.optimizer, self.scheduler, "M"),
            NamedLRScheduler(self.optimizer_D, self.scheduler_D, "D", enabled=not cfg.MODEL.AFI.LEGACY.FROZEN_DIS_LR),
        ]
        if comm.is_main_process():
            ret += [
                hooks.PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, max_iter=self.max_iter),
                hooks.PeriodicCheckpointer(self.checkpointer_D, cfg.SOLVER.CHECKPOINT_PERIOD, max_iter=self.max_iter),
                hooks.PeriodicWriter(default_writers(cfg.OUTPUT_DIR, self.max_iter), period=20),
            ]
        return ret

    def resume_or_load(self, resume: bool = True) -> None:
        """Resume M and D from their last checkpoints when ``resume`` and they exist (fixes B8);
        otherwise initialise from MODEL.WEIGHTS, MODEL.AFI_GEN_WEIGHTS and MODEL.AFI_DIS_WEIGHTS."""
        cfg = self.cfg.MODEL
        if resume and self.checkpointer.has_checkpoint():
            it_m = self.checkpointer.resume_or_load("", resume=True).get("iteration", -1)
            if not self.checkpointer_D.has_checkpoint():
                raise FileNotFoundError(
                    f"Cannot resume stage 2: {self.checkpointer.save_dir} has a checkpoint but {self.checkpointer_D.save_dir} has none."
                )
            it_d = self.checkpointer_D.resume_or_load("", resume=True).get("iteration", -1)
            if it_m != it_d:
                raise ValueError(f"Cannot resume stage 2: AFExtractor is at iteration {it_m} but Disc at {it_d}.")
            self.start_iter = it_m + 1
        else:
            if cfg.WEIGHTS:
                self.checkpointer.load(cfg.WEIGHTS, checkpointables=[])
            load_interpolator_weights(self.model, require_file(cfg.AFI_GEN_WEIGHTS, "MODEL.AFI_GEN_WEIGHTS"),
                                      what="MODEL.AFI_GEN_WEIGHTS")
            # Only D's tensors: stage 2 has its own optimiser and schedule (and the stage-1 file
            # need not carry optimizer/scheduler/iteration entries, bug B8).
            d_state = read_checkpoint(require_file(cfg.AFI_DIS_WEIGHTS, "MODEL.AFI_DIS_WEIGHTS"), "MODEL.AFI_DIS_WEIGHTS")["model"]
            self.D.load_state_dict(d_state, strict=True)
            self.start_iter = 0
        self.data_loader.dataset.start_iter = self.start_iter

    def train(self):
        logger.info("Stage 2: training the AF extractor from iteration %d to %d.", self.start_iter, self.max_iter)
        super().train(self.start_iter, self.max_iter)

    def run_step(self):
        if self._data_iter is None:
            self._data_iter = iter(self.data_loader)
        t0 = time.perf_counter()
        data = next(self._data_iter)
        data_time = time.perf_counter() - t0
        a = self.cfg.MODEL.AFI
        targets = downsample_targets(select(self.teacher(data, "image"), self.levels, "teacher"), a.TARGET_DOWNSAMPLE)
        with self.amp.autocast():
            det_losses, features = self.model_ddp(data)
            fake = select(features, self.levels, "AF extractor's neck")
            d_losses = self.D_loss(targets, {k: v.detach() for k, v in fake.items()})
        check_finite(d_losses, self.iter)
        backward_and_step(sum(d_losses.values()), self.optimizer_D, self.scaler_D)

        with self.amp.autocast():
            g_losses = generator_loss(self.D, fake, targets, self.levels, adv_weight=a.ADV_WEIGHT,
                                      content_weight=a.CONTENT_WEIGHT, adv_grad=a.ADV_GRAD_TO_G)
        m_losses = {**det_losses, **g_losses}
        check_finite(m_losses, self.iter)
        backward_and_step(sum(m_losses.values()), self.optimizer, self.scaler)

        losses = {**d_losses, **m_losses}
        losses["loss_D"] = sum(d_losses.values()).detach()
        losses["loss_M"] = sum(m_losses.values()).detach()
        write_metrics(self.storage, losses, data_time=data_time)
