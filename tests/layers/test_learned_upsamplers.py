"""The pure-PyTorch learned upsamplers (DySample, CARAFE, FADE, deconv, pixel shuffle): parameter
counts, shapes, the mathematics against naive per-pixel loops, gradients, tracing and ONNX."""

import inspect
import io
import itertools
import re

import pytest
import torch
from torch.nn import functional as F

from afigan.layers import (
    CARAFE,
    FADE,
    AFInterpolator,
    DySample,
    build_upsampler,
    carafe_reassemble,
    fit_to,
    is_guided,
    upsampler_kinds,
    upsampler_kwargs,
)
from afigan.layers.fade import SemiShift

LEARNED = ["dysample", "carafe", "fade", "deconv", "pixelshuffle"]
ALL = ["nearest", "bilinear", "afi"] + LEARNED
SMALL = {"afi": dict(num_blocks=1, growth=4)}  # keeps the AF interpolator cheap in the trace/ONNX tests


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def guide_for(kind, x, size=None):
    """Keyword arguments of a call: the finer guide for guided kinds, nothing otherwise."""
    if not is_guided(kind):
        return {}
    n, c, h, w = x.shape
    return {"guide": torch.randn(n, c, *(size or (2 * h, 2 * w)))}


def one_sentence(message: str) -> str:
    assert "\n" not in message and message.endswith("."), message
    assert not re.search(r"[.?!] [A-Z][a-z]", message), message
    return message


# -- registry --------------------------------------------------------------------------------------


def test_exact_parameter_counts_at_256_channels():
    counts = {kind: count(build_upsampler(kind, 256)) for kind in LEARNED}
    assert counts == {
        "dysample": 8_224,  # lp, g4: 1x1 conv 256 -> 2*4*2^2 = 32, with bias
        "carafe": 74_148,  # 256*64 + 64 + 64*(2^2*5^2)*3*3 + 100
        "fade": 47_514,  # gate 256+1, conv1_en 256*64+64, conv1_de 256*64, 5^2*64*3*3 + 25
        "deconv": 1_048_832,  # ConvTranspose2d k4: C*C*4*4 + C = 256*256*16 + 256
        "pixelshuffle": 2_360_320,  # 3x3 conv C -> 4C: C*4C*3*3 + 4C = 256*1024*9 + 1024
    }
    assert count(build_upsampler("dysample", 256, dyscope=True)) == 16_416  # + scope conv 256*32, no bias
    assert count(build_upsampler("dysample", 256, style="pl")) == 64 * 8 + 8  # 1x1 conv C/4 -> 2*g


def test_kinds_kwargs_and_guided():
    assert set(ALL) <= set(upsampler_kinds())
    assert upsampler_kwargs("dysample") == {"style": "lp", "groups": 4, "dyscope": False}
    assert upsampler_kwargs("carafe") == {"up_kernel": 5, "encoder_kernel": 3, "compressed_channels": 64}
    assert upsampler_kwargs("fade") == {"up_kernel": 5, "embedding": 64}
    assert upsampler_kwargs("deconv") == upsampler_kwargs("pixelshuffle") == {}
    assert upsampler_kwargs("nearest") == upsampler_kwargs("bilinear") == {}
    afi_defaults = {
        k: p.default
        for k, p in inspect.signature(AFInterpolator.__init__).parameters.items()
        if k not in ("self", "channels")
    }
    assert upsampler_kwargs("afi") == afi_defaults
    for kind in ALL:
        up = build_upsampler(kind, 8, **SMALL.get(kind, {}))
        assert is_guided(kind) is is_guided(up) is type(up).guided is (kind == "fade")
        params = inspect.signature(up.forward).parameters
        assert list(params)[:3] == ["x", "output_size", "guide"] and params["guide"].default is None


def test_state_dict_names_are_the_authors():
    # DySample (tiny-smart/dysample), CARAFEPack (mmcv) and FADE (poppinace/fade) name their
    # parameters so; keeping the names lets their released state dicts load with strict=True.
    keys = {kind: sorted(build_upsampler(kind, 8).state_dict()) for kind in ("dysample", "carafe", "fade")}
    assert keys["dysample"] == ["init_pos", "offset.bias", "offset.weight"]
    assert sorted(build_upsampler("dysample", 8, dyscope=True).state_dict()) == [
        "init_pos",
        "offset.bias",
        "offset.weight",
        "scope.weight",
    ]
    assert keys["carafe"] == [
        "channel_compressor.bias",
        "channel_compressor.weight",
        "content_encoder.bias",
        "content_encoder.weight",
    ]
    assert keys["fade"] == [
        "gate_generator.conv.bias",
        "gate_generator.conv.weight",
        "kernel_generator.conv1_de.weight",
        "kernel_generator.conv1_en.bias",
        "kernel_generator.conv1_en.weight",
        "kernel_generator.conv2_bias",
        "kernel_generator.conv2_kernels",
    ]


def test_kwargs_reach_the_modules():
    up = build_upsampler("dysample", 16, style="pl", groups=2, dyscope=True)
    assert isinstance(up, DySample) and (up.style, up.groups, up.scope is not None) == ("pl", 2, True)
    up = build_upsampler("carafe", 8, up_kernel=3, encoder_kernel=1, compressed_channels=4)
    assert up.content_encoder.weight.shape == (4 * 9, 4, 1, 1) and up.up_kernel == 3
    up = build_upsampler("fade", 8, up_kernel=3, embedding=6)
    assert up.kernel_generator.conv2_kernels.shape == (9, 6, 3, 3)


@pytest.mark.parametrize(
    "kind, kwargs, match",
    [
        ("dysample", dict(style="xy"), r"style must be 'lp' or 'pl', got 'xy'"),
        ("dysample", dict(groups=3), r"channels must be a positive multiple of groups=3, got 8"),
        ("dysample", dict(groups=0), r"groups must be a positive integer, got 0"),
        ("dysample", dict(dyscope="yes"), r"dyscope must be True or False"),
        ("carafe", dict(up_kernel=4), r"CARAFE up_kernel must be a positive odd integer \(1, 3, 5, \.\.\.\), got 4"),
        ("carafe", dict(encoder_kernel=0), r"CARAFE encoder_kernel must be a positive odd integer"),
        ("carafe", dict(compressed_channels=0), r"compressed_channels must be a positive integer"),
        ("fade", dict(up_kernel=2), r"FADE up_kernel must be a positive odd integer"),
        ("fade", dict(embedding=-1), r"FADE embedding must be a positive integer"),
        (
            "dysample",
            dict(scale=2),
            r"Unknown keyword argument\(s\) \['scale'\] for upsampler kind 'dysample'; "
            r"accepted: \['dyscope', 'groups', 'style'\]",
        ),
        ("deconv", dict(up_kernel=3), r"accepted: \[\]"),
    ],
)
def test_bad_arguments_are_one_sentence_errors(kind, kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        build_upsampler(kind, 8, **kwargs)
    one_sentence(str(e.value))


def test_pl_needs_channels_divisible_by_four():
    with pytest.raises(ValueError, match=r"channels must be a multiple of 4 for style 'pl', got 6") as e:
        build_upsampler("dysample", 6, style="pl", groups=2)
    one_sentence(str(e.value))
    # The authors' constraints are C % groups == 0 and C % 4 == 0, not C % (4 * groups) == 0.
    assert build_upsampler("dysample", 8, style="pl", groups=8)(torch.randn(1, 8, 2, 3)).shape == (1, 8, 4, 6)


def test_unknown_kind():
    for call in (
        lambda: build_upsampler("bicubic", 8),
        lambda: upsampler_kwargs("bicubic"),
        lambda: is_guided("bicubic"),
    ):
        with pytest.raises(
            ValueError, match=re.escape(f"Unknown upsampler kind 'bicubic'; expected one of {upsampler_kinds()}.")
        ):
            call()


def test_guided_kind_without_guide_is_a_one_sentence_error():
    up = build_upsampler("fade", 4)
    with pytest.raises(ValueError, match=r"FADE is a guided upsampler: pass guide=") as e:
        up(torch.randn(1, 4, 3, 3))
    one_sentence(str(e.value))
    for size in [(4, 6), (6, 9), (1, 1)]:  # beyond 2h +- 1
        with pytest.raises(
            ValueError, match=r"FADE guide must be \(N, C, H, W\) with N = 1, H in 5\.\.7 and W in 5\.\.7"
        ) as e:
            up(torch.randn(1, 4, 3, 3), guide=torch.randn(1, 4, *size))
        one_sentence(str(e.value))
    with pytest.raises(ValueError, match=r"FADE guide expects a 4-D tensor of shape \(N, 4, H, W\)"):
        up(torch.randn(1, 4, 3, 3), guide=torch.randn(1, 5, 6, 6))


# -- shapes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", LEARNED)
def test_shapes_odd_sizes_and_output_size(kind):
    up = build_upsampler(kind, 8)
    x = torch.randn(2, 8, 3, 5)
    g = guide_for(kind, x)
    assert up(x, **g).shape == (2, 8, 6, 10)
    assert up(x, (5, 11), **g).shape == (2, 8, 5, 11)
    out = up(x, **g)
    assert torch.equal(up(x, output_size=(7, 9), **g), F.pad(out, (0, 0, 0, 1), mode="replicate")[..., :7, :9])
    with pytest.raises(ValueError, match=r"expects a 4-D tensor of shape \(N, 8, H, W\)"):
        up(torch.randn(2, 6, 3, 5), **g)


def test_fade_guide_of_an_odd_lateral():
    up = build_upsampler("fade", 4)
    x = torch.randn(1, 4, 3, 4)
    for gh, gw in itertools.product((5, 6, 7), (7, 8, 9)):
        g = torch.randn(1, 4, gh, gw)
        out = up(x, (gh, gw), guide=g)
        assert out.shape == (1, 4, gh, gw)
        assert torch.equal(out, up(x, (gh, gw), guide=fit_to(g, (6, 8))))


# -- mathematics -----------------------------------------------------------------------------------


@pytest.mark.parametrize("style, dyscope", [("lp", False), ("lp", True), ("pl", False), ("pl", True)])
def test_dysample_with_zero_offsets_is_bilinear(style, dyscope):
    up = build_upsampler("dysample", 8, style=style, groups=2, dyscope=dyscope)
    with torch.no_grad():
        up.offset.weight.zero_()
        up.offset.bias.zero_()
        if dyscope:
            up.scope.weight.normal_()  # the scope multiplies a zero offset: no effect
    x = torch.randn(2, 8, 3, 5)
    expected = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    # Includes the border rows/columns, whose sub-pixel positions fall outside the map.
    torch.testing.assert_close(up(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("style", ["lp", "pl"])
def test_dysample_matches_naive_bilinear_sampling(style):
    up = build_upsampler("dysample", 8, style=style, groups=2, dyscope=True).double()
    with torch.no_grad():
        for p in up.parameters():
            p.normal_(std=2.0)  # offsets of several pixels: many points clamp at the border
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64)
    off = up._offsets(x)  # (N, 2 * g * 4, h, w): [x | y] x group x sub-pixel (a, b)
    n, c, h, w = x.shape
    expected = torch.empty(n, c, 2 * h, 2 * w, dtype=torch.float64)
    for b, gi, i, j in itertools.product(range(n), range(2), range(2 * h), range(2 * w)):
        k = gi * 4 + (i % 2) * 2 + j % 2
        # Index coordinates: source pixel (i//2, j//2) plus its offset, clamped onto the map.
        px = min(max(j // 2 + off[b, k, i // 2, j // 2].item(), 0.0), w - 1.0)
        py = min(max(i // 2 + off[b, 8 + k, i // 2, j // 2].item(), 0.0), h - 1.0)
        x0, y0 = int(px), int(py)
        x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
        fx, fy = px - x0, py - y0
        src = x[b, gi * 4 : gi * 4 + 4]
        expected[b, gi * 4 : gi * 4 + 4, i, j] = (1 - fy) * ((1 - fx) * src[:, y0, x0] + fx * src[:, y0, x1]) + fy * (
            (1 - fx) * src[:, y1, x0] + fx * src[:, y1, x1]
        )
    torch.testing.assert_close(up(x), expected)


def test_dysample_initial_positions_are_the_authors():
    # (x, y) of sub-pixel (a, b) relative to its source pixel: x = (b - 0.5) / 2, y = (a - 0.5) / 2, per group.
    pos = build_upsampler("dysample", 8, groups=2).init_pos.view(2, 2, 2, 2)
    q = 0.25
    assert torch.equal(pos[0], torch.tensor([[-q, q], [-q, q]]).expand(2, 2, 2))
    assert torch.equal(pos[1], torch.tensor([[-q, -q], [q, q]]).expand(2, 2, 2))


def _naive_reassemble(x, kernels, k_up, scale):
    """``out[n, :, I, J] = sum_(dy, dx) kernels[n, (dy + r) * k_up + dx + r, I, J] * x[n, :, I//s + dy, J//s + dx]``."""
    n, c, h, w = x.shape
    r = k_up // 2
    out = torch.zeros(n, c, h * scale, w * scale, dtype=x.dtype)
    for b, i, j in itertools.product(range(n), range(h * scale), range(w * scale)):
        for dy, dx in itertools.product(range(-r, r + 1), range(-r, r + 1)):
            y, xx = i // scale + dy, j // scale + dx
            if 0 <= y < h and 0 <= xx < w:  # zero padding outside the map
                out[b, :, i, j] += kernels[b, (dy + r) * k_up + dx + r, i, j] * x[b, :, y, xx]
    return out


def test_carafe_reassemble_matches_naive_loop():
    x = torch.randn(2, 4, 3, 4, dtype=torch.float64)
    for k_up, scale in [(5, 2), (3, 2), (3, 3)]:
        kernels = torch.randn(2, k_up * k_up, 3 * scale, 4 * scale, dtype=torch.float64)
        torch.testing.assert_close(
            carafe_reassemble(x, kernels, k_up, scale), _naive_reassemble(x, kernels, k_up, scale)
        )


def test_carafe_module_matches_naive_loop():
    up = CARAFE(4, up_kernel=5, encoder_kernel=3, compressed_channels=3).double()
    with torch.no_grad():
        up.content_encoder.weight.normal_()  # far from uniform kernels
    x = torch.randn(2, 4, 3, 4, dtype=torch.float64)
    enc = up.content_encoder(up.channel_compressor(x))  # (N, 4 * 25, 3, 4): channel k*4 + a*2 + b
    kernels = torch.empty(2, 25, 6, 8, dtype=torch.float64)
    for i, j in itertools.product(range(6), range(8)):
        raw = enc[:, [k * 4 + (i % 2) * 2 + j % 2 for k in range(25)], i // 2, j // 2]
        kernels[:, :, i, j] = torch.softmax(raw, dim=1)
    torch.testing.assert_close(up(x), _naive_reassemble(x, kernels, 5, 2))


def test_carafe_with_uniform_kernels_is_the_neighbourhood_mean():
    up = build_upsampler("carafe", 4)
    with torch.no_grad():
        up.content_encoder.weight.zero_()
        up.content_encoder.bias.zero_()
    x = torch.randn(2, 4, 3, 5)
    mean = F.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=True)  # zeros count, as in CARAFE
    torch.testing.assert_close(up(x), F.interpolate(mean, scale_factor=2, mode="nearest"), rtol=0, atol=1e-6)


def test_fade_semi_shift_equals_the_authors_four_shift_form():
    gen = SemiShift(4, embedding=3, up_kernel=3).double()
    with torch.no_grad():
        gen.conv2_bias.normal_()
    en, de = torch.randn(2, 4, 6, 8, dtype=torch.float64), torch.randn(2, 4, 3, 4, dtype=torch.float64)
    c = gen.conv1_en(en)
    parts = []  # the stride-2 conv over the four one-pixel paddings gives sub-pixel (a, b) = (0,0), (0,1), (1,0), (1,1)
    for pad in ([1, 0, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1], [0, 1, 0, 1]):
        parts.append(F.conv2d(F.pad(c, pad), gen.conv2_kernels, gen.conv2_bias, stride=2))
    parts = torch.stack(parts, 1) + F.conv2d(gen.conv1_de(de), gen.conv2_kernels, gen.conv2_bias, padding=1).unsqueeze(
        1
    )
    expected = parts.view(2, 2, 2, 9, 3, 4).permute(0, 3, 4, 1, 5, 2).reshape(2, 9, 6, 8)
    torch.testing.assert_close(gen(en, de), expected)


def test_fade_matches_naive_loop():
    up = FADE(4, up_kernel=3, embedding=3).double()
    with torch.no_grad():
        for p in up.parameters():
            p.normal_()
    de = torch.randn(2, 4, 3, 4, dtype=torch.float64)
    en = torch.randn(2, 4, 6, 8, dtype=torch.float64)
    kg, wk, bk = up.kernel_generator, up.kernel_generator.conv2_kernels, up.kernel_generator.conv2_bias
    c_en = torch.einsum("oc,nchw->nohw", kg.conv1_en.weight[:, :, 0, 0], en) + kg.conv1_en.bias.view(1, -1, 1, 1)
    c_de = torch.einsum("oc,nchw->nohw", kg.conv1_de.weight[:, :, 0, 0], de)

    def window(m, i, j):  # (N, E, 3, 3) window centred at (i, j), zero outside
        out = torch.zeros(m.shape[0], m.shape[1], 3, 3, dtype=m.dtype)
        for u, v in itertools.product(range(3), range(3)):
            if 0 <= i + u - 1 < m.shape[2] and 0 <= j + v - 1 < m.shape[3]:
                out[:, :, u, v] = m[:, :, i + u - 1, j + v - 1]
        return out

    gw, gb = up.gate_generator.conv.weight[0, :, 0, 0], up.gate_generator.conv.bias[0]
    kernels = torch.empty(2, 9, 6, 8, dtype=torch.float64)
    gate = torch.empty(2, 1, 6, 8, dtype=torch.float64)
    for i, j in itertools.product(range(6), range(8)):
        raw = torch.einsum("nehw,kehw->nk", window(c_en, i, j), wk) + bk
        raw = raw + torch.einsum("nehw,kehw->nk", window(c_de, i // 2, j // 2), wk) + bk
        kernels[:, :, i, j] = torch.softmax(raw, dim=1)
        gate[:, 0, i, j] = torch.sigmoid(de[:, :, i // 2, j // 2] @ gw + gb)
    expected = gate * en + (1 - gate) * _naive_reassemble(de, kernels, 3, 2)
    torch.testing.assert_close(up(de, guide=en), expected)


def test_fresh_deconv_is_bilinear_inside_the_border():
    up = build_upsampler("deconv", 3)
    x = torch.randn(2, 3, 4, 5)
    expected = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(up(x)[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], rtol=0, atol=1e-6)


def test_fresh_pixelshuffle_has_no_checkerboard():
    up = build_upsampler("pixelshuffle", 3)
    y = up(torch.randn(2, 3, 4, 5))
    torch.testing.assert_close(y, F.interpolate(y[..., ::2, ::2], scale_factor=2, mode="nearest"))


# -- gradients, tracing, ONNX ----------------------------------------------------------------------


GRAD_CASES = [(k, {}) for k in LEARNED] + [
    ("dysample", dict(dyscope=True)),
    ("dysample", dict(style="pl", dyscope=True)),
]


@pytest.mark.parametrize("kind, kwargs", GRAD_CASES)
def test_gradients_reach_every_parameter(kind, kwargs):
    up = build_upsampler(kind, 8, **kwargs)
    x = torch.randn(2, 8, 3, 5, requires_grad=True)
    g = guide_for(kind, x)
    for v in g.values():
        v.requires_grad_(True)
    up(x, (7, 9), **g).pow(2).sum().backward()
    for name, p in up.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0 and all(v.grad.abs().sum() > 0 for v in g.values())


# torch 2.14 deprecates torch.jit.trace in favour of torch.export; tracing is still what is tested here.
TRACE_DEPRECATED = pytest.mark.filterwarnings("ignore:`torch.jit.trace(_method)?` is deprecated:FutureWarning")
# check_feature_map (shape.py) of the interpolation kinds and the AF interpolator compares traced sizes.
TRACED_SIZE_CHECK = pytest.mark.filterwarnings("ignore:Converting a tensor to a Python boolean:torch.jit.TracerWarning")


@TRACE_DEPRECATED
@TRACED_SIZE_CHECK
@pytest.mark.parametrize("kind", ALL)
def test_every_kind_traces(kind):
    up = build_upsampler(kind, 8, **SMALL.get(kind, {})).eval()
    x = torch.randn(1, 8, 3, 5)
    g = guide_for(kind, x, (7, 9))
    traced = torch.jit.trace(up, example_kwarg_inputs={"x": x, **g})
    torch.testing.assert_close(traced(x=x, **g), up(x, **g))
    if kind in LEARNED:  # the new kinds emit no TracerWarning (the filter above is for the old ones)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error", torch.jit.TracerWarning)
            torch.jit.trace(up, example_kwarg_inputs={"x": x, **g}, check_trace=False)


@TRACED_SIZE_CHECK
@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")
# The exporter's note that it leaves the reassembly's kernel-tap slices unfolded (as tools/export_model.py filters it).
@pytest.mark.filterwarnings("ignore:Constant folding - Only steps=1 can be constant folded:UserWarning")
@pytest.mark.parametrize("kind", ALL)
def test_every_kind_exports_to_onnx_opset17(kind):
    ort = pytest.importorskip("onnxruntime")
    up = build_upsampler(kind, 8, **SMALL.get(kind, {})).eval()
    x = torch.randn(1, 8, 3, 5)
    g = guide_for(kind, x, (7, 9))
    f = io.BytesIO()
    # dynamo=False: torch 2.14's default torch.export-based exporter has no opset-17 Pad (it
    # falls back to opset 18 for FADE) and takes seconds per module; the TorchScript exporter
    # writes opset 17 directly.
    torch.onnx.export(up, (x,), f, kwargs=g, opset_version=17, dynamo=False)
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    feeds = {i.name: v.numpy() for i, v in zip(sess.get_inputs(), [x, *g.values()])}
    (out,) = sess.run(None, feeds)
    torch.testing.assert_close(torch.from_numpy(out), up(x, **g).detach(), rtol=1e-4, atol=1e-5)
