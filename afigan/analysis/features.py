"""Feature-space diagnostics: how edge-like or blurred each backbone stage's output is on images.

For a stage output F (C, h, w), every channel is mean-removed and Hann-windowed (so the periodic
DFT sees no artificial border edge), and the share of its spectral energy above the radial cut
``|f| > cut`` (cycles/pixel of that map) is the stage's *feature HF share* (energy-weighted over
channels and images). The same measure on the normalised input image, area-averaged to the
stage's resolution, is the *image HF share*; their ratio, the *edge gain*, is > 1 when the stage
keeps more fine detail than the image has at that scale (edge-detector-like) and < 1 when it
smooths (blur-like). Maps smaller than :data:`MIN_MAP` pixels on a side give no value.
"""

from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .filters import DEFAULT_CUT

__all__ = ["MIN_MAP", "spectral_energies", "stage_outputs", "stage_responses"]

MIN_MAP = 8


def spectral_energies(maps: torch.Tensor, cut: float = DEFAULT_CUT) -> Optional[Tuple[float, float]]:
    """``(high_frequency_energy, total_energy)`` of (C, h, w) or (N, C, h, w) maps, summed over
    maps, after per-map mean removal and a 2-D Hann window; ``None`` if h or w < :data:`MIN_MAP`."""
    h, w = maps.shape[-2:]
    if min(h, w) < MIN_MAP:
        return None
    x = maps.detach().to(torch.float64).reshape(-1, h, w)
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    window = (
        torch.hann_window(h, periodic=False, dtype=torch.float64)[:, None]
        * torch.hann_window(w, periodic=False, dtype=torch.float64)[None, :]
    )
    energy = torch.fft.fft2(x * window).abs().pow(2).sum(0)  # (h, w)
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(w, dtype=torch.float64)[None, :]
    high = torch.sqrt(fy**2 + fx**2) > cut
    return float(energy[high].sum()), float(energy.sum())


def stage_outputs(root: nn.Module, stages: Iterable[str], image: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Run ``root`` (a bottom-up network, e.g. a Detectron2 ResNet) on ``image`` (N, 3, H, W) and
    return the output of each named sub-module, caught with forward hooks (so stages that are not
    among the network's ``out_features`` are seen too)."""
    caught, handles = {}, []
    for name in stages:
        module = root.get_submodule(name)
        handles.append(module.register_forward_hook(lambda m, i, o, name=name: caught.__setitem__(name, o)))
    try:
        with torch.no_grad():
            root(image)
    finally:
        for h in handles:
            h.remove()
    return caught


def stage_responses(
    root: nn.Module, stages: List[str], images: Iterable[torch.Tensor], cut: float = DEFAULT_CUT
) -> Dict[str, Dict[str, Optional[float]]]:
    """Per stage: ``feat_hf``, ``image_hf``, ``edge_gain`` (see the module docstring) and the
    mean map size ``map_h`` / ``map_w``, accumulated over ``images`` -- each a normalised
    (3, H, W) tensor as the bottom-up network expects it."""
    acc = {s: [0.0, 0.0, 0.0, 0.0, 0, 0, 0] for s in stages}  # feat hi/total, image hi/total, h, w, count
    for img in images:
        outs = stage_outputs(root, stages, img[None])
        for s in stages:
            fmap = outs[s]
            a = acc[s]
            a[4], a[5], a[6] = a[4] + fmap.shape[-2], a[5] + fmap.shape[-1], a[6] + 1
            feat = spectral_energies(fmap[0], cut)
            ref = spectral_energies(F.adaptive_avg_pool2d(img[None].double(), fmap.shape[-2:])[0], cut)
            if feat is None or ref is None:
                continue
            a[0], a[1], a[2], a[3] = a[0] + feat[0], a[1] + feat[1], a[2] + ref[0], a[3] + ref[1]
    out = {}
    for s, (fh, ft, ih, it, h, w, n) in acc.items():
        feat_hf = fh / ft if ft > 0 else None
        image_hf = ih / it if it > 0 else None
        out[s] = {
            "feat_hf": feat_hf,
            "image_hf": image_hf,
            "edge_gain": feat_hf / image_hf if feat_hf is not None and image_hf else None,
            "map_h": h / n if n else None,
            "map_w": w / n if n else None,
        }
    return out
