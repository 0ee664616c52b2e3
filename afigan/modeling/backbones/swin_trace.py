"""Detectron2's Swin Transformer forward, written so that tracing keeps it size-free.

Detectron2's port (``detectron2.modeling.backbone.swin``) takes Python ints from shapes where
tracing freezes them: the shifted-window attention mask is built at ``int(np.ceil(H / window))``
windows, the crop after window padding runs only ``if pad_r > 0 or pad_b > 0``, and
``window_reverse`` takes the batch from ``int(...)``. A graph traced at one size therefore fails,
or silently masks the wrong pixels, at another. :func:`swin_forward` computes the same thing with
the port's own modules (so the same parameters and names), every size a traced value: the mask
from ``arange`` comparisons, the window padding always followed by its (possibly empty) crop, the
patch-embedding and patch-merging pads by traced amounts. Eagerly it gives the port's output
bit for bit (tests/analysis/test_export_sizes.py); :class:`afigan.modeling.backbones.SwinTransformer`
uses it only while tracing, and the port's own forward otherwise.
"""

from typing import Dict

import torch
from detectron2.modeling.backbone.swin import window_partition
from torch import Tensor
from torch.nn import functional as F

__all__ = ["shifted_window_mask", "swin_forward"]


def shifted_window_mask(hp, wp, window: int, shift: int, device=None) -> Tensor:
    """The (nW, window^2, window^2) attention mask (0 / -100) of the shifted windows of a padded
    ``hp`` x ``wp`` map (multiples of ``window``), as Detectron2's ``BasicLayer`` builds it:
    positions are grouped by row band (before ``hp - window``, before ``hp - shift``, the rest)
    and column band, and a window attends only within its own group."""
    rows = torch.arange(hp, device=device)
    cols = torch.arange(wp, device=device)
    row_band = (rows >= hp - window).long() + (rows >= hp - shift).long()
    col_band = (cols >= wp - window).long() + (cols >= wp - shift).long()
    img_mask = (row_band[:, None] * 3 + col_band[None, :]).to(torch.float32)[None, :, :, None]  # 1 Hp Wp 1
    mask_windows = window_partition(img_mask, window).view(-1, window * window)
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))


def _window_reverse(windows: Tensor, window: int, hp, wp) -> Tensor:
    """(nW * B, window, window, C) -> (B, hp, wp, C); the batch is inferred (-1), not an int."""
    x = windows.view(-1, hp // window, wp // window, window, window, windows.shape[-1])
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, hp, wp, windows.shape[-1])


def _block(blk, x: Tensor, h, w, attn_mask: Tensor) -> Tensor:
    """``SwinTransformerBlock.forward``: (B, h*w, C) -> (B, h*w, C)."""
    b, _, c = x.shape
    window, shift = blk.window_size, blk.shift_size
    shortcut = x
    x = blk.norm1(x).view(b, h, w, c)
    pad_r = (window - w % window) % window
    pad_b = (window - h % window) % window
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    hp, wp = x.shape[1], x.shape[2]
    if shift > 0:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    windows = window_partition(x, window).view(-1, window * window, c)
    windows = blk.attn(windows, mask=attn_mask if shift > 0 else None).view(-1, window, window, c)
    x = _window_reverse(windows, window, hp, wp)
    if shift > 0:
        x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
    # Always cut (a no-op when nothing was padded): whether there was padding depends on the size.
    x = x[:, :h, :w, :].contiguous().view(b, -1, c)
    x = shortcut + blk.drop_path(x)
    return x + blk.drop_path(blk.mlp(blk.norm2(x)))


def _merge(merging, x: Tensor, h, w) -> Tensor:
    """``PatchMerging.forward``: (B, h*w, C) -> (B, ceil(h/2) * ceil(w/2), 2C)."""
    b, _, c = x.shape
    x = F.pad(x.view(b, h, w, c), (0, 0, 0, w % 2, 0, h % 2))
    x = torch.cat([x[:, 0::2, 0::2, :], x[:, 1::2, 0::2, :], x[:, 0::2, 1::2, :], x[:, 1::2, 1::2, :]], -1)
    return merging.reduction(merging.norm(x.view(b, -1, 4 * c)))


def _patch_embed(embed, x: Tensor) -> Tensor:
    """``PatchEmbed.forward``: (B, C, H, W) -> (B, E, ceil(H/p), ceil(W/p)), zero-padded at the
    bottom/right to multiples of the patch size."""
    ph, pw = embed.patch_size
    x = F.pad(x, (0, (-x.shape[-1]) % pw, 0, (-x.shape[-2]) % ph))
    x = embed.proj(x)
    if embed.norm is not None:
        h, w = x.shape[2], x.shape[3]
        x = embed.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).view(-1, embed.embed_dim, h, w)
    return x


def swin_forward(swin, x: Tensor) -> Dict[str, Tensor]:
    """Detectron2 ``SwinTransformer.forward`` of ``swin``: (N, C, H, W) -> ``{p{i}: (N, C_i, H_i, W_i)}``
    for its ``out_indices`` (Detectron2's names), every size a traced value."""
    x = _patch_embed(swin.patch_embed, x)
    h, w = x.shape[2], x.shape[3]
    if swin.ape:
        x = x + F.interpolate(swin.absolute_pos_embed, size=(h, w), mode="bicubic")
    x = swin.pos_drop(x.flatten(2).transpose(1, 2))
    outs = {}
    for i, layer in enumerate(swin.layers):
        window = layer.window_size
        hp, wp = (h + window - 1) // window * window, (w + window - 1) // window * window
        attn_mask = shifted_window_mask(hp, wp, window, layer.shift_size, x.device)
        for blk in layer.blocks:
            x = _block(blk, x, h, w, attn_mask)
        if i in swin.out_indices:
            out = getattr(swin, f"norm{i}")(x)
            outs[f"p{i}"] = out.view(-1, h, w, swin.num_features[i]).permute(0, 3, 1, 2).contiguous()
        if layer.downsample is not None:
            x = _merge(layer.downsample, x, h, w)
            h, w = (h + 1) // 2, (w + 1) // 2
    return outs
