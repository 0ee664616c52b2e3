"""Swin Transformer backbone (spec §12.2) and the released Swin-L BiFPN detector's key contract."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402

import afigan  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import BACKBONE_REGISTRY, build_model  # noqa: E402

from afigan.modeling.backbones.swin import SwinTransformer, WindowAttention, shifted_window_mask  # noqa: E402
from conftest import load_listing, random_state_dict  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWIN_CONFIG = os.path.join(REPO, "configs", "inference", "AFI-GAN_cascade_rcnn_swint_BiFPN_ST.yaml")
TINY = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=3)


def swin_cfg():
    cfg = get_cfg()
    afigan.add_afigan_config(cfg)
    cfg.merge_from_file(SWIN_CONFIG)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


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
        "stage2": (18, 12), "stage3": (9, 6), "stage4": (5, 3), "stage5": (3, 2)}
    assert [k for k in m.state_dict() if k.startswith("norm")] == [f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias")]


def test_subset_of_outputs_has_only_their_norms():
    m = SwinTransformer(**TINY, out_features=("stage3", "stage5"))
    assert list(m.output_shape()) == ["stage3", "stage5"]
    assert not hasattr(m, "norm0") and hasattr(m, "norm1") and hasattr(m, "norm3") and not hasattr(m, "norm2")
    with pytest.raises(ValueError, match="MODEL.SWINT.OUT_FEATURES"):
        SwinTransformer(**TINY, out_features=("res4",))


def test_window_attention_equals_explicit_formula():
    attn = WindowAttention(dim=12, window_size=3, num_heads=3).eval()
    x = torch.randn(8, 9, 12)
    mask = shifted_window_mask(6, 6, 3, 1, "cpu")  # 4 windows
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    n, h, d = 9, 3, 4
    q, k, v = attn.qkv(x).reshape(8, n, 3, h, d).permute(2, 0, 3, 1, 4)
    logits = (q * d ** -0.5) @ k.transpose(-2, -1)
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


@pytest.mark.parametrize("freeze_at, frozen", [
    (-1, []), (0, ["patch_embed"]), (1, ["patch_embed"]), (2, ["patch_embed", "layers.0"]),
    (3, ["patch_embed", "layers.0", "layers.1"]),
])
def test_freeze_at_semantics(freeze_at, frozen):
    m = SwinTransformer(**TINY, frozen_stages=freeze_at).train()
    no_grad = {n for n, p in m.named_parameters() if not p.requires_grad}
    expected = {n for n, _ in m.named_parameters() if any(n.startswith(f + ".") for f in frozen)}
    assert no_grad == expected
    for name in frozen:  # frozen parts stay in eval mode through .train()
        assert not m.get_submodule(name).training


def test_ape_and_backward():
    m = SwinTransformer(**TINY, ape=True, pretrain_img_size=64, frozen_stages=1)
    assert tuple(m.absolute_pos_embed.shape) == (1, 16, 16, 16) and not m.absolute_pos_embed.requires_grad
    out = m(torch.randn(2, 3, 40, 52))
    sum(v.float().pow(2).mean() for v in out.values()).backward()
    grads = [p.grad for p in m.layers.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert m.layers[3].blocks[1].attn.relative_position_bias_table.grad.abs().sum() > 0


def test_builder_registered_and_reads_config():
    cfg = get_cfg()
    afigan.add_afigan_config(cfg)
    cfg.MODEL.SWINT.EMBED_DIM = 8
    cfg.MODEL.SWINT.NUM_HEADS = [1, 1, 2, 2]
    cfg.MODEL.SWINT.OUT_FEATURES = ["stage4", "stage5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = -1
    m = BACKBONE_REGISTRY.get("build_swint_backbone")(cfg, ShapeSpec(channels=3))
    assert isinstance(m, SwinTransformer) and m.layers[2].blocks[0].window_size == 7
    assert {k: (v.channels, v.stride) for k, v in m.output_shape().items()} == {"stage4": (32, 16), "stage5": (64, 32)}
    assert all(p.requires_grad for p in m.parameters())


def test_importing_afigan_does_not_import_timm():
    code = "import sys, afigan; assert afigan.HAS_DETECTRON2; print('timm' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
