"""What stages 1 and 2 share: a frozen teacher, a network trained against a feature patch
discriminator D, two optimisers and schedules, checkpoints for both, hooks, the D update.

Attribute names follow Detectron2's ``DefaultTrainer`` for the trained network (``model``,
``optimizer``, ``scheduler``, ``checkpointer``: G in stage 1, the AF extractor M in stage 2) and
add ``D``, ``optimizer_D``, ``scheduler_D``, ``checkpointer_D``. Subclasses set ``model_name``
(``"G"`` / ``"M"``: logged learning rate ``lr_<name>`` and total loss ``<name>_total_loss``) and
``checkpoint_dirs`` (the folders under OUTPUT_DIR of the network and of D), build the network,
and implement ``resume_or_load`` and ``run_step``.
"""

import logging
import os
import time
import weakref
from typing import Dict

import torch
from detectron2.engine import SimpleTrainer, TrainerBase, default_writers, hooks
from detectron2.solver import build_lr_scheduler, build_optimizer
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter
from torch import nn

from afigan.checkpoint import AFICheckpointer
from afigan.data.hr_lr_mapper import HRLRDatasetMapper
from afigan.data.loader import build_resumable_train_loader, load_train_dataset
from afigan.layers import FeaturePatchDiscriminator, discriminator_loss
from afigan.modeling.meta_arch import build_guide_model

from .amp import AMPPolicy, backward_and_step
from .hooks import (
    FinalCheckpointer,
    NamedLRScheduler,
    SeedEachIteration,
    TotalsPrinter,
    checkpoint_keep,
    non_finite_loss_error,
)
from .parallel import ddp
from .speed import compile_modules, to_memory_format, upsampler_modules

__all__ = [
    "AdversarialTrainer",
    "DiscriminatorLoss",
    "GradScalerState",
    "build_discriminator",
    "discriminator_cfg",
    "select",
]

logger = logging.getLogger(__name__)


def build_discriminator(cfg) -> FeaturePatchDiscriminator:
    """The feature patch discriminator D for ``MODEL.FPN.OUT_CHANNELS`` channels."""
    d = cfg.MODEL.AFI.DIS
    return FeaturePatchDiscriminator(
        cfg.MODEL.FPN.OUT_CHANNELS, norm=d.NORM, spectral_norm=d.SPECTRAL_NORM, base_width=d.BASE_WIDTH
    )


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

    def __init__(self, discriminator: nn.Module, levels, patch_size: int = 0):
        super().__init__()
        self.discriminator = discriminator
        self.levels = list(levels)
        self.patch_size = patch_size  # MODEL.AFI.DIS.PATCH_SIZE

    def forward(self, real: Dict[str, torch.Tensor], fake: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return discriminator_loss(self.discriminator, real, fake, self.levels, patch_size=self.patch_size)


def select(features: Dict[str, torch.Tensor], levels, what: str) -> Dict[str, torch.Tensor]:
    """The ``levels`` of a feature dict, or a KeyError naming the missing one."""
    missing = [l for l in levels if l not in features]
    if missing:
        raise KeyError(f"MODEL.AFI.LEVELS names {missing[0]!r}, but the {what} returns only {sorted(features)}.")
    return {l: features[l] for l in levels}


class GradScalerState:
    """A trainer's ``GradScaler`` (attribute ``attr``: ``scaler`` or ``scaler_D``) as a checkpointable,
    so a float16 run resumed after a kill keeps its loss scale. Read at each save and load (the
    attribute may be replaced after the checkpointer is built); without a scaler (float32, bfloat16)
    it saves ``{}``. A checkpoint without the entry (written before it existed, or without a
    scaler) leaves the scaler as it is: it starts again from its initial scale."""

    def __init__(self, trainer, attr: str):
        self._trainer, self._attr = weakref.proxy(trainer), attr  # the trainer owns the checkpointer

    def state_dict(self) -> Dict:
        scaler = getattr(self._trainer, self._attr)
        return scaler.state_dict() if scaler is not None else {}

    def load_state_dict(self, state: Dict) -> None:
        scaler = getattr(self._trainer, self._attr)
        if scaler is not None and state:
            scaler.load_state_dict(state)


class AdversarialTrainer(TrainerBase):
    """Base of the stage-1 and stage-2 trainers (see module docstring).

    ``data_loader`` is built on first use, from the start iteration that ``resume_or_load`` set
    (the training data set itself is loaded, and checked, in the constructor); assign any
    iterable of batches to it to train on other data.
    """

    model_name = "G"
    checkpoint_dirs = ("G_0", "D_0")
    freeze_dis_lr = False

    def __init__(self, cfg, model: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.device = torch.device(cfg.MODEL.DEVICE)
        self.levels = list(cfg.MODEL.AFI.LEVELS)
        self.teacher = build_guide_model(cfg)  # only the backbone of its checkpoint (a whole detector, usually)
        self.model = model.to(self.device)
        self.D = build_discriminator(cfg).to(self.device)
        to_memory_format(cfg, self.teacher, self.model, self.D)
        compile_modules(cfg, upsampler_modules(self.model) + [self.D], f"{self.model_name}'s upsampler and D")
        # Every forward whose parameter gradients must be synchronised goes through a DDP wrapper
        # (docs/differences_from_reference.md, B3). D's BatchNorm buffers are not broadcast
        # (afigan/engine/parallel.py): each rank's statistics follow its own images, as in the
        # reference (a broadcast at this wrapper's forward would not cover the G step's D pass, which
        # runs outside DDP and updates them again). Only the main process saves: rank 0's are kept.
        self.D_loss = ddp(DiscriminatorLoss(self.D, self.levels, cfg.MODEL.AFI.DIS.PATCH_SIZE))
        self.optimizer = build_optimizer(cfg, self.model)
        self.optimizer_D = build_optimizer(discriminator_cfg(cfg), self.D)
        self.scheduler = build_lr_scheduler(cfg, self.optimizer)
        self.scheduler_D = build_lr_scheduler(discriminator_cfg(cfg), self.optimizer_D)
        self.amp = AMPPolicy(cfg, self.device)
        self.scaler, self.scaler_D = self.amp.grad_scaler(), self.amp.grad_scaler()
        self.train_dataset = load_train_dataset(cfg)
        self._data_loader = self._batches = None
        model_dir, dis_dir = (os.path.join(cfg.OUTPUT_DIR, d) for d in self.checkpoint_dirs)
        self.checkpointer = AFICheckpointer(self.model, model_dir, optimizer=self.optimizer, scheduler=self.scheduler)
        self.checkpointer_D = AFICheckpointer(self.D, dis_dir, optimizer=self.optimizer_D, scheduler=self.scheduler_D)
        # Each network's GradScaler travels with its own checkpoint (stage 3 keeps its own, too).
        self.checkpointer.add_checkpointable("grad_scaler", GradScalerState(self, "scaler"))
        self.checkpointer_D.add_checkpointable("grad_scaler", GradScalerState(self, "scaler_D"))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        cfg = self.cfg
        ret = [
            hooks.IterationTimer(),
            SeedEachIteration(cfg.SEED),
            NamedLRScheduler(self.optimizer, self.scheduler, self.model_name),
            NamedLRScheduler(self.optimizer_D, self.scheduler_D, "D", enabled=not self.freeze_dis_lr),
        ]
        if comm.is_main_process():
            period, keep = cfg.SOLVER.CHECKPOINT_PERIOD, checkpoint_keep(cfg)
            ret += [
                FinalCheckpointer(self.checkpointer, period, max_iter=self.max_iter, max_to_keep=keep),
                FinalCheckpointer(self.checkpointer_D, period, max_iter=self.max_iter, max_to_keep=keep),
                hooks.PeriodicWriter(self.build_writers(), period=20),
            ]
        return ret

    def build_writers(self):
        """Detectron2's default writers (metrics.json, TensorBoard) with :class:`TotalsPrinter`
        on the console instead of ``CommonMetricPrinter``."""
        files = [
            w for w in default_writers(self.cfg.OUTPUT_DIR, self.max_iter) if not isinstance(w, CommonMetricPrinter)
        ]
        return [TotalsPrinter(self.max_iter)] + files

    def resume_both(self, stage: str) -> bool:
        """Resume the network and D from their last checkpoints if they exist; returns whether
        it did. The two must be at the same iteration."""
        if not self.checkpointer.has_checkpoint():
            return False
        if not self.checkpointer_D.has_checkpoint():
            raise FileNotFoundError(
                f"Cannot resume {stage}: {self.checkpointer.save_dir} has a checkpoint but "
                f"{self.checkpointer_D.save_dir} has none."
            )
        it_model = self.checkpointer.resume_or_load("", resume=True).get("iteration", -1)
        it_d = self.checkpointer_D.resume_or_load("", resume=True).get("iteration", -1)
        if it_model != it_d:
            model_dir, dis_dir = self.checkpoint_dirs
            raise ValueError(
                f"Cannot resume {stage}: {model_dir} is at iteration {it_model} but {dis_dir} at {it_d}; "
                f"point both last_checkpoint files at checkpoints of the same iteration."
            )
        self.start_iter = it_model + 1
        return True

    def train(self):
        super().train(self.start_iter, self.max_iter)

    @property
    def data_loader(self):
        if self._data_loader is None:
            self._data_loader = build_resumable_train_loader(
                self.cfg,
                HRLRDatasetMapper(self.cfg, is_train=True),
                start_iter=self.start_iter,
                dataset=self.train_dataset,
            )
        return self._data_loader

    @data_loader.setter
    def data_loader(self, loader):
        self._data_loader, self._batches = loader, None

    def next_batch(self):
        """The next training batch and the seconds spent waiting for it."""
        if self._batches is None:
            self._batches = iter(self.data_loader)
        t0 = time.perf_counter()
        data = next(self._batches)
        return data, time.perf_counter() - t0

    def write_metrics(self, losses: Dict[str, torch.Tensor], data_time: float, name: str) -> None:
        """Detectron2's ``SimpleTrainer.write_metrics`` (averaged over ranks; ``<name>_total_loss``
        and every term; FloatingPointError on a non-finite total). Called before the optimiser
        step, so a non-finite loss stops training before it reaches the weights."""
        try:
            SimpleTrainer.write_metrics(losses, data_time, self.iter, prefix=f"{name}_")
        except FloatingPointError:
            raise non_finite_loss_error(
                losses, self.iter, (self.checkpointer, self.checkpointer_D), f"{name} "
            ) from None

    def teacher_pyramid(self, data, image_key: str) -> Dict[str, torch.Tensor]:
        """The frozen teacher's pyramid of ``data[i][image_key]`` (under no_grad, and under autocast
        with AMP: the feature losses are computed in float32 all the same)."""
        with self.amp.autocast():
            return self.teacher(data, image_key)

    def d_step(self, real, fake, data_time: float = 0.0) -> Dict[str, torch.Tensor]:
        """One discriminator update on real vs detached fake features; returns its losses."""
        with self.amp.autocast():
            d_losses = self.D_loss(real, {k: v.detach() for k, v in fake.items()})
        self.write_metrics(d_losses, data_time, "D")
        backward_and_step(sum(d_losses.values()), self.optimizer_D, self.scaler_D)
        return d_losses
