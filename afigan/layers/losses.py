"""Adversarial and content losses of AFI-GAN, summed over pyramid levels.

Shapes: every feature dict maps a level name ("p2", ...) to an (N, C, H, W) tensor. Real and
fake maps of one level may differ by a few pixels (padding of the half-size image); both are
cut to their common top-left window first, which keeps them aligned because
Detectron2 pads at the bottom/right.
"""

import contextlib
from typing import Callable, Dict, Iterable, Mapping, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .shape import crop_to_common

__all__ = ["discriminator_loss", "generator_loss", "frozen_parameters", "crop_to_common", "random_window"]

Features = Mapping[str, torch.Tensor]


def _levels(fake: Features, real: Features, levels: Optional[Iterable[str]]):
    names = list(levels) if levels is not None else [k for k in fake if k in real]
    missing = [k for k in names if k not in fake or k not in real]
    if missing:
        raise KeyError(f"Feature level {missing[0]!r} is missing; real has {sorted(real)}, fake has {sorted(fake)}.")
    if not names:
        raise ValueError("No pyramid level is shared by the real and fake features.")
    return names


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    # Computed in float32: the loss is tiny relative to the content term and fp16 loses it.
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def random_window(t: torch.Tensor, size: int):
    """``(top, left, height, width)`` of a uniformly drawn ``size`` x ``size`` window of ``t``'s map
    (torch's global RNG); the whole map, drawing nothing, when ``size <= 0`` or the map is no larger.
    D is fully convolutional, so its mean loss over a random window estimates the full-map mean
    (the window's border sees zero padding where the full map has neighbours, and BatchNorm's
    batch statistics come from the window)."""
    h, w = t.shape[-2:]
    if size <= 0:
        return 0, 0, h, w
    ph, pw = min(size, h), min(size, w)
    # Drawn on the host whatever t's device: the same windows on a GPU as on a CPU, and no device sync.
    top = int(torch.randint(h - ph + 1, (), device="cpu")) if ph < h else 0
    left = int(torch.randint(w - pw + 1, (), device="cpu")) if pw < w else 0
    return top, left, ph, pw


def _window(t: torch.Tensor, window) -> torch.Tensor:
    top, left, h, w = window
    return t[..., top : top + h, left : left + w]


@contextlib.contextmanager
def frozen_parameters(module):
    """Freeze ``module`` (if it is one) for the duration: ``requires_grad=False`` on its
    parameters, and BatchNorm layers keep using batch statistics but stop updating their running
    statistics (momentum 0). A generator update can then back-propagate through D without
    changing anything of D."""
    if not isinstance(module, nn.Module):
        yield
        return
    params = [p for p in module.parameters() if p.requires_grad]
    norms = [
        (m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    for p in params:
        p.requires_grad_(False)
    for m, _, _ in norms:
        m.momentum = 0.0  # running = 1 * running + 0 * batch: unchanged, without an in-place restore
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
        for m, momentum, tracked in norms:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)  # not used by backward, safe to restore


def discriminator_loss(
    discriminator: Callable[[torch.Tensor], torch.Tensor],
    real: Features,
    fake: Features,
    levels: Optional[Iterable[str]] = None,
    patch_size: int = 0,
) -> Dict[str, torch.Tensor]:
    """Per level: BCE(D(real), 1) + BCE(D(sg(fake)), 0) (plain sum over levels, no 1/2).

    Returns ``{"loss_d_real_<l>", "loss_d_fake_<l>"}`` for each level; their sum is the
    discriminator loss. ``fake`` is detached here, so the generator gets no gradient.
    ``patch_size > 0``: D sees one :func:`random_window` per level, the same for real and fake.
    """
    out = {}
    for name in _levels(fake, real, levels):
        f, r = crop_to_common(fake[name].detach(), real[name].detach())
        window = random_window(f, patch_size)
        f, r = _window(f, window), _window(r, window)
        out[f"loss_d_real_{name}"] = _bce(discriminator(r), 1.0)
        out[f"loss_d_fake_{name}"] = _bce(discriminator(f), 0.0)
    return out


def generator_loss(
    discriminator: Callable[[torch.Tensor], torch.Tensor],
    fake: Features,
    real: Features,
    levels: Optional[Iterable[str]] = None,
    adv_weight: float = 1e-3,
    content_weight: float = 1.0,
    adv_grad: bool = True,
    run_d_on_real: bool = False,
    patch_size: int = 0,
) -> Dict[str, torch.Tensor]:
    """Per level: adv_weight * BCE(D(fake), 1) + content_weight * L1(fake, real).

    Returns ``{"loss_adv_<l>", "loss_content_<l>"}`` (already weighted); their sum is the
    generator loss. D's parameters are frozen while it is run, so they receive no gradient.
    ``adv_grad=False`` reproduces the reference's B1 of docs/differences_from_reference.md: D's logits
    are computed without gradient, the adversarial term is a constant and only the content loss trains G.
    ``run_d_on_real=True`` reproduces the reference's unused D pass on the real features: per
    level, D(cropped fake) then D(cropped real) without gradient, which moves D's BatchNorm running
    statistics exactly as the reference's G step does (docs/differences_from_reference.md, O8).
    ``patch_size > 0``: D sees one :func:`random_window` per level (the content loss keeps the
    whole map).
    """
    out = {}
    for name in _levels(fake, real, levels):
        f, r = crop_to_common(fake[name], real[name].detach())
        window = random_window(f, patch_size) if adv_weight or run_d_on_real else None
        if adv_weight:
            if adv_grad:
                with frozen_parameters(discriminator):
                    logits = discriminator(_window(f, window))
            else:
                with torch.no_grad():
                    logits = discriminator(_window(f, window))
            out[f"loss_adv_{name}"] = adv_weight * _bce(logits, 1.0)
        if run_d_on_real:
            with torch.no_grad():
                discriminator(_window(r, window))
        out[f"loss_content_{name}"] = content_weight * F.l1_loss(f.float(), r.float())
    return out
