"""The feature patch discriminator ``D``: one real/fake logit per pyramid-feature location.

Three 3x3 Conv + BN + LeakyReLU(0.2) blocks (256 -> 512 -> 1024 -> 1024) and a final
3x3 conv to one channel, all stride 1 / padding 1, so the output keeps the input's H x W. The
module tree (``Discriminators.0.{0..3}.0`` with the norm as ``.norm``) mirrors the reference so
its checkpoints load with ``strict=True``.
"""

from typing import Optional

import torch
from torch import nn

from .shape import check_feature_map
from .state_dict import ClearStateDictErrors

__all__ = ["FeaturePatchDiscriminator", "Conv2dThenNorm"]


class Conv2dThenNorm(nn.Conv2d):
    """An ``nn.Conv2d`` that applies an optional norm held as ``self.norm`` to its output:
    Detectron2's ``Conv2d`` layout (keys ``weight``, ``bias``, ``norm.*``) without importing it,
    because ``afigan.layers`` is pure PyTorch."""

    def __init__(self, *args, norm: Optional[nn.Module] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return self.norm(x) if self.norm is not None else x


def _make_norm(kind: str, channels: int) -> Optional[nn.Module]:
    # Detectron2's get_norm would do, but afigan.layers must not import Detectron2.
    if kind == "BN":
        return nn.BatchNorm2d(channels)
    if kind == "SyncBN":
        return nn.SyncBatchNorm(channels)
    if kind in ("", "none", None):
        return None
    raise ValueError(f"FeaturePatchDiscriminator norm must be 'BN', 'SyncBN' or '', got {kind!r}.")


class FeaturePatchDiscriminator(ClearStateDictErrors, nn.Module):
    """(N, channels, h, w) features -> (N, 1, h, w) logits.

    Args:
        channels: input feature channels (256).
        norm: "BN" (reference), "SyncBN" or "" (no norm).
        spectral_norm: wrap every conv in spectral normalisation (off by default; changes the
            state-dict keys, so reference checkpoints no longer load).
        base_width: the n-th block has min(2^n, 4) * base_width channels; default ``channels``
            (reference). Smaller values make a cheap discriminator for CPU runs.
    """

    def __init__(self, channels: int = 256, norm: str = "BN", spectral_norm: bool = False, base_width: int = 0):
        super().__init__()
        self.channels = channels
        base = base_width or channels
        widths = [channels] + [min(2**n, 4) * base for n in (1, 2, 3)]
        blocks = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            conv = Conv2dThenNorm(c_in, c_out, 3, 1, 1, norm=_make_norm(norm, c_out))
            blocks.append(nn.Sequential(conv, nn.LeakyReLU(0.2, inplace=True)))
        blocks.append(nn.Sequential(Conv2dThenNorm(widths[-1], 1, 3, 1, 1)))
        for block in blocks:
            conv = block[0]
            # Detectron2's c2_msra_fill: Kaiming-normal, fan-out, ReLU gain, zero bias.
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            if spectral_norm:
                nn.utils.parametrizations.spectral_norm(conv)
        self.Discriminators = nn.ModuleList([nn.Sequential(*blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map(x, self.channels, type(self).__name__)
        return self.Discriminators[0](x)
