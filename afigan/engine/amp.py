"""Mixed precision (``SOLVER.AMP.ENABLED``): where and in which dtype the networks' forward passes
run under autocast, with every loss in float32 and gradient scaling for float16.

Kept apart from :mod:`afigan.engine.speed`, whose switches (channels_last, torch.compile) change
only how fast a step runs; AMP changes the arithmetic (dtype, scaled gradients)."""

import logging
from typing import Optional

import torch

__all__ = [
    "AMPPolicy",
    "autocast_dtype",
    "precision_name",
    "cpu_supports_bfloat16",
    "float32_losses",
    "backward_and_step",
]

logger = logging.getLogger(__name__)


def cpu_supports_bfloat16() -> bool:
    """Whether this CPU has bfloat16 convolution kernels (oneDNN: AVX-512 BF16 or AMX); without
    them bfloat16 autocast runs, but slower than float32."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(cfg, device: torch.device) -> Optional[torch.dtype]:
    """The dtype ``SOLVER.AMP`` runs the networks' forward passes in on ``device``, None for
    float32: on CUDA ``SOLVER.AMP.PRECISION``; on a CPU bfloat16 where it has bfloat16 kernels
    (float16 autocast on a CPU has no fast kernels), else float32."""
    precision = cfg.SOLVER.AMP.get("PRECISION", "float16")
    if precision not in ("float16", "bfloat16"):
        raise ValueError(f"SOLVER.AMP.PRECISION must be 'float16' or 'bfloat16', got {precision!r}.")
    if not cfg.SOLVER.AMP.ENABLED:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if precision == "bfloat16" else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_supports_bfloat16() else None


def precision_name(cfg, device: torch.device) -> str:
    """What a training run of ``cfg`` computes in on ``device``, for the console: "float32",
    "bfloat16 autocast" or "float16 autocast with gradient scaling"."""
    dtype = autocast_dtype(cfg, device)
    if dtype is None:
        return "float32"
    return "float16 autocast with gradient scaling" if dtype == torch.float16 else "bfloat16 autocast"


class AMPPolicy:
    """Whether and how to run mixed precision (``SOLVER.AMP.ENABLED``): on CUDA in
    ``SOLVER.AMP.PRECISION`` (float16 with gradient scaling, or bfloat16); on a CPU in bfloat16
    where the CPU has bfloat16 kernels, float32 with a warning otherwise. Only the networks'
    forward passes run under autocast; every loss is computed in float32."""

    def __init__(self, cfg, device: torch.device):
        precision = cfg.SOLVER.AMP.get("PRECISION", "float16")
        wanted = bool(cfg.SOLVER.AMP.ENABLED)
        self.device_type = device.type
        dtype = autocast_dtype(cfg, device)
        self.enabled = dtype is not None
        self.dtype = dtype or torch.bfloat16
        if device.type != "cuda":
            if wanted and not self.enabled:
                logger.warning(
                    "SOLVER.AMP.ENABLED is ignored on %s: it has no bfloat16 convolution kernels; training in float32.",
                    device,
                )
            elif wanted and precision == "float16":
                logger.info("SOLVER.AMP on a CPU runs in bfloat16 (SOLVER.AMP.PRECISION float16 applies to CUDA).")

    def autocast(self):
        return torch.autocast(device_type=self.device_type, dtype=self.dtype, enabled=self.enabled)

    def grad_scaler(self):
        """A new ``GradScaler`` for float16 on CUDA, else None (no scaling needed)."""
        return torch.amp.GradScaler("cuda") if self.enabled and self.dtype == torch.float16 else None


def float32_losses(losses):
    """``{name: loss}`` with every loss in float32 (a loss computed under autocast may be bfloat16)."""
    return {k: v.float() for k, v in losses.items()}


def backward_and_step(loss: torch.Tensor, optimizer, scaler=None) -> None:
    """zero_grad, backward (scaled under AMP), step."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
