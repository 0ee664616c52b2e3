"""Worker of the 2-process stage-1 DDP test (a module, so spawned processes can import it)."""

import json
import os
import sys

import torch


def stage1_two_ranks(out_dir: str, teacher: str, result_file: str):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from detectron2.utils import comm
    from stage_helpers import stage_cfg

    from afigan.engine import Stage1Trainer

    torch.manual_seed(comm.get_rank())  # different init per rank: DDP must broadcast rank 0's
    trainer = Stage1Trainer(
        stage_cfg(
            "toy/pipeline/stage1.yaml",
            out_dir,
            "MODEL.GUIDE_WEIGHTS",
            teacher,
            "SOLVER.MAX_ITER",
            3,
            "SOLVER.IMS_PER_BATCH",
            4,
        )
    )
    trainer.resume_or_load(resume=False)
    trainer.train()
    flat = {
        name: torch.cat([p.detach().flatten() for p in net.parameters()])
        for name, net in (("G", trainer.model), ("D", trainer.D))
    }
    # D's BatchNorm buffers stay per rank (afigan/engine/adversarial.py, where D is wrapped): each
    # rank writes its own for the test to compare with the checkpoint the main process saved.
    buffers = {n for n, _ in trainer.D.named_buffers()}
    torch.save(
        {k: v for k, v in trainer.D.state_dict().items() if k in buffers},
        os.path.join(os.path.dirname(result_file), f"D_buffers_rank{comm.get_rank()}.pt"),
    )
    gathered = comm.all_gather({k: v.tolist() for k, v in flat.items()})
    if comm.is_main_process():
        diff = {k: max(abs(a - b) for a, b in zip(gathered[0][k], gathered[1][k])) for k in flat}
        with open(result_file, "w") as f:
            json.dump({"world_size": comm.get_world_size(), "max_abs_diff": diff}, f)
