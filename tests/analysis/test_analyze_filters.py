"""The filter diagnostic: its high-frequency measures, stage selection, and tools/analyze_filters.py end to end."""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from afigan.analysis.features import spectral_energies
from afigan.analysis.filters import (
    kernel_hf_share,
    stage_weight_stats,
    stage_weights_from_state_dict,
    white_noise_hf_share,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/<folder>/ -> repo
LAPLACIAN = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]])
GAUSSIAN = torch.exp(-((torch.arange(3.0) - 1)[:, None] ** 2 + (torch.arange(3.0) - 1)[None, :] ** 2) / 2)


def _fft_hf_share(kernel, cut=0.25, grid=32):
    """Brute force: energy of the zero-padded 2-D DFT above the radial cut."""
    energy = torch.fft.fft2(kernel.double(), s=(grid, grid)).abs() ** 2
    f = torch.fft.fftfreq(grid, dtype=torch.float64)
    high = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2) > cut
    return float(energy[high].sum() / energy.sum())


def test_laplacian_ranks_above_white_noise_above_gaussian():
    lap, gauss, noise = kernel_hf_share(LAPLACIAN), kernel_hf_share(GAUSSIAN), white_noise_hf_share()
    assert lap > noise > gauss
    assert lap == pytest.approx(_fft_hf_share(LAPLACIAN)) and gauss == pytest.approx(_fft_hf_share(GAUSSIAN))
    assert lap > 0.95 and gauss < 0.25
    # A stage's share is energy-weighted: stacking both kernels lands between them.
    both = kernel_hf_share(torch.stack([LAPLACIAN, GAUSSIAN])[:, None])
    e_l, e_g = LAPLACIAN.pow(2).sum().item(), GAUSSIAN.pow(2).sum().item()
    assert both == pytest.approx((lap * e_l + gauss * e_g) / (e_l + e_g))


def test_hf_share_matches_the_fft_for_any_kernel_shape_and_skips_1x1():
    k = torch.randn(5, 7, generator=torch.Generator().manual_seed(3))
    assert kernel_hf_share(k) == pytest.approx(_fft_hf_share(k))
    assert kernel_hf_share(k, cut=0.1) == pytest.approx(_fft_hf_share(k, cut=0.1))
    assert kernel_hf_share(torch.randn(4, 4, 1, 1)) is None
    f = torch.fft.fftfreq(32, dtype=torch.float64)
    assert white_noise_hf_share() == pytest.approx(
        float((torch.sqrt(f[:, None] ** 2 + f[None] ** 2) > 0.25).double().mean())
    )


def test_stage_selection_prefers_the_detector_backbone_and_stats_are_exact():
    a = torch.tensor([1.0, 2, 3, 4]).view(1, 1, 2, 2)  # norm sqrt(30), var 5/3
    b = LAPLACIAN.view(1, 1, 3, 3)  # norm sqrt(20), mean 0, var 20/8
    state = {
        "teacher.backbone.bottom_up.res3.0.conv1.weight": torch.zeros(1, 1, 3, 3),
        "backbone.bottom_up.res3.0.conv1.weight": a,
        "backbone.bottom_up.res3.0.conv2.weight": b,
        "backbone.bottom_up.res3.0.conv1.norm.weight": torch.ones(1),  # not a conv weight
        "backbone.bottom_up.stem.conv1.weight": b,
        "roi_heads.box_head.fc1.weight": torch.ones(2, 2),
    }
    found = stage_weights_from_state_dict(state)
    assert list(found) == ["stem", "res3"]
    assert [k for k, _ in found["res3"]] == [
        "backbone.bottom_up.res3.0.conv1.weight",
        "backbone.bottom_up.res3.0.conv2.weight",
    ]
    stats = stage_weight_stats([t for _, t in found["res3"]])
    assert stats["fro_sum"] == pytest.approx(30**0.5 + 20**0.5)
    assert stats["var_sum"] == pytest.approx(5 / 3 + 20 / 8)
    assert stats["tensors"] == 2 and stats["params"] == 13 and stats["kernels"] == 2
    e_a, e_b = 30.0, 20.0
    assert stats["kernel_hf"] == pytest.approx(
        (_fft_hf_share(a[0, 0]) * e_a + _fft_hf_share(b[0, 0]) * e_b) / (e_a + e_b)
    )
    with pytest.raises(KeyError, match="res5"):
        stage_weights_from_state_dict(state, ["res5"])


def test_feature_hf_share_separates_smooth_from_edgy_maps():
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    smooth = torch.cos(2 * torch.pi * x / 32)[None]  # 1/32 cycles/px
    checker = ((x + y) % 2 * 2 - 1)[None]  # 0.5 cycles/px
    hs, ts = spectral_energies(smooth)
    hc, tc = spectral_energies(checker)
    assert hs / ts < 0.01 and hc / tc > 0.99
    assert spectral_energies(torch.randn(3, 7, 40)) is None


# ---- end to end on a toy checkpoint (needs Detectron2 and matplotlib) ----


def _tool():
    spec = importlib.util.spec_from_file_location("analyze_filters", os.path.join(REPO, "tools", "analyze_filters.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_images(directory, n=2):
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(directory)
    for i in range(n):
        img = np.full((96, 128, 3), 40, np.uint8)
        for _ in range(4):
            y0, x0 = rng.integers(0, 70, 2)
            img[y0 : y0 + 25, x0 : x0 + 40] = rng.integers(80, 255, 3)
        Image.fromarray(img).save(os.path.join(directory, f"{i}.png"))


def test_tool_runs_end_to_end_and_reads_a_sharpened_res3_and_blurred_res5(tmp_path):
    pytest.importorskip("detectron2")
    pytest.importorskip("matplotlib")
    from d2_helpers import make_cfg
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    config = os.path.join(REPO, "configs", "toy", "fe_retinanet_R_18_FPN.yaml")
    cfg = make_cfg("toy/fe_retinanet_R_18_FPN.yaml")
    model = build_model(cfg)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("base")
    # "FE" checkpoint: every 3x3 kernel of res3 gets a Laplacian added, every one of res5 is
    # replaced by a Gaussian of its mean -- so the claimed direction is known for each stage.
    with torch.no_grad():
        for m in model.backbone.bottom_up.res3.modules():
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3):
                m.weight += 0.2 * LAPLACIAN
        for m in model.backbone.bottom_up.res5.modules():
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3):
                m.weight.copy_(m.weight.mean((2, 3), keepdim=True) * GAUSSIAN)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("fe")
    _write_images(str(tmp_path / "images"))

    out = tmp_path / "report"
    paths = _tool().main(
        [
            str(tmp_path / "base.pth"),
            str(tmp_path / "fe.pth"),
            "--config-file",
            config,
            "--images",
            str(tmp_path / "images"),
            "--image-size",
            "128",
            "-o",
            str(out),
        ]
    )
    assert set(paths) == {"md", "json", "png"}
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(paths["png"]) > 10_000
    report = json.load(open(paths["json"]))
    base, fe = (r["stages"] for r in report["results"])
    assert list(base) == ["stem", "res2", "res3", "res4", "res5"]
    assert fe["res3"]["kernel_hf"] > base["res3"]["kernel_hf"] and fe["res5"]["kernel_hf"] < base["res5"]["kernel_hf"]
    assert fe["res3"]["edge_gain"] is not None and base["res5"]["edge_gain"] is None  # res5 is 4x4 at 128 px
    assert base["res2"]["tensors"] == 4 and base["res3"]["tensors"] == 5  # res3 has a projection shortcut
    text = open(paths["md"]).read()
    assert text.count("| base.pth |") == 5 and text.count("| fe.pth |") == 5
    assert "res3 kernel HF share (claimed up)" in text and "(up, as intended)" in text
    assert "res5 kernel HF share (claimed down)" in text and "(down, as intended)" in text
    # Weights only: the same numbers straight from the file, without building the model.
    paths2 = _tool().main([str(tmp_path / "fe.pth"), "-o", str(tmp_path / "weights_only")])
    only = json.load(open(paths2["json"]))["results"][0]["stages"]
    assert only["res3"]["kernel_hf"] == pytest.approx(fe["res3"]["kernel_hf"])
    assert "edge_gain" not in only["res3"]


def test_verdicts_call_changes_within_the_noise_floor_no_measurable_change():
    from afigan.analysis.filters import kernel_hf_noise, stage_weight_stats
    from afigan.analysis.report import verdicts

    g = torch.Generator().manual_seed(0)
    shapes = ((32, 16, 3, 3), (32, 32, 3, 3))
    base = [torch.randn(*s, generator=g) for s in shapes]
    noise = kernel_hf_noise(shapes)
    assert 0 < noise < 0.01  # white-noise stages of this size scatter by well under 1 %
    tiny = [w * 1.002 + 1e-4 * torch.randn(w.shape, generator=g) for w in base]  # a change far below the floor
    sharper = [w - w.mean((2, 3), keepdim=True) for w in base]  # DC removed: clearly more high-frequency energy

    def lines(b):
        result = lambda label, ws: {"label": label, "stages": {"res3": stage_weight_stats(ws)}}  # noqa: E731
        return "\n".join(verdicts([result("base", base), result("fe", b)], sharp_stages=("res3",), smooth_stages=()))

    assert "kernel HF share (claimed up)" in lines(tiny) and "no measurable change" in lines(tiny)
    assert "ΣVar(W) (sharp target)" in lines(tiny) and "as intended" not in lines(tiny)
    assert "kernel HF share (claimed up): " in lines(sharper) and "(up, as intended)" in lines(sharper)
