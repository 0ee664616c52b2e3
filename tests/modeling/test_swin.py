"""Swin Transformer backbone (spec §12.2): our thin subclass of Detectron2's SwinTransformer, and the
released Swin-L BiFPN detector's key contract."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from conftest import load_listing, random_state_dict  # noqa: E402
from d2_helpers import make_cfg  # noqa: E402
from detectron2.config import LazyCall as L  # noqa: E402
from detectron2.config import instantiate
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import BACKBONE_REGISTRY, build_model  # noqa: E402
from detectron2.modeling.backbone.swin import SwinTransformer as D2SwinTransformer  # noqa: E402
from detectron2.modeling.backbone.swin import WindowAttention, window_partition  # noqa: E402

from afigan.modeling.backbones.swin import SwinTransformer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/<folder>/ -> repo
SWIN_CONFIG = os.path.join(REPO, "configs", "inference", "AFI-GAN_cascade_rcnn_swint_BiFPN_ST.yaml")
TINY = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=3)


def shifted_window_mask(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    """The reference's additive mask (nW, ws*ws, ws*ws): 0 within a region, -100 across the regions
    that the cyclic shift brings into one window (``h``, ``w`` window-padded)."""
    img = torch.zeros(1, h, w, 1)
    cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    for i, hs in enumerate(cuts):
        for j, wsl in enumerate(cuts):
            img[:, hs, wsl, :] = i * 3 + j
    win = window_partition(img, ws).view(-1, ws * ws)
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


def swin_cfg():
    return make_cfg(SWIN_CONFIG)


def test_released_swin_bifpn_keys_and_shapes_match_listing_and_load_strictly():
    listing = load_listing("cascade_rcnn_swin_BiFPN_afi.json")
    model = build_model(swin_cfg())  # Swin-L: built, never run
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = listing["state_dict_shapes"]
    assert sorted(set(shapes) - set(expected)) == []
    assert sorted(set(expected) - set(shapes)) == []
    assert {k: v for k, v in shapes.items() if v != expected[k]} == {}
    result = model.load_state_dict(random_state_dict(listing), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # The relative position index is a persistent buffer, not a parameter.
    names = dict(model.named_parameters())
    assert "backbone.bottom_up.layers.0.blocks.0.attn.relative_position_index" not in names


def test_config_values_of_the_reference_row():
    cfg = swin_cfg()
    assert cfg.MODEL.SWINT.EMBED_DIM == 192 and list(cfg.MODEL.SWINT.DEPTHS) == [2, 2, 18, 2]
    assert list(cfg.MODEL.SWINT.NUM_HEADS) == [6, 12, 24, 48] and cfg.MODEL.SWINT.WINDOW_SIZE == 12
    assert cfg.MODEL.BACKBONE.FREEZE_AT == -1 and cfg.MODEL.BIFPN.FPN_REPEAT == 7
    assert cfg.MODEL.ROI_HEADS.NAME == "CascadeROIHeads" and not cfg.MODEL.MASK_ON
    assert list(cfg.MODEL.RPN.IN_FEATURES) == ["p3", "p4", "p5", "p6", "p7"]
    assert list(cfg.MODEL.ROI_HEADS.IN_FEATURES) == ["p3", "p4", "p5", "p6"]
    assert cfg.INPUT.FORMAT == "RGB" and list(cfg.MODEL.PIXEL_MEAN) == [123.675, 116.28, 103.53]


def test_outputs_names_channels_strides_and_odd_sizes():
    m = SwinTransformer(**TINY).eval()
    shapes = m.output_shape()
    assert list(shapes) == ["stage2", "stage3", "stage4", "stage5"]
    assert [s.channels for s in shapes.values()] == [16, 32, 64, 128]
    assert [s.stride for s in shapes.values()] == [4, 8, 16, 32]
    with torch.no_grad():
        out = m(torch.randn(1, 3, 70, 45))  # padded to the patch size, then ceil-halved per stage
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == {
        "stage2": (18, 12),
        "stage3": (9, 6),
        "stage4": (5, 3),
        "stage5": (3, 2),
    }
    assert [k for k in m.state_dict() if k.startswith("norm")] == [
        f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias")
    ]
    assert sum(p.numel() for p in m.parameters()) == 574130 and len(m.state_dict()) == 133
    assert sum(v.numel() for v in m.state_dict().values()) == 574778  # + relative_position_index buffers
    assert m.size_divisibility == 32


@pytest.mark.parametrize(
    "kwargs, indices",
    [
        (dict(), (0, 1, 2, 3)),
        (dict(ape=True, pretrain_img_size=64, out_features=("stage5", "stage3")), (1, 3)),
    ],
)
def test_outputs_equal_detectron2_swin_exactly(kwargs, indices):
    ours = SwinTransformer(**TINY, **kwargs).eval()
    d2_kwargs = {k: v for k, v in kwargs.items() if k != "out_features"}
    ref = D2SwinTransformer(**TINY, **d2_kwargs, out_indices=indices).eval()
    result = ref.load_state_dict(ours.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    rename = {f"p{i}": f"stage{i + 2}" for i in indices}
    assert ours.output_shape() == {rename[k]: v for k, v in ref.output_shape().items()}
    x = torch.randn(2, 3, 70, 45)
    with torch.no_grad():
        out, expected = ours(x), ref(x)
    assert list(out) == [rename[k] for k in expected] == [f"stage{i + 2}" for i in indices]
    for k, v in expected.items():
        assert torch.equal(out[rename[k]], v), k


def test_subset_of_outputs_has_only_their_norms():
    m = SwinTransformer(**TINY, out_features=("stage3", "stage5"))
    assert list(m.output_shape()) == ["stage3", "stage5"]
    assert not hasattr(m, "norm0") and hasattr(m, "norm1") and hasattr(m, "norm3") and not hasattr(m, "norm2")
    with pytest.raises(ValueError, match="MODEL.SWINT.OUT_FEATURES"):
        SwinTransformer(**TINY, out_features=("res4",))
    with pytest.raises(ValueError, match="MODEL.SWINT.OUT_FEATURES"):
        SwinTransformer(**TINY, out_features=())


def test_bad_depths_heads_and_input_are_one_sentence_errors():
    with pytest.raises(
        ValueError, match=r"MODEL.SWINT.DEPTHS \[2, 2, 2\] and NUM_HEADS \[1, 2, 2, 4\] must have equal length"
    ):
        SwinTransformer(**dict(TINY, depths=(2, 2, 2)))
    with pytest.raises(ValueError, match="Swin stage width 32 is not divisible by its 3 attention heads"):
        SwinTransformer(**dict(TINY, num_heads=(1, 3, 2, 4)))
    with pytest.raises(ValueError, match=r"4-D \(N, C, H, W\) input, got shape \(3, 32, 32\)"):
        SwinTransformer(**TINY)(torch.randn(3, 32, 32))


def test_window_attention_equals_explicit_formula():
    # Detectron2's attention (what our backbone runs) against the reference formula and index layout.
    attn = WindowAttention(dim=12, window_size=(3, 3), num_heads=3).eval()
    x = torch.randn(8, 9, 12)
    mask = shifted_window_mask(6, 6, 3, 1)  # 4 windows
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    n, h, d = 9, 3, 4
    q, k, v = attn.qkv(x).reshape(8, n, 3, h, d).permute(2, 0, 3, 1, 4)
    logits = (q * d**-0.5) @ k.transpose(-2, -1)
    bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(n, n, h).permute(2, 0, 1)
    logits = (logits + bias).view(2, 4, h, n, n) + mask[None, :, None]
    expected = attn.proj((logits.view(8, h, n, n).softmax(-1) @ v).transpose(1, 2).reshape(8, n, 12))
    torch.testing.assert_close(attn(x, mask), expected, rtol=1e-5, atol=1e-5)
    # Reference index: (dh + ws - 1) * (2 ws - 1) + (dw + ws - 1); the diagonal is the centre bin.
    assert attn.relative_position_index.diagonal().eq(12).all() and attn.relative_position_index.max() == 24


def test_shifted_blocks_alternate_and_drop_path_rises_linearly():
    m = SwinTransformer(**TINY, drop_path_rate=0.7)
    blocks = [b for layer in m.layers for b in layer.blocks]
    assert [b.shift_size for b in m.layers[0].blocks] == [0, 1]
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.7, 8).tolist())


@pytest.mark.parametrize(
    "freeze_at, frozen",
    [
        (-1, []),
        (0, ["patch_embed"]),
        (1, ["patch_embed"]),
        (2, ["patch_embed", "layers.0"]),
        (3, ["patch_embed", "layers.0", "layers.1"]),
    ],
)
def test_freeze_at_semantics(freeze_at, frozen):
    m = SwinTransformer(**TINY, frozen_stages=freeze_at).eval().train()
    no_grad = {n for n, p in m.named_parameters() if not p.requires_grad}
    expected = {n for n, _ in m.named_parameters() if any(n.startswith(f + ".") for f in frozen)}
    assert no_grad == expected
    # Frozen parts (and, from FREEZE_AT 2, the position dropout) stay in eval mode through .train().
    in_eval = frozen + (["pos_drop"] if freeze_at >= 2 else [])
    for n, mod in m.named_modules():
        assert mod.training == (not any(n == f or n.startswith(f + ".") for f in in_eval)), n
    assert not any(mod.training for mod in m.eval().modules())


def test_frozen_stage_stays_deterministic_in_train_mode_unlike_detectron2s_class():
    m = SwinTransformer(**TINY, drop_path_rate=0.9, frozen_stages=2)
    m.train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = m(x), m(x)
    assert torch.equal(a["stage2"], b["stage2"])  # frozen stage 0: no stochastic depth
    assert not torch.equal(a["stage5"], b["stage5"])  # trained stages keep it
    # Detectron2's class only freezes in __init__: its train() would re-enable drop path there.
    D2SwinTransformer.train(m)
    assert m.layers[0].training and m.layers[0].blocks[1].drop_path.training


def test_ape_and_backward():
    m = SwinTransformer(**TINY, ape=True, pretrain_img_size=64, frozen_stages=1)
    assert tuple(m.absolute_pos_embed.shape) == (1, 16, 16, 16) and not m.absolute_pos_embed.requires_grad
    out = m(torch.randn(2, 3, 40, 52))
    sum(v.float().pow(2).mean() for v in out.values()).backward()
    grads = [p.grad for p in m.layers.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert m.layers[3].blocks[1].attn.relative_position_bias_table.grad.abs().sum() > 0


def test_builder_registered_and_reads_config():
    cfg = make_cfg()
    cfg.MODEL.SWINT.EMBED_DIM = 8
    cfg.MODEL.SWINT.NUM_HEADS = [1, 1, 2, 2]
    cfg.MODEL.SWINT.OUT_FEATURES = ["stage4", "stage5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = -1
    m = BACKBONE_REGISTRY.get("build_swint_backbone")(cfg, ShapeSpec(channels=3))
    assert isinstance(m, SwinTransformer) and m.layers[2].blocks[0].window_size == 7
    assert {k: (v.channels, v.stride) for k, v in m.output_shape().items()} == {"stage4": (32, 16), "stage5": (64, 32)}
    assert all(p.requires_grad for p in m.parameters())
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    m = BACKBONE_REGISTRY.get("build_swint_backbone")(cfg, ShapeSpec(channels=4))
    assert m.patch_embed.proj.in_channels == 4 and m.frozen_stages == 2
    assert (
        not m.layers[0].blocks[0].attn.qkv.weight.requires_grad and m.layers[1].blocks[0].attn.qkv.weight.requires_grad
    )


def test_lazy_config_and_plain_python_construction():
    m = instantiate(L(SwinTransformer)(**TINY, out_features=["stage4"]))
    assert isinstance(m, SwinTransformer) and list(m.output_shape()) == ["stage4"]
    assert {k: v.shape for k, v in m.state_dict().items()} == {
        k: v.shape for k, v in SwinTransformer(**TINY, out_features=("stage4",)).state_dict().items()
    }


def test_importing_afigan_does_not_import_timm():
    # Detectron2's Swin imports timm only when building a block with drop path, ResNeSt only for split attention.
    code = "import sys, afigan; assert afigan.HAS_DETECTRON2; print('timm' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
