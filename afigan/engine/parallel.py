"""Wrapping a model for data-parallel training, on GPUs and on CPUs (gloo) alike."""

import torch
from detectron2.engine import create_ddp_model
from detectron2.utils import comm

__all__ = ["ddp"]


def ddp(module: torch.nn.Module) -> torch.nn.Module:
    """Detectron2's ``create_ddp_model`` (DDP when several processes run, the module otherwise),
    told the module's device: it fills ``device_ids`` with the local rank when none is given,
    which DDP rejects for a CPU module (multi-process CPU runs use gloo)."""
    on_gpu = next(module.parameters()).device.type == "cuda"
    # No buffer broadcast, as Detectron2's DefaultTrainer: BatchNorm statistics stay per rank (SyncBN
    # where they must agree); for stage 1/2's D see afigan/engine/adversarial.py.
    return create_ddp_model(module, device_ids=[comm.get_local_rank()] if on_gpu else None, broadcast_buffers=False)
