"""The study's blur measure (afigan/benchmark/study/blur.py) on hand-made maps, and its place in
the fidelity scores."""

import pytest
import torch
from torch.nn import functional as F

from afigan.benchmark.study.blur import BlurSums, blur_scores, laplacian


def _sharp(seed=0):
    """A 2-channel 16x16 map of hard-edged squares plus a checkerboard: lots of high frequencies."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(1, 2, 16, 16)
    x[:, 0, 3:9, 4:12] = 1.0
    x[:, 1, 8:14, 2:7] = -2.0
    x[:, 1] += (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 0.5
    return x + 0.05 * torch.randn(x.shape, generator=g)


def _blurred(x):
    k = torch.ones(x.shape[1], 1, 3, 3) / 9.0
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=x.shape[1])


def test_laplacian_of_a_single_spike_and_of_a_ramp():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 1.0
    lap = laplacian(x)
    assert lap.shape == (1, 1, 3, 3)  # valid positions only
    assert lap[0, 0].tolist() == [[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]
    ramp = torch.arange(20.0).view(1, 1, 4, 5)  # linear: no high frequency at all
    assert laplacian(ramp).abs().max() == 0.0
    assert laplacian(torch.ones(1, 3, 2, 9)).shape == (1, 3, 0, 7)  # too small: empty, not an error


def test_a_perfect_copy_has_zero_error_and_ratio_one():
    x = _sharp()
    s = blur_scores(x.clone(), x)
    assert s["hf_l1"] == 0.0
    assert s["hf_ratio"] == 1.0


def test_a_blurred_map_scores_lower_energy_and_higher_error_than_the_sharp_one():
    target = _sharp()
    sharp = _sharp(seed=1)  # the same structure, other noise: a sharp but imperfect prediction
    blurred = _blurred(target)
    s_sharp, s_blur = blur_scores(sharp, target), blur_scores(blurred, target)
    assert s_blur["hf_ratio"] < 0.5 < s_sharp["hf_ratio"]
    assert 0.9 < s_sharp["hf_ratio"] < 1.1
    assert s_blur["hf_l1"] > s_sharp["hf_l1"] > 0
    # Blurring twice loses more.
    assert blur_scores(_blurred(blurred), target)["hf_ratio"] < s_blur["hf_ratio"]


def test_bilinear_x2_of_a_downsampled_map_is_blurrier_than_nearest():
    target = _sharp()
    low = target[..., ::2, ::2]
    near = F.interpolate(low, scale_factor=2.0, mode="nearest")
    bil = F.interpolate(low, scale_factor=2.0, mode="bilinear", align_corners=False)
    assert blur_scores(bil, target)["hf_ratio"] < blur_scores(near, target)["hf_ratio"]


def test_sums_pool_images_and_compare_the_common_window():
    a, b = _sharp(), _sharp(seed=2)
    sums = BlurSums()
    sums.add(a, b)
    sums.add(a[..., :10, :12], b)  # an odd-sized prediction: compared on its 10x12 window
    la, lb = laplacian(a.double()), laplacian(b.double())
    la2, lb2 = laplacian(a[..., :10, :12].double()), laplacian(b[..., :10, :12].double())
    expected_err = float((la - lb).abs().sum() + (la2 - lb2).abs().sum()) / (lb.numel() + lb2.numel())
    assert sums.scores()["hf_l1"] == pytest.approx(expected_err)
    expected_ratio = float(la.pow(2).sum() + la2.pow(2).sum()) / float(lb.pow(2).sum() + lb2.pow(2).sum())
    assert sums.scores()["hf_ratio"] == pytest.approx(expected_ratio)
    assert BlurSums().scores()["hf_l1"] != BlurSums().scores()["hf_l1"]  # NaN when nothing was added
