"""Swin Transformer as a Detectron2 ``Backbone`` (the reference's ``build_swint_backbone``, spec §12.2).

Shifted-window attention with relative position bias, patch merging between stages, zero
padding of the image to a multiple of the patch size and of every stage to a multiple of the
window. Parameter and buffer names follow the Swin detection port the reference used
(``patch_embed.proj``, ``layers.{i}.blocks.{j}.attn.relative_position_bias_table``,
``layers.{i}.downsample.reduction``, ``norm{i}``, ...), so its checkpoints load strictly.

timm (DropPath, Mlp, trunc_normal_) is imported only when a Swin model is built: importing
afigan must stay cheap for ResNet users (fixes oddity O12).
"""
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, Backbone

__all__ = ["SwinTransformer", "build_swint_backbone", "window_partition", "window_reverse"]

# Additive attention bias between tokens of different shifted regions (reference value).
_MASK_VALUE = -100.0


def _timm():
    """timm's layer helpers, imported on first use (timm's import takes seconds)."""
    from timm.layers import DropPath, Mlp, trunc_normal_

    return DropPath, Mlp, trunc_normal_


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of ``ws`` -> (B * H/ws * W/ws, ws, ws, C)."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * h/ws * w/ws, ws, ws, C) -> (B, h, w, C)."""
    b = windows.shape[0] // ((h // ws) * (w // ws))
    x = windows.view(b, h // ws, w // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside ws x ws windows with a learned relative position bias.

    Input (B_, ws*ws, C) and an optional additive mask (nW, ws*ws, ws*ws); output (B_, ws*ws, C).
    ``relative_position_index`` is a persistent buffer because the reference checkpoints hold it.
    """

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        _, _, trunc_normal_ = _timm()
        if dim % num_heads:
            raise ValueError(f"Swin stage width {dim} is not divisible by its {num_heads} attention heads.")
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        ws = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)  # (N, N, 2), >= 0
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * ws - 1) + rel[..., 1])
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b_, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b_, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)  # (1, heads, N, N)
        if mask is not None:
            nw = mask.shape[0]
            bias = (bias.unsqueeze(1) + mask[None, :, None]).expand(b_ // nw, -1, -1, -1, -1)
            bias = bias.reshape(b_, self.num_heads, n, n)
        # SDPA adds the float mask before the softmax and scales by head_dim**-0.5, exactly the
        # reference's explicit (q * scale) @ k^T + bias + mask.
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=drop)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b_, n, c)))


class SwinTransformerBlock(nn.Module):
    """(Shifted-)window attention + MLP, each pre-normed and residual; (B, H*W, C) -> same."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, mlp_ratio: float,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        DropPath, Mlp, _ = _timm()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"Swin shift size must be in [0, window_size={window_size}), got {shift_size}.")
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: torch.Tensor, h: int, w: int, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        b, _, c = x.shape
        ws, shift = self.window_size, self.shift_size
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)
        # Zero-pad (after the norm, as the reference) so the map tiles into whole windows.
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = x.shape[1:3]
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        windows = self.attn(window_partition(x, ws).view(-1, ws * ws, c), attn_mask if shift else None)
        x = window_reverse(windows.view(-1, ws, ws, c), ws, hp, wp)
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        x = x[:, :h, :w, :].reshape(b, h * w, c)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat + LayerNorm + linear: (B, H*W, C) -> (B, ceil(H/2)*ceil(W/2), 2C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, c = x.shape
        x = F.pad(x.view(b, h, w, c), (0, 0, 0, w % 2, 0, h % 2))  # odd sizes: zero row/column
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


def shifted_window_mask(h: int, w: int, ws: int, shift: int, device) -> torch.Tensor:
    """Additive mask (nW, ws*ws, ws*ws): 0 within a region, -100 across the regions that the
    cyclic shift brings into one window. ``h``, ``w`` are the window-padded sizes."""
    img = torch.zeros((1, h, w, 1), device=device)
    cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    for i, hs in enumerate(cuts):
        for j, wsl in enumerate(cuts):
            img[:, hs, wsl, :] = i * 3 + j
    win = window_partition(img, ws).view(-1, ws * ws)
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, _MASK_VALUE)


class BasicLayer(nn.Module):
    """One Swin stage: ``depth`` blocks alternating plain / shifted windows, then optional merging.

    forward(x (B, H*W, C), H, W) -> (stage output (B, H*W, C), H, W, next input, H', W').
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 drop_path: Sequence[float], downsample: bool, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else self.shift_size, mlp_ratio,
                                 qkv_bias, drop, attn_drop, drop_path[i])
            for i in range(depth)
        ])
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, h: int, w: int):
        ws = self.window_size
        hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
        # The reference always builds the mask with shift ws // 2, even for windows larger than
        # the map; blocks with an even index ignore it.
        mask = shifted_window_mask(hp, wp, ws, self.shift_size, x.device).to(x.dtype) if self.shift_size else None
        for blk in self.blocks:
            x = blk(x, h, w, mask)
        if self.downsample is None:
            return x, h, w, x, h, w
        return x, h, w, self.downsample(x, h, w), (h + 1) // 2, (w + 1) // 2


class PatchEmbed(nn.Module):
    """Zero-pad (N, 3, H, W) to multiples of the patch size, patchify with a strided conv, LayerNorm:
    -> (N, E, ceil(H/p), ceil(W/p))."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        h, w = x.shape[-2:]
        x = self.proj(F.pad(x, (0, (p - w % p) % p, 0, (p - h % p) % p)))
        n, e, hh, ww = x.shape
        x = self.norm(x.flatten(2).transpose(1, 2))
        return x.transpose(1, 2).reshape(n, e, hh, ww)


class SwinTransformer(Backbone):
    """Swin Transformer backbone.

    Input (N, in_chans, H, W), any H, W. Outputs ``stage{i+2}`` for the requested stages i in
    0..3: (N, E * 2^i, ceil(H / 2^(i+2)), ceil(W / 2^(i+2))) -- i.e. stride 4 * 2^i, channels
    E * 2^i -- each passed through its own LayerNorm ``norm{i}``.

    ``frozen_stages`` (Detectron2's FREEZE_AT, reference semantics): -1 freezes nothing; >= 0
    freezes the patch embedding; >= 1 also the absolute position embedding (APE); k >= 2 also
    Swin stages 0..k-2. Frozen parts get ``requires_grad=False`` and stay in eval mode.
    """

    @configurable
    def __init__(self, *, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.2, ape: bool = False, patch_size: int = 4, in_chans: int = 3,
                 pretrain_img_size: int = 224, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, frozen_stages: int = -1,
                 out_features: Sequence[str] = ("stage2", "stage3", "stage4", "stage5")):
        super().__init__()
        _, _, trunc_normal_ = _timm()
        if len(depths) != len(num_heads):
            raise ValueError(f"MODEL.SWINT.DEPTHS {list(depths)} and NUM_HEADS {list(num_heads)} must have equal length.")
        names = [f"stage{i + 2}" for i in range(len(depths))]
        bad = [f for f in out_features if f not in names]
        if bad or not out_features:
            raise ValueError(f"MODEL.SWINT.OUT_FEATURES must be a non-empty subset of {names}, got {list(out_features)}.")
        self.num_layers = len(depths)
        self.embed_dim, self.ape, self.frozen_stages = embed_dim, ape, frozen_stages
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        if ape:
            res = pretrain_img_size // patch_size
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, res, res))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()  # stochastic depth, linear in depth
        self.layers = nn.ModuleList()
        for i in range(self.num_layers):
            start = sum(depths[:i])
            self.layers.append(BasicLayer(
                embed_dim * 2 ** i, depths[i], num_heads[i], window_size, mlp_ratio, dpr[start:start + depths[i]],
                downsample=i < self.num_layers - 1, qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
            ))
        self.num_features = [embed_dim * 2 ** i for i in range(self.num_layers)]
        self.out_indices = sorted(names.index(f) for f in out_features)
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self._out_features = [names[i] for i in self.out_indices]
        self._out_feature_channels = {names[i]: self.num_features[i] for i in self.out_indices}
        self._out_feature_strides = {names[i]: patch_size * 2 ** i for i in self.out_indices}
        self._freeze_stages()

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None):
        s = cfg.MODEL.SWINT
        return dict(
            embed_dim=s.EMBED_DIM, depths=list(s.DEPTHS), num_heads=list(s.NUM_HEADS), window_size=s.WINDOW_SIZE,
            mlp_ratio=s.MLP_RATIO, drop_path_rate=s.DROP_PATH_RATE, ape=s.APE,
            in_chans=input_shape.channels if input_shape is not None else len(cfg.MODEL.PIXEL_MEAN),
            frozen_stages=cfg.MODEL.BACKBONE.FREEZE_AT, out_features=list(s.OUT_FEATURES),
        )

    def _frozen_modules(self) -> List[nn.Module]:
        mods: List[nn.Module] = []
        if self.frozen_stages >= 0:
            mods.append(self.patch_embed)
        if self.frozen_stages >= 2:
            mods.append(self.pos_drop)
            mods.extend(self.layers[: self.frozen_stages - 1])
        return mods

    def _freeze_stages(self) -> None:
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
        if self.frozen_stages >= 1 and self.ape:
            self.absolute_pos_embed.requires_grad_(False)

    def train(self, mode: bool = True):
        """Like ``nn.Module.train`` but frozen parts stay in eval mode (no drop path there)."""
        super().train(mode)
        for m in self._frozen_modules():
            m.eval()
        return self

    @property
    def size_divisibility(self) -> int:
        return 32

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(N, C, H, W) -> {stage{i+2}: (N, E * 2^i, ceil(H / 2^(i+2)), ceil(W / 2^(i+2)))}."""
        if x.dim() != 4:
            raise ValueError(f"SwinTransformer expects a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}.")
        x = self.patch_embed(x)
        h, w = x.shape[-2:]
        if self.ape:
            x = x + F.interpolate(self.absolute_pos_embed, size=(h, w), mode="bicubic")
        x = self.pos_drop(x.flatten(2).transpose(1, 2))
        outs = {}
        for i, layer in enumerate(self.layers):
            x_out, oh, ow, x, h, w = layer(x, h, w)
            if i in self.out_indices:
                x_out = getattr(self, f"norm{i}")(x_out)
                outs[f"stage{i + 2}"] = x_out.view(-1, oh, ow, self.num_features[i]).permute(0, 3, 1, 2).contiguous()
            if i >= self.out_indices[-1]:
                break  # later stages feed no output
        return outs


@BACKBONE_REGISTRY.register()
def build_swint_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Swin Transformer from ``MODEL.SWINT.*`` and ``MODEL.BACKBONE.FREEZE_AT`` (reference name)."""
    return SwinTransformer(cfg, input_shape)
