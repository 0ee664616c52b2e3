"""The detector trainer: stage 3 (the target detector), stage 0 (the nearest-neighbour teacher)
and ``run_net`` (training and ``--eval-only`` evaluation of any detector config).

A Detectron2 ``DefaultTrainer`` with:

* loading order (non-resume): ``MODEL.WEIGHTS`` (e.g. ImageNet), then ONLY the interpolator
  tensors of ``MODEL.AF_EXTRACTOR_WEIGHTS`` (a stage-2 checkpoint, a stage-1 G file or a
  released detector) into ``backbone.srf_module``; on ``--resume`` with a checkpoint in
  ``OUTPUT_DIR`` everything comes from it, and without one the non-resume path runs
  (docs/differences_from_reference.md, B8);
* a working ``test`` with Detectron2's ``COCOEvaluator`` at ``TEST.EVAL_PERIOD`` and at the end
  (B5 there), as :class:`afigan.engine.evaluation.AFICOCOEvaluator`: masks ranked by their mask
  scores with ``MODEL.MASKIOU_ON`` (CenterMask), COCO-server zips on annotation-free sets
  (test-dev); with ``TEST.AUG.ENABLED`` also a test-time-augmented evaluation at the end of
  training and in ``--eval-only`` (results under ``<task>_TTA``, files in ``inference_TTA/``), as
  Detectron2's ``tools/train_net.py`` does, for R-CNN detectors and FCOS / CenterMask
  (:func:`afigan.modeling.test_time_augmentation.build_tta_model`);
* a resumable data stream (same batches after a resume), atomic checkpoints, readable errors.
"""

import logging
import os
import time
import weakref
from collections import OrderedDict

import torch
from detectron2.data import build_detection_test_loader
from detectron2.engine import DefaultTrainer, SimpleTrainer, TrainerBase, hooks
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from afigan.checkpoint import AFICheckpointer, PartialLoad, load_interpolator_weights
from afigan.data.hr_lr_mapper import FileCheckingDatasetMapper
from afigan.data.loader import build_resumable_train_loader, check_dataset_names, dataset_errors, load_train_dataset
from afigan.modeling.test_time_augmentation import build_tta_model

from .amp import AMPPolicy, float32_losses
from .errors import require_file
from .evaluation import AFICOCOEvaluator
from .hooks import FinalCheckpointer, SeedEachIteration, checkpoint_keep, non_finite_loss_error
from .parallel import ddp
from .speed import compile_modules, to_memory_format, upsampler_modules

__all__ = ["DetectorTrainer", "StepTrainer", "AutocastTrainer"]

logger = logging.getLogger(__name__)


class StepTrainer(SimpleTrainer):
    """Detectron2's ``SimpleTrainer`` (its float32 step unchanged) whose non-finite-loss error
    names the loss terms and the last good checkpoint (:func:`afigan.engine.hooks.non_finite_loss_error`)
    of ``checkpointers``."""

    checkpointers = ()

    # Detectron2 checks the losses inside the private _write_metrics of its run_step (before the
    # optimiser step) and has no public hook to word that error; this is the one private method
    # overridden (tests/engine/test_detectron2_contract.py pins how run_step calls it).
    def _write_metrics(self, loss_dict, data_time, prefix="", iter=None):
        try:
            super()._write_metrics(loss_dict, data_time, prefix, iter)
        except FloatingPointError:
            at = self.iter if iter is None else iter
            raise non_finite_loss_error(loss_dict, at, self.checkpointers, prefix) from None


class AutocastTrainer(StepTrainer):
    """The step with the forward under ``torch.autocast`` of an :class:`AMPPolicy` (bfloat16 on a
    CPU, or on CUDA; a ``GradScaler`` for float16) and the losses in float32. Detectron2's
    ``AMPTrainer`` asserts CUDA and cannot be told the device, so its run_step is repeated here
    with those two changes; its checkpoint entry ``grad_scaler`` is kept for float16."""

    def __init__(self, model, data_loader, optimizer, amp: AMPPolicy, **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.amp = amp
        self.grad_scaler = amp.grad_scaler()

    def run_step(self):
        assert self.model.training, "[AutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        with self.amp.autocast():
            loss_dict = self.model(data)
        loss_dict = float32_losses(loss_dict if isinstance(loss_dict, dict) else {"total_loss": loss_dict})
        losses = sum(loss_dict.values())
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        (self.grad_scaler.scale(losses) if self.grad_scaler is not None else losses).backward()
        self.after_backward()
        if self.async_write_metrics:
            self.concurrent_executor.submit(self._write_metrics, loss_dict, data_time, iter=self.iter)
        else:
            self._write_metrics(loss_dict, data_time)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    def state_dict(self):
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])


class DetectorTrainer(DefaultTrainer):
    """Trains any registered detector (heads and afigan neck from the cfg) with an initialised
    interpolator; ``test(cfg, model)`` runs COCO evaluation on every ``DATASETS.TEST``.

    Built on DefaultTrainer's public extension points (``build_model``, ``build_hooks``,
    ``build_train_loader``, ``build_test_loader``, ``build_evaluator``, ``resume_or_load``,
    ``train``). The training loader is built when ``train()`` starts, from the start iteration
    that ``resume_or_load`` set (the data set itself is loaded, and checked, in the constructor).
    """

    checkpoint_dirs = ("",)

    def __init__(self, cfg):
        # DefaultTrainer.__init__'s steps, because two of them cannot be told otherwise: its
        # create_ddp_model fills device_ids with the local rank, which DDP rejects for a CPU module
        # (multi-process CPU runs use gloo), and it picks AMPTrainer, which asserts CUDA. Here also
        # the checkpointer writes atomically and the loader comes later. The attributes it must set
        # are pinned by tests/engine/test_detectron2_contract.py.
        TrainerBase.__init__(self)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        self.train_dataset = load_train_dataset(cfg)
        model = ddp(model)
        amp = AMPPolicy(cfg, torch.device(cfg.MODEL.DEVICE))
        self._trainer = (
            AutocastTrainer(model, None, optimizer, amp) if amp.enabled else StepTrainer(model, None, optimizer)
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AFICheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self._trainer.checkpointers = [self.checkpointer]
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg):
        """Detectron2's model, in channels_last with ``MODEL.AFI.CHANNELS_LAST`` and with its neck's
        upsampler compiled with ``MODEL.AFI.COMPILE`` (afigan/engine/speed.py)."""
        model = super().build_model(cfg)
        to_memory_format(cfg, model)
        compile_modules(cfg, upsampler_modules(model), "the neck's upsampler")
        return model

    def build_hooks(self):
        ret = super().build_hooks()
        # DefaultTrainer's checkpoint hook, with SOLVER.CHECKPOINT_KEEP and no periodic copy of the final file.
        ret = [
            FinalCheckpointer(
                self.checkpointer,
                self.cfg.SOLVER.CHECKPOINT_PERIOD,
                max_iter=self.max_iter,
                max_to_keep=checkpoint_keep(self.cfg),
            )
            if isinstance(h, hooks.PeriodicCheckpointer)
            else h
            for h in ret
        ]
        if self.cfg.TEST.AUG.ENABLED:
            build_tta_model(self.cfg, self.model)  # a detector kind without TTA stops now, not after training

            def tta_and_save_results():
                res = self.test_with_TTA(self.cfg, self.model)
                self._last_eval_results = OrderedDict(getattr(self, "_last_eval_results", None) or {}, **res)
                return res

            # Right after the plain evaluation, before the writers, as tools/train_net.py's hook (at the end only).
            at = next(i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook)) + 1
            ret.insert(at, hooks.EvalHook(0, tta_and_save_results))
        return [SeedEachIteration(self.cfg.SEED)] + ret

    def resume_or_load(self, resume: bool = True):
        cfg = self.cfg.MODEL
        if resume and self.checkpointer.has_checkpoint():
            super().resume_or_load(resume=True)
        else:
            if cfg.WEIGHTS:
                # With MODEL.AF_EXTRACTOR_WEIGHTS the interpolator comes from that file next.
                partial = (
                    PartialLoad("the detector (MODEL.WEIGHTS)", ("backbone.srf_module",))
                    if cfg.AF_EXTRACTOR_WEIGHTS
                    else None
                )
                self.checkpointer.load(cfg.WEIGHTS, checkpointables=[], partial=partial)
            if cfg.AF_EXTRACTOR_WEIGHTS:
                load_interpolator_weights(
                    self.model, require_file(cfg.AF_EXTRACTOR_WEIGHTS, "MODEL.AF_EXTRACTOR_WEIGHTS")
                )
            self.start_iter = 0

    def train(self):
        if self.data_loader is None:
            self.data_loader = self.build_train_loader(self.cfg, self.start_iter, self.train_dataset)
        return super().train()

    @classmethod
    def build_train_loader(cls, cfg, start_iter: int = 0, dataset=None):
        return build_resumable_train_loader(
            cfg, FileCheckingDatasetMapper(cfg, True), start_iter=start_iter, dataset=dataset
        )

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        check_dataset_names([dataset_name], "DATASETS.TEST")
        with dataset_errors([dataset_name], "DATASETS.TEST"):
            return build_detection_test_loader(cfg, dataset_name, mapper=FileCheckingDatasetMapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        # MaskIoU-rescored masks (CenterMask) are ranked by their mask scores in segm AP; a test-dev
        # submission is named after the run's folder (the server's [alg] field).
        return AFICOCOEvaluator(
            dataset_name,
            output_dir=output_folder,
            use_mask_scores=cfg.MODEL.MASK_ON and cfg.MODEL.MASKIOU_ON,
            submission_alg=os.path.basename(os.path.normpath(cfg.OUTPUT_DIR)),
        )

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Evaluate with test-time augmentation (``TEST.AUG.*``): Detectron2's ``GeneralizedRCNNWithTTA``
        for R-CNN detectors, :class:`afigan.modeling.test_time_augmentation.OneStageWithTTA` for
        FCOS and CenterMask."""
        logger.info(
            "Running inference with test-time augmentation (TEST.AUG: min sizes %s, max size %d, flip %s) ...",
            tuple(cfg.TEST.AUG.MIN_SIZES),
            cfg.TEST.AUG.MAX_SIZE,
            cfg.TEST.AUG.FLIP,
        )
        model = build_tta_model(cfg, model)
        evaluators = [
            cls.build_evaluator(cfg, name, os.path.join(cfg.OUTPUT_DIR, "inference_TTA", name))
            for name in cfg.DATASETS.TEST
        ]
        res = cls.test(cfg, model, evaluators)
        return OrderedDict({k + "_TTA": v for k, v in res.items()})

    @classmethod
    def evaluate(cls, cfg, model):
        """``test`` (plus TTA when ``TEST.AUG.ENABLED``) and Detectron2's ``verify_results``."""
        res = cls.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(cls.test_with_TTA(cfg, model))
        verify_results(cfg, res)
        return res
