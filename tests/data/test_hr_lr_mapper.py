import numpy as np
import pytest
import torch

pytest.importorskip("detectron2")

from d2_helpers import make_cfg  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402

from afigan.config import lr_key  # noqa: E402
from afigan.data.hr_lr_mapper import HRLRDatasetMapper  # noqa: E402

AUG = ["INPUT.MIN_SIZE_TRAIN", (96, 128), "INPUT.MAX_SIZE_TRAIN", 200]


@pytest.fixture(scope="module")
def dicts():
    return DatasetCatalog.get("afigan_toy_train")[:6]


def _run(mapper, d, seed):
    np.random.seed(seed)
    return mapper(d)


def _lr_matches_hr(out, r):
    hr_boxes = out["instances"].gt_boxes.tensor
    lr_boxes = out[lr_key("instances", r)].gt_boxes.tensor
    return hr_boxes.shape == lr_boxes.shape and torch.allclose(lr_boxes, hr_boxes * r, atol=1.0)


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_lr_twin_shares_flip_and_geometry(dicts, ratio):
    mapper = HRLRDatasetMapper(make_cfg("toy/fpn_toy.yaml", *AUG, "MODEL.AFI.SCALE_RATIO", ratio), is_train=True)
    flipped = set()
    for seed in range(12):
        d = dicts[seed % len(dicts)]
        out = _run(mapper, d, seed)
        h, w = out["image"].shape[1:]
        lh, lw = out[lr_key("image", ratio)].shape[1:]
        assert (lh, lw) == (int(h * ratio), int(w * ratio))
        assert _lr_matches_hr(out, ratio)
        assert len(out["instances"]) == len(out[lr_key("instances", ratio)]) > 0
        # Which way the HR image was flipped: compare its left edge with the original's.
        x0 = out["instances"].gt_boxes.tensor[:, 0].min().item() * d["width"] / w
        flipped.add(abs(x0 - min(a["bbox"][0] for a in d["annotations"])) > 2)
        # The LR image is the HR image downsampled (same content, same flip).
        small = torch.nn.functional.interpolate(out["image"][None].float(), size=(lh, lw), mode="bilinear")[0]
        assert (small - out[lr_key("image", ratio)].float()).abs().mean() < 12
    assert flipped == {True, False}  # both flip outcomes were exercised


def test_legacy_independent_flip_mirrors_about_half_the_pairs(dicts):
    mapper = HRLRDatasetMapper(
        make_cfg("toy/fpn_toy.yaml", *AUG, "MODEL.AFI.LEGACY.INDEPENDENT_FLIP", True), is_train=True
    )
    mismatched = sum(not _lr_matches_hr(_run(mapper, dicts[s % len(dicts)], s), 0.5) for s in range(24))
    assert 4 <= mismatched <= 20


def test_unreadable_image_is_named(tmp_path, dicts):
    bad = dict(dicts[0], file_name=str(tmp_path / "broken.png"))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    mapper = HRLRDatasetMapper(make_cfg("toy/fpn_toy.yaml"), is_train=True)
    with pytest.raises(OSError, match=r"Cannot read image '.*broken.png'"):
        mapper(bad)
    with pytest.raises(FileNotFoundError, match=r"Image file '.*missing.png' does not exist"):
        mapper(dict(bad, file_name=str(tmp_path / "missing.png")))
