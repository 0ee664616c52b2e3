"""Weight-space diagnostics of backbone stages (pure PyTorch): what the FE regulariser targets
(weight variance, Frobenius norm) and what its README claims (edge-like vs blur-like filters).

High-frequency share of a k_h x k_w kernel w: the fraction of its spectral energy |W(f)|² (DFT
zero-padded to a ``grid`` x ``grid`` lattice, f in cycles/pixel, |f| <= 0.5·sqrt(2)) that lies
above the radial cut ``|f| > cut``. By Parseval the low-frequency energy is the quadratic form
vec(w)ᵀ M vec(w) with M[p, q] = grid⁻² Σ_{|f| <= cut} cos(2π f·(p − q)), so a whole stage is
measured from the Gram matrix of its kernels without any FFT. A stage's share is energy-weighted
over all its kernels (spatially 1 x 1 kernels have a flat spectrum and are left out). A white-noise
kernel has the share :func:`white_noise_hf_share` (≈ 0.81 at cut 0.25): above it is edge-like
(the 3 x 3 Laplacian is ≈ 0.98), below it blur-like (a 3 x 3 Gaussian with σ = 1 is ≈ 0.18).
"""

import re
from collections import defaultdict
from functools import lru_cache
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = [
    "DEFAULT_CUT",
    "lowpass_matrix",
    "kernel_energies",
    "kernel_hf_share",
    "white_noise_hf_share",
    "stage_weights_from_state_dict",
    "stage_weight_stats",
]

DEFAULT_CUT = 0.25  # cycles/pixel: half the Nyquist frequency
_GRID = 32
# "<prefix><stage>.<rest>.weight", e.g. "backbone.bottom_up.res3.0.conv1.weight".
_STAGE_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)(?P<stage>stem|res\d)\.(?P<rest>.+)\.weight$")


def _frequencies(grid: int, cut: float) -> Tuple[torch.Tensor, torch.Tensor]:
    f = torch.fft.fftfreq(grid, dtype=torch.float64)
    fy, fx = torch.meshgrid(f, f, indexing="ij")
    radius = torch.sqrt(fx**2 + fy**2)
    return torch.stack([fy, fx], -1)[radius <= cut], radius


@lru_cache(maxsize=64)
def lowpass_matrix(kh: int, kw: int, cut: float = DEFAULT_CUT, grid: int = _GRID) -> torch.Tensor:
    """(kh·kw, kh·kw) float64 matrix M with vec(w)ᵀ M vec(w) = low-frequency (|f| <= cut) share of
    Σ_f |W(f)|² times Σ w² -- i.e. M = I when ``cut`` covers the whole lattice."""
    if kh > grid or kw > grid:
        raise ValueError(f"Kernel {kh}x{kw} is larger than the {grid}x{grid} frequency grid.")
    low, _ = _frequencies(grid, cut)  # (L, 2)
    ys, xs = torch.meshgrid(torch.arange(kh, dtype=torch.float64), torch.arange(kw, dtype=torch.float64), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], -1)  # (K, 2)
    diff = pos[:, None, :] - pos[None, :, :]  # (K, K, 2)
    return torch.cos(2 * torch.pi * diff @ low.T).sum(-1) / grid**2


def white_noise_hf_share(cut: float = DEFAULT_CUT, grid: int = _GRID) -> float:
    """Expected high-frequency share of a kernel with i.i.d. entries: the lattice fraction above ``cut``."""
    low, _ = _frequencies(grid, cut)
    return 1.0 - low.shape[0] / grid**2


def kernel_energies(weight: torch.Tensor, cut: float = DEFAULT_CUT) -> Tuple[float, float]:
    """``(low_frequency_energy, total_energy)`` summed over all spatial kernels of ``weight``.

    ``weight``: (k_h, k_w) or (..., k_h, k_w), e.g. a conv weight (O, I/groups, k_h, k_w); energies
    are Σ w² units (Parseval-normalised). Returns (0, 0) for 1 x 1 kernels.
    """
    if weight.dim() < 2:
        raise ValueError(f"A kernel needs two spatial dimensions; got shape {tuple(weight.shape)}.")
    kh, kw = weight.shape[-2:]
    if kh * kw == 1:
        return 0.0, 0.0
    v = weight.detach().reshape(-1, kh * kw).to(torch.float64).cpu()
    gram = v.T @ v  # (K, K): the stage's kernels enter only through this
    return float((gram * lowpass_matrix(kh, kw, cut)).sum()), float(gram.trace())


def kernel_hf_share(weights, cut: float = DEFAULT_CUT) -> Optional[float]:
    """Energy-weighted high-frequency share of all spatial kernels of one tensor or a list of
    tensors (see the module docstring); ``None`` when there is no k x k kernel with k·k > 1."""
    weights = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    low = total = 0.0
    for w in weights:
        lo, tot = kernel_energies(w, cut)
        low, total = low + lo, total + tot
    return None if total <= 0 else 1.0 - low / total


def stage_weights_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], stages: Optional[Iterable[str]] = None
) -> Dict[str, List[Tuple[str, torch.Tensor]]]:
    """Conv weights (4-D ``*.weight`` tensors) of each ResNet stage (``stem``, ``res2`` ... ``res5``).

    A detector state dict may hold a stage under several prefixes (the detector's backbone, a
    teacher's, a C4 model's ``roi_heads.res5``); per stage the prefix ``backbone.bottom_up.`` wins,
    then ``backbone.``, then the shortest. Returns ``{stage: [(key, tensor), ...]}`` in key order.
    """
    found: Dict[str, Dict[str, List[Tuple[str, torch.Tensor]]]] = defaultdict(lambda: defaultdict(list))
    for key, value in state_dict.items():
        m = _STAGE_KEY.match(key)
        if m and isinstance(value, torch.Tensor) and value.dim() == 4:
            found[m.group("stage")][m.group("prefix")].append((key, value))
    wanted = list(stages) if stages is not None else sorted(found, key=lambda s: (s != "stem", s))
    missing = [s for s in wanted if s not in found]
    if missing:
        raise KeyError(
            f"No conv weights of stage(s) {missing} in the checkpoint (keys like "
            "'backbone.bottom_up.res3.0.conv1.weight'); "
            f"stages present: {sorted(found)}. Pass the config file so the checkpoint is loaded into the model first."
        )

    def rank(prefix: str):
        return (prefix != "backbone.bottom_up.", prefix != "backbone.", len(prefix), prefix)

    return {s: found[s][min(found[s], key=rank)] for s in wanted}


def stage_weight_stats(weights: Sequence[torch.Tensor], cut: float = DEFAULT_CUT) -> Dict[str, float]:
    """Per-stage numbers: ``tensors``, ``params``, ``fro_sum`` (Σ‖W‖_F, the smooth term's S),
    ``var_sum`` (Σ unbiased Var(W), the sharp term's V), ``var_mean``, ``kernels`` (count of
    spatial kernels with k·k > 1) and ``kernel_hf`` (their high-frequency share, or None)."""
    ws = [w.detach().to(torch.float64).cpu() for w in weights]
    variances = [float(w.var()) for w in ws if w.numel() > 1]
    return {
        "tensors": len(ws),
        "params": int(sum(w.numel() for w in ws)),
        "fro_sum": float(sum(torch.linalg.vector_norm(w) for w in ws)) if ws else 0.0,
        "var_sum": float(sum(variances)),
        "var_mean": float(sum(variances) / len(variances)) if variances else 0.0,
        "kernels": int(sum(w[..., 0, 0].numel() for w in ws if w.shape[-1] * w.shape[-2] > 1)),
        "kernel_hf": kernel_hf_share(ws, cut),
        "kernel_hf_noise": kernel_hf_noise(tuple(tuple(w.shape) for w in ws), cut),
    }


@lru_cache(maxsize=64)  # two checkpoints of one architecture share their stages' shapes
def kernel_hf_noise(
    shapes: Tuple[Tuple[int, ...], ...], cut: float = DEFAULT_CUT, draws: int = 16, seed: int = 0
) -> Optional[float]:
    """Standard deviation of :func:`kernel_hf_share` over ``draws`` white-noise stages of the given
    tensor shapes: how much the measure moves for a stage of this size by chance alone, the noise
    floor a change between two checkpoints must clear. ``None`` without k x k kernels."""
    if not any(len(s) >= 2 and s[-1] * s[-2] > 1 for s in shapes):
        return None
    g = torch.Generator().manual_seed(seed)
    shares = [
        kernel_hf_share([torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes], cut) for _ in range(draws)
    ]
    return float(torch.tensor(shares).std())
