"""Worker of the CUDA tier's NCCL test (a module, so a spawned process can import it): a real
process group (world size 1, or 2 where 2 GPUs exist) with the NCCL backend, one stage-1 and one
stage-3 step through the DDP wrappers (afigan/engine/parallel.py)."""

import json
import os
import sys

import torch
import torch.distributed as dist


def nccl_steps(rank: int, world_size: int, port: int, out_dir: str, teacher: str, result_file: str):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from detectron2.utils import comm
    from stage_helpers import stage_cfg

    from afigan.engine import DetectorTrainer, Stage1Trainer

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", world_size=world_size, rank=rank)
    comm.create_local_process_group(world_size)  # what Detectron2's launch sets up
    try:
        quiet = ["MODEL.DEVICE", "cuda", "SOLVER.MAX_ITER", 1, "SOLVER.CHECKPOINT_PERIOD", 1000, "DATASETS.TEST", ()]
        s1 = Stage1Trainer(
            stage_cfg("toy/pipeline/stage1.yaml", os.path.join(out_dir, "s1"), "MODEL.GUIDE_WEIGHTS", teacher, *quiet)
        )
        s1.resume_or_load(resume=False)
        s1.train()
        s3 = DetectorTrainer(stage_cfg("toy/pipeline/stage3.yaml", os.path.join(out_dir, "s3"), *quiet))
        s3.resume_or_load(resume=False)
        s3.train()
        wrapped = {
            "G": type(s1.G_ddp).__name__,
            "D": type(s1.D_loss).__name__,
            "stage3": type(s3.model).__name__,
        }
        finite = {
            name: all(bool(torch.isfinite(torch.tensor(v)).all()) for v, _ in t.storage.latest().values())
            for name, t in (("stage1", s1), ("stage3", s3))
        }
        if comm.is_main_process():
            with open(result_file, "w") as f:
                json.dump({"backend": dist.get_backend(), "world_size": dist.get_world_size(), "wrapped": wrapped,
                       "finite": finite}, f)  # fmt: skip
    finally:
        dist.destroy_process_group()
