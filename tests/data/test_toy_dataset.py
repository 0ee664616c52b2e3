import json
import os

import numpy as np
import pytest

from afigan.data.toy_shapes import ensure_toy_dataset, make_toy_dataset, toy_dataset_ready, toy_paths

pycocotools = pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    return make_toy_dataset(str(tmp_path_factory.mktemp("toy") / "afigan_toy"), num_train=12, num_val=4, seed=3)


def test_json_loads_with_pycocotools(toy_root):
    for split, n in (("train", 12), ("val", 4)):
        json_file, image_root = toy_paths(toy_root, split)
        coco = COCO(json_file)
        assert len(coco.getImgIds()) == n
        assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds())) == ["disc", "square", "triangle"]
        assert len(coco.getAnnIds()) >= n
        for img in coco.loadImgs(coco.getImgIds()):
            assert os.path.isfile(os.path.join(image_root, img["file_name"]))


def test_polygons_inside_images_and_boxes_match_masks(toy_root):
    coco = COCO(toy_paths(toy_root, "train")[0])
    for ann in coco.loadAnns(coco.getAnnIds()):
        img = coco.loadImgs(ann["image_id"])[0]
        poly = np.array(ann["segmentation"][0]).reshape(-1, 2)
        assert poly[:, 0].min() >= 0 and poly[:, 0].max() <= img["width"]
        assert poly[:, 1].min() >= 0 and poly[:, 1].max() <= img["height"]
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], img["height"], img["width"]))
        assert mask_utils.area(rle) > 0
        # Compare corners: pycocotools rasterises at pixel centres and may drop a thin tip, so the
        # mask box can be up to ~1 px inside the polygon extent on each side (1.5 px bound).
        mx, my, mw, mh = mask_utils.toBbox(rle)
        bx, by, bw, bh = ann["bbox"]
        assert np.allclose([mx, my, mx + mw, my + mh], [bx, by, bx + bw, by + bh], atol=1.5), (
            ann["bbox"],
            (mx, my, mw, mh),
        )
        assert ann["area"] == pytest.approx(float(mask_utils.area(rle)), rel=0.25)


def test_all_scales_present(toy_root):
    coco = COCO(toy_paths(toy_root, "train")[0])
    areas = [a["area"] for a in coco.loadAnns(coco.getAnnIds())]
    assert min(areas) < 32**2 and max(areas) > 96**2
    assert any(32**2 <= a <= 96**2 for a in areas)


def test_deterministic_from_seed(tmp_path):
    a = make_toy_dataset(str(tmp_path / "a"), 3, 2, seed=7)
    b = make_toy_dataset(str(tmp_path / "b"), 3, 2, seed=7)
    c = make_toy_dataset(str(tmp_path / "c"), 3, 2, seed=8)
    load = lambda root: json.load(open(toy_paths(root, "train")[0]))["annotations"]  # noqa: E731
    assert load(a) == load(b)
    assert load(a) != load(c)
    with open(os.path.join(a, "train", "000001.png"), "rb") as fa, open(
        os.path.join(b, "train", "000001.png"), "rb"
    ) as fb:
        assert fa.read() == fb.read()


def test_ensure_creates_once(tmp_path):
    root = str(tmp_path / "t")
    assert not toy_dataset_ready(root)
    ensure_toy_dataset(root, num_train=2, num_val=1)
    stamp = os.path.getmtime(toy_paths(root, "train")[0])
    ensure_toy_dataset(root, num_train=2, num_val=1)
    assert os.path.getmtime(toy_paths(root, "train")[0]) == stamp
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".toy-")]  # no temporary left over
