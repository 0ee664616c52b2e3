"""CUDA tier: a real NCCL process group (Detectron2's launch with one process creates none): world
size 1 in a spawned process, one stage-1 and one stage-3 step through the DDP wrappers."""

import json
import socket

import torch
import torch.multiprocessing as mp
from cuda_ddp_worker import nccl_steps
from cuda_helpers import CUDA_TIER
from stage_helpers import save_teacher

pytestmark = CUDA_TIER


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nccl_process_group_runs_stage1_and_stage3_steps_through_the_ddp_wrappers(tmp_path):
    """World size 1 (2 where 2 GPUs exist). At world size 1 Detectron2's create_ddp_model (behind
    afigan.engine.parallel.ddp) returns the module itself, so DDP proper runs only with 2 GPUs; the
    NCCL group, its collectives in the trainers (comm.all_gather of the metrics) and the CUDA
    placement of the wrapped modules run either way."""
    world = min(2, torch.cuda.device_count())
    teacher = save_teacher(str(tmp_path / "teacher.pth"))
    result = tmp_path / "nccl.json"
    args = (world, _free_port(), str(tmp_path / "out"), teacher, str(result))
    mp.spawn(nccl_steps, args=args, nprocs=world, join=True)
    res = json.loads(result.read_text())
    assert res["backend"] == "nccl" and res["world_size"] == world
    wrapper = "DistributedDataParallel" if world > 1 else None
    assert wrapper is None or res["wrapped"] == {"G": wrapper, "D": wrapper, "stage3": wrapper}
    assert res["finite"] == {"stage1": True, "stage3": True}
