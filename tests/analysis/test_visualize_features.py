"""tools/visualize_features.py and the Grad-CAM behind it (afigan/analysis/gradcam.py,
feature_figures.py): toy models with random weights on a ~100 px image."""

import ast
import os
import runpy

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2")

from d2_helpers import CONFIGS, REPO  # noqa: E402
from detector_helpers import one_thread  # noqa: E402

TOOL = os.path.join(REPO, "tools", "visualize_features.py")
NN, AFI = (
    os.path.join(CONFIGS, "toy", "pipeline", f"stage{i}.yaml") for i in (0, 3)
)  # the quick start's teacher and stage 3
SMALL = ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128"]

_one_thread = pytest.fixture(autouse=True)(one_thread)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A 120 x 160 PNG: a colour gradient with a filled square and a disc."""
    from PIL import Image, ImageDraw

    yy, xx = np.mgrid[0:120, 0:160]
    rgb = np.stack([xx * 1.5, yy * 2.0, 255 - xx], axis=-1).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    draw.rectangle((20, 30, 70, 80), fill=(250, 40, 40))
    draw.ellipse((95, 20, 145, 70), fill=(30, 30, 220))
    path = tmp_path_factory.mktemp("img") / "shapes.png"
    img.save(path)
    return str(path)


def _tool(*argv):
    return runpy.run_path(TOOL)["main"]([str(a) for a in argv])


def _detector(config, *opts):
    from afigan.analysis.feature_figures import load_detector

    return load_detector(config, "", [*SMALL, *opts])


def test_features_figure_has_one_row_per_model_and_two_columns_per_level(image, tmp_path):
    from PIL import Image

    from afigan.analysis.feature_figures import grid_size_px

    out = tmp_path / "features.png"
    assert _tool(
        "--input", image, "--output", out, "--model", NN, "", "--model", AFI, "", "--levels", "p2,p3,p4,p5", *SMALL
    ) == str(out)
    # 2 models x (input + 4 levels x (|F|, Grad-CAM)) cells
    assert Image.open(out).size == grid_size_px(2, 1 + 2 * 4) == (9 * 160, 2 * 160 + 70)


def test_grad_cam_maps_are_non_negative_positive_and_depend_on_the_upsampler(image):
    from afigan.analysis.feature_figures import resized_image
    from afigan.analysis.gradcam import grad_cam

    cams = {}
    for name, config in (("nn", NN), ("afi", AFI)):
        cfg, model, label = _detector(config)
        assert label.endswith("random init")
        result = grad_cam(model, resized_image(cfg, image)[0])
        assert result.target.detected and result.head == "two-stage"
        assert list(result.features) == ["p2", "p3", "p4", "p5", "p6"]
        assert result.cams["p6"] is None and "box head" in result.notes["p6"]  # P6 feeds the RPN only
        maps = [result.cams[l] for l in ("p2", "p3", "p4", "p5")]
        assert all(bool((m >= 0).all()) for m in maps)
        assert sum(float(m.sum()) for m in maps) > 0
        assert result.assigned in ("p2", "p3", "p4", "p5")
        for level, m in zip(("p2", "p3", "p4", "p5"), maps):  # cropped to the image: 96 x 128 at stride s
            s = result.strides[level]
            assert tuple(m.shape) == (-(-96 // s), -(-128 // s)) == tuple(result.features[level].shape[1:])
        cams[name] = maps
    assert any(a.shape != b.shape or not torch.allclose(a, b) for a, b in zip(cams["nn"], cams["afi"]))


def test_grad_cam_equals_the_definition_on_the_assigned_level(image):
    """ReLU(sum_c w_c F_c) with w the spatial mean of d(score)/dF, recomputed by hand on the level
    the box pooler assigns the target to: there the score is the model's own class logit."""
    from detectron2.structures import Boxes

    from afigan.analysis.feature_figures import resized_image
    from afigan.analysis.gradcam import grad_cam

    cfg, model, _ = _detector(AFI)
    x = resized_image(cfg, image)[0]
    result = grad_cam(model, x)
    images = model.preprocess_image([{"image": x}])
    feats = {k: v.detach().requires_grad_(True) for k, v in model.backbone(images.tensor).items()}
    roi = model.roi_heads
    pooled = roi.box_pooler([feats[f] for f in roi.box_in_features], [Boxes(torch.tensor([result.target.box]))])
    score = roi.box_predictor(roi.box_head(pooled))[0][0, result.target.cls]
    level = result.assigned
    (grad,) = torch.autograd.grad(score, [feats[level]])
    cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * feats[level]).sum(1))[0]
    h, w = result.cams[level].shape
    assert torch.allclose(cam[:h, :w], result.cams[level], rtol=1e-4, atol=1e-7)


def test_one_stage_without_detection_uses_the_best_location_and_says_so(image, tmp_path):
    from afigan.analysis.feature_figures import features_title, model_rows

    fcos = os.path.join(CONFIGS, "toy", "detectors", "fcos_R_50_FPN_toy_afi.yaml")
    rows = model_rows(
        image,
        [(fcos, ""), (NN, "")],
        [*SMALL, "MODEL.FCOS.INFERENCE_TH_TEST", "1.0", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "1.0"],
    )
    one, two = rows[0].cam, rows[1].cam
    assert one.head == "one-stage" and two.head == "two-stage"
    assert not one.target.detected and one.target.source.startswith(
        "no detection: highest class score over all locations"
    )
    assert not two.target.detected and "RPN proposals" in two.target.source
    assert list(one.features) == ["p3", "p4", "p5", "p6"]  # p7 (stride 128) is left out
    assert all(c is not None and bool((c >= 0).all()) for c in one.cams.values())
    assert sum(float(c.sum()) for c in one.cams.values()) > 0
    assert "NO DETECTION" in features_title(rows, image) and "row 1, 2" in features_title(rows, image)


def test_interpolation_mode_writes_its_figure_with_the_loaded_interpolator(image, tmp_path):
    from PIL import Image
    from stage_helpers import save_teacher

    from afigan.analysis.feature_figures import grid_size_px, interpolation_maps, load_interpolator
    from afigan.config import load_config
    from afigan.layers import AFInterpolator

    teacher = save_teacher(str(tmp_path / "teacher.pth"))
    g = AFInterpolator(channels=32, num_blocks=1, growth=16)  # the toy stage-1 G (configs/toy/Base-toy.yaml)
    torch.save({"model": g.state_dict()}, tmp_path / "G.pth")  # a stage-1 G_0 file: Generators.* keys
    s1 = os.path.join(CONFIGS, "toy", "pipeline", "stage1.yaml")
    opts = [*SMALL, "MODEL.GUIDE_WEIGHTS", teacher]
    cfg = load_config(s1, opts)
    loaded = load_interpolator(cfg, str(tmp_path / "G.pth"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), g.state_dict().values()))

    maps = interpolation_maps(cfg, str(tmp_path / "G.pth"), image)
    assert list(maps) == list(cfg.MODEL.AFI.LEVELS)
    for level, m in maps.items():
        assert set(m) == {"target", "nearest", "bilinear", "learned"}
        assert len({tuple(v.shape) for v in m.values()}) == 1
    out = tmp_path / "interp.png"
    _tool("--input", image, "--output", out, "--interpolation", s1, tmp_path / "G.pth", *opts)
    assert Image.open(out).size == grid_size_px(len(maps), 7)

    # A guided G (FADE, random init) is called as stage 1 calls it: guided by the finer half-size
    # level, so p2 (no finer level) has no learned result.
    fade = interpolation_maps(load_config(s1, [*opts, "MODEL.AFI.INTERP", "fade"]), "", image)
    assert "learned" not in fade["p2"] and all("learned" in fade[l] for l in ("p3", "p4", "p5", "p6"))


def test_help_and_argument_errors(capsys):
    with pytest.raises(SystemExit) as e:
        runpy.run_path(TOOL)["parse_args"](["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    first = ast.get_docstring(ast.parse(open(TOOL).read())).splitlines()[0]
    assert first in " ".join(out.split("\n"))
    assert "random init" in out and '""' in out
    for flag in ("--input", "--output", "--model", "--interpolation", "--levels"):
        assert flag in out
    with pytest.raises(SystemExit) as e:
        _tool("--input", "x.png", "--output", "y.png", "--model", NN, "")
    assert e.value.code == 2


def test_interpolation_mode_loads_what_stage_1_writes(image, tmp_path):
    """A stage-1 G_0 file of a per-level learned kind (CARAFE, MODEL.AFI.SHARED False), written by
    the stage-1 trainer, is loaded tensor for tensor and drawn."""
    from stage_helpers import save_teacher, stage_cfg

    from afigan.analysis.feature_figures import load_interpolator
    from afigan.config import load_config
    from afigan.engine import Stage1Trainer

    teacher = save_teacher(str(tmp_path / "teacher.pth"))
    kind = ["MODEL.AFI.SHARED", "False", "MODEL.AFI.INTERP", "carafe"]
    trainer = Stage1Trainer(
        stage_cfg(
            "toy/pipeline/stage1.yaml",
            str(tmp_path / "s1"),
            "MODEL.GUIDE_WEIGHTS",
            teacher,
            "SOLVER.MAX_ITER",
            1,
            *kind,
        )
    )
    trainer.resume_or_load(resume=False)
    trainer.train()
    g_file = str(tmp_path / "s1" / "G_0" / "model_final.pth")
    s1 = os.path.join(CONFIGS, "toy", "pipeline", "stage1.yaml")
    opts = [*SMALL, "MODEL.GUIDE_WEIGHTS", teacher, *kind]
    loaded = load_interpolator(load_config(s1, opts), g_file).state_dict()
    trained = trainer.model.state_dict()
    assert list(loaded) == list(trained) and all(torch.equal(loaded[k], trained[k]) for k in trained)
    out = tmp_path / "interp.png"
    assert _tool("--input", image, "--output", out, "--interpolation", s1, g_file, *opts) == str(out)
