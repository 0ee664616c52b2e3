"""One training step of each stage (and of plain Detectron2) at reference sizes, timed and
FLOP-counted against the plain-convolution roofline of :mod:`.roofline`; and the D-patch ablation
(``MODEL.AFI.DIS.PATCH_SIZE`` on the toy stage 1)."""

import itertools
import os
import statistics
import tempfile
from typing import Callable, Dict, List

import torch
from detectron2.engine import DefaultTrainer
from detectron2.utils.events import EventStorage

from afigan.config import fallback_syncbn, load_config
from afigan.engine import DetectorTrainer, Stage1Trainer, Stage2Trainer
from afigan.modeling.meta_arch import build_guide_model

from .roofline import STEP_CONFIGS, VARIANTS, counted_flops, plain_conv, timed
from .timing import peak_memory
from .training import REFERENCE_SIZES, random_stage_inputs

__all__ = ["step_rows", "top_ops", "patch_ablation"]


def _cfg(config: str, opts: List[str], stage: str):
    """The stage's config with ``opts``, without Detectron2's default_setup (whose logging would bury
    the table; nothing is written but the random weights)."""
    cfg = load_config(config, opts)
    cfg.MODEL.AFI.STAGE = "" if stage == "plain" else stage
    fallback_syncbn(cfg)
    cfg.freeze()
    return cfg


def _trainer(stage: str, configs_dir: str, short_side: int, batch: int, variant: str, device: str):
    """A trainer of ``stage`` at reference sizes (R-50, 256-channel FPN, full G and D, Detectron2's
    Mask R-CNN heads) on the toy set resized to ``short_side``, with random weights for the
    teacher, G and D."""
    v = VARIANTS[variant]
    out = tempfile.mkdtemp(prefix=f"roofline_{stage}_")
    opts = [
        "OUTPUT_DIR",
        out,
        "MODEL.DEVICE",
        device,
        "SOLVER.IMS_PER_BATCH",
        str(batch),
        "SOLVER.MAX_ITER",
        "1000",
        "INPUT.MIN_SIZE_TRAIN",
        f"({short_side},)",
        "INPUT.MAX_SIZE_TRAIN",
        str(2 * short_side),
        "SOLVER.CHECKPOINT_PERIOD",
        "100000",
        "DATASETS.TEST",
        "()",
        "DATALOADER.NUM_WORKERS",
        "0",
        *REFERENCE_SIZES,
        # Detectron2's Mask R-CNN heads and sampling (the toy configs shrink them)
        "MODEL.ROI_BOX_HEAD.FC_DIM",
        "1024",
        "MODEL.ROI_MASK_HEAD.NUM_CONV",
        "4",
        "MODEL.ROI_MASK_HEAD.CONV_DIM",
        "256",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
        "512",
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE",
        "256",
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN",
        "2000",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN",
        "1000",
        "SOLVER.AMP.ENABLED",
        str(v["dtype"] != torch.float32),
        "SOLVER.AMP.PRECISION",
        "bfloat16" if v["dtype"] == torch.bfloat16 else "float16",
        "MODEL.AFI.CHANNELS_LAST",
        str(v["channels_last"]),
        "MODEL.AFI.DIS.PATCH_SIZE",
        str(v["patch"]),
        "MODEL.AFI.COMPILE",
        str(bool(v.get("compile"))),
    ]
    config = os.path.join(configs_dir, STEP_CONFIGS[stage])
    if stage in ("stage1", "stage2"):
        opts += random_stage_inputs(_cfg(config, opts, stage), stage, out)
    cfg = _cfg(config, opts, stage)
    trainer = {"stage1": Stage1Trainer, "stage2": Stage2Trainer, "stage3": DetectorTrainer, "plain": DefaultTrainer}[
        stage
    ](cfg)
    if stage != "plain":
        trainer.resume_or_load(resume=False)
    # Every timed step sees the same batch, the one whose FLOPs are counted (the toy images'
    # aspect ratios differ, so successive batches differ in size).
    loader = (
        trainer._trainer.data_loader
        if stage == "plain"
        else (trainer.build_train_loader(cfg) if stage == "stage3" else trainer.data_loader)
    )
    batch = next(iter(loader))
    same = itertools.repeat(batch)
    if stage in ("stage3", "plain"):
        trainer._trainer.data_loader = same
        trainer._trainer._data_loader_iter_obj = None
    else:
        trainer.data_loader = same
    trainer.iter = trainer.start_iter
    trainer.image_size = list(batch[0]["image"].shape[-2:])
    return trainer


def step_rows(
    stages: List[str],
    short_side: int,
    batch: int,
    variants: List[str],
    configs_dir: str,
    device: str,
    repeats: int,
    profile=(),
) -> List[Dict]:
    """One training step of each stage (and of plain Detectron2) per variant: seconds, FLOPs (forward
    and backward) and the ratio to the plain 3x3 conv fwd+bwd at P2 of the image; for the variants
    in ``profile`` also the step's top-10 operators."""
    rows = []
    p2 = (short_side // 4, (3 * short_side // 2) // 4)
    for variant in variants:
        v = VARIANTS[variant]
        ref = plain_conv(256, p2, device, v["dtype"], v["channels_last"], True, repeats)
        for stage in stages:
            if v["patch"] and stage not in ("stage1", "stage2"):
                continue  # D runs only in stages 1 and 2
            if stage == "plain" and variant != "fp32":
                continue  # Detectron2's own trainer knows none of the switches (and its AMP needs CUDA)
            torch.manual_seed(0)
            trainer = _trainer(stage, configs_dir, short_side, batch, variant, device)
            memory = {}  # peak MiB of the timed steps, on CUDA only
            with EventStorage(0) as trainer.storage:
                flops = counted_flops(trainer.run_step)  # also the warm-up call
                with peak_memory(device, memory, "peak_mem_mib"):
                    seconds = timed(trainer.run_step, repeats, device, warmup=0)
                ops = top_ops(trainer.run_step, device=device) if variant in profile else None
            row = dict(
                component=f"{stage} step",
                variant=variant,
                seconds=seconds,
                gflops=flops / 1e9,
                fvcore_gflops=None,
                gflops_per_s=flops / seconds / 1e9,
                plain_conv_gflops_per_s=ref["gflops_per_s"],
                short_side=short_side,
                batch=batch,
                image=trainer.image_size,
                **memory,
            )
            row["ratio_to_plain_conv"] = row["gflops_per_s"] / ref["gflops_per_s"]
            if ops is not None:
                row["top_ops"] = ops
            rows.append(row)
            del trainer
    return rows


def top_ops(fn: Callable[[], object], n: int = 10, device: str = "cpu") -> List[Dict]:
    """The ``n`` operators of ``fn`` with the most self time (``torch.profiler``; on CUDA, device time)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
    self_time = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)  # noqa: E731
    averages = prof.key_averages()
    total = sum(self_time(e) for e in averages) or 1.0
    return [
        dict(op=e.key, calls=e.count, self_ms=self_time(e) / 1e3, share=self_time(e) / total)
        for e in sorted(averages, key=self_time, reverse=True)[:n]
    ]


def patch_ablation(
    configs_dir: str, patch_sizes: List[int], iters: int, teacher: str, device: str, tail: int = 20
) -> List[Dict]:
    """``MODEL.AFI.DIS.PATCH_SIZE``'s effect: the toy stage 1 (configs/toy/pipeline/stage1.yaml)
    trained ``iters`` iterations from the same seed with each patch size; median seconds per
    iteration and the stage-1 content loss (sum over levels, mean of the last ``tail``
    iterations). ``teacher``: a teacher checkpoint; "" draws a random one (its FPN outputs scaled
    to O(1), as a trained teacher's are)."""
    rows = []
    out = tempfile.mkdtemp(prefix="roofline_patches_")
    config = os.path.join(configs_dir, STEP_CONFIGS["stage1"])
    if not teacher:
        cfg = _cfg(config, ["MODEL.DEVICE", device], "stage1")
        torch.manual_seed(0)
        state = build_guide_model(cfg, load_weights=False).state_dict()
        teacher = os.path.join(out, "teacher.pth")
        torch.save({"model": {k: v * 0.05 if "fpn_output" in k else v for k, v in state.items()}}, teacher)
    for size in patch_sizes:
        cfg = _cfg(
            config,
            [
                "OUTPUT_DIR",
                os.path.join(out, f"patch{size}"),
                "MODEL.DEVICE",
                device,
                "SOLVER.MAX_ITER",
                str(iters),
                "SOLVER.CHECKPOINT_PERIOD",
                "1000000",
                "MODEL.GUIDE_WEIGHTS",
                teacher,
                "SEED",
                "0",
                "MODEL.AFI.DIS.PATCH_SIZE",
                str(size),
            ],
            "stage1",
        )
        torch.manual_seed(0)
        trainer = Stage1Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        hist = trainer.storage.histories()
        content = [
            sum(v) for v in zip(*[[x for x, _ in hist[k].values()] for k in hist if k.startswith("loss_content_")])
        ]
        times = [x for x, _ in hist["time"].values()]
        rows.append(
            dict(
                patch_size=size,
                iters=iters,
                s_per_iter=statistics.median(times[2:] or times),
                content_loss=statistics.mean(content[-tail:]),
                content_loss_first=content[0],
                teacher=teacher,
            )
        )
    return rows
