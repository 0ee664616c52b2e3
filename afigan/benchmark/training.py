"""Training cost of each AFI-GAN stage and of plain Detectron2 training of the same detector
with a nearest-neighbour FPN: median seconds per iteration and peak memory. Each measurement runs
in its own process (tools/benchmark_training.py) so peak memory is that stage's alone."""

import argparse
import os
import resource
import statistics
import tempfile
from typing import Dict, List

import torch
from detectron2.engine import DefaultTrainer, HookBase

from afigan.engine import DetectorTrainer, Stage1Trainer, Stage2Trainer, setup_cfg
from afigan.engine.adversarial import build_discriminator
from afigan.engine.stage1 import build_generator
from afigan.modeling.meta_arch import build_guide_model

from .timing import Stopwatch, on_cuda

__all__ = ["BENCHMARK_CONFIGS", "REFERENCE_SIZES", "measure", "random_stage_inputs"]

# measured stage -> its toy config; "plain_nn" is Detectron2's own DefaultTrainer on the NN-FPN detector.
BENCHMARK_CONFIGS = {
    "stage1": "toy/pipeline/stage1.yaml",
    "stage2": "toy/pipeline/stage2.yaml",
    "stage3": "toy/pipeline/stage3.yaml",
    "plain_nn": "toy/pipeline/stage0.yaml",
}


class _Timer(HookBase):
    """Seconds of each step on the device's clock (CUDA events on a GPU: afigan/benchmark/timing.py)."""

    def __init__(self, device: str):
        self.times: List[float] = []
        self.watch = Stopwatch(device)

    def before_step(self):
        self.watch.start()

    def after_step(self):
        self.times.append(self.watch.stop())


# The paper's sizes over the toy configs: 256-channel FPN, 3 dense blocks, full-width D, R-50.
REFERENCE_SIZES = [
    "MODEL.FPN.OUT_CHANNELS", "256", "MODEL.AFI.NUM_BLOCKS", "3", "MODEL.AFI.GROWTH", "32",
    "MODEL.AFI.DIS.BASE_WIDTH", "0", "MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.RES2_OUT_CHANNELS", "256",
]  # fmt: skip


def _args(config: str, opts: List[str]):
    return argparse.Namespace(
        config_file=config,
        opts=opts,
        resume=False,
        eval_only=False,
        num_gpus=1,
        num_machines=1,
        machine_rank=0,
        dist_url="auto",
    )


def random_stage_inputs(cfg, stage: str, out: str) -> List[str]:
    """Randomly initialised files a stage starts from (the teacher; for stage 2 also the stage-1 G
    and D), saved under ``out``, as the config overrides that name them."""
    path = os.path.join(out, "teacher.pth")
    torch.save({"model": build_guide_model(cfg, load_weights=False).state_dict()}, path)
    opts = ["MODEL.GUIDE_WEIGHTS", path]
    if stage == "stage2":
        torch.save({"model": build_generator(cfg).state_dict()}, os.path.join(out, "G.pth"))
        torch.save({"model": build_discriminator(cfg).state_dict()}, os.path.join(out, "D.pth"))
        opts += [
            "MODEL.AFI_GEN_WEIGHTS",
            os.path.join(out, "G.pth"),
            "MODEL.AFI_DIS_WEIGHTS",
            os.path.join(out, "D.pth"),
        ]
    return opts


def measure(
    stage: str, configs_dir: str, size: int, batch: int, iters: int, device: str, reference: bool, amp: bool = False
) -> Dict:
    """Train ``iters`` iterations of ``stage`` and return median s/iter (first 2 dropped) and peak memory."""
    out = tempfile.mkdtemp(prefix=f"bench_{stage}_")
    opts = [
        "OUTPUT_DIR",
        out,
        "MODEL.DEVICE",
        device,
        "SOLVER.IMS_PER_BATCH",
        str(batch),
        "SOLVER.MAX_ITER",
        str(iters),
        "INPUT.MIN_SIZE_TRAIN",
        f"({size},)",
        "INPUT.MAX_SIZE_TRAIN",
        str(2 * size),
        "SOLVER.CHECKPOINT_PERIOD",
        "100000",
        "DATASETS.TEST",
        "()",
        "SOLVER.AMP.ENABLED",
        str(amp),
    ]
    if reference:
        opts += REFERENCE_SIZES
    config = os.path.join(configs_dir, BENCHMARK_CONFIGS[stage])
    if stage in ("stage1", "stage2"):
        opts += random_stage_inputs(setup_cfg(_args(config, list(opts))), stage, out)
    cfg = setup_cfg(_args(config, opts), stage=stage)
    trainer = {"stage1": Stage1Trainer, "stage2": Stage2Trainer, "stage3": DetectorTrainer, "plain_nn": DefaultTrainer}[
        stage
    ](cfg)
    timer = _Timer(device)
    trainer.register_hooks([timer])
    if stage != "plain_nn":
        trainer.resume_or_load(resume=False)
    if on_cuda(device):
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    times = timer.times[2:] or timer.times
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "stage": stage,
        "s_per_iter": statistics.median(times),
        "peak_mem_mib": peak,
        "memory_kind": "CUDA max allocated" if device.startswith("cuda") else "process max RSS",
        "size": size,
        "batch": batch,
        "iters": iters,
        "device": device,
        "reference_sizes": reference,
        "amp": amp,
    }
