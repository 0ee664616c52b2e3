"""tools/export_model.py (afigan/analysis/export.py): toy detectors with random weights traced to
TorchScript and ONNX on a 64 x 85 image; the exported files, run again (TorchScript in PyTorch,
ONNX in onnxruntime) on it and on other sizes, give the PyTorch model's detections (matched
one-to-one); the check catches a moved box; batches, refusals, flags and the cut-offs."""

import ast
import os
import runpy
import sys

import pytest
import torch

pytest.importorskip("detectron2")

from d2_helpers import CONFIGS, REPO  # noqa: E402
from detector_helpers import one_thread  # noqa: E402

TOOL = os.path.join(REPO, "tools", "export_model.py")
# PIXEL_STD: Detectron2's torchvision-style std instead of the toy configs' 1.0 (Caffe2 style). A
# randomly initialised BN network in eval mode passes its O(100) input pixels on unscaled, so its
# neck levels are O(1000), where a learned upsampler's softmax over kernel logits (FADE, CARAFE)
# is nearly an argmax that turns float rounding into box differences of 1e-2 px (measured for FADE
# in ONNX); O(1) inputs bring the levels down to the size a trained neck's have.
SMALL = ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96", "MODEL.PIXEL_STD", "[57.375, 57.12, 58.395]"]
DETECTORS = os.path.join(CONFIGS, "toy", "detectors")
MASK_RCNN = os.path.join(CONFIGS, "toy", "fpn_toy.yaml")  # Mask R-CNN R-18, 32-channel AFI FPN
FCOS = os.path.join(DETECTORS, "fcos_R_50_FPN_toy_afi.yaml")
RETINANET = os.path.join(DETECTORS, "retinanet_R_50_FPN_toy_afi.yaml")
# One upsampler per top-down step (srf_modules), of a guided kind (FADE gets the finer lateral).
PAFPN_PER_LEVEL = (os.path.join(DETECTORS, "mask_rcnn_R_50_PAFPN_toy_afi.yaml"), "MODEL.AFI.SHARED", "False")
PAFPN_PER_LEVEL += ("MODEL.AFI.INTERP", "fade")

_one_thread = pytest.fixture(autouse=True)(one_thread)


def _formats():
    """torchscript, and onnx when onnxruntime (the onnx extra) is installed."""
    return [
        "torchscript",
        pytest.param(
            "onnx",
            marks=pytest.mark.skipif(
                not _has("onnxruntime"), reason="onnxruntime is not installed (pip install -e '.[onnx]')"
            ),
        ),
    ]


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _export(config, fmt, out, *opts):
    from afigan.analysis.export import export_model

    # The sample only: other sizes are tests/analysis/test_export_sizes.py's.
    return export_model(config, str(out), fmt, opts=[*SMALL, *opts], check_sizes=[])


def _check(result, masks=False):
    from afigan.analysis.export_match import BOX_TOLERANCE_PX, MASK_TOLERANCE, SCORE_TOLERANCE

    assert result.ok, result.summary()
    assert result.detections > 0  # something was compared
    sample = result.sizes[0]
    assert sample.matched == sample.pytorch == sample.exported == result.detections, result.summary()
    assert result.differences["box_px"] <= BOX_TOLERANCE_PX, result.summary()
    assert result.differences["score"] <= SCORE_TOLERANCE, result.summary()
    assert ("mask" in result.differences) == masks
    if masks:
        assert result.differences["mask"] <= MASK_TOLERANCE
    assert os.path.isfile(result.path) and os.path.isfile(os.path.join(os.path.dirname(result.path), "export.json"))


# Every upsampler kind (Mask R-CNN FPN) and every detector family, in both formats and at three
# sizes besides the sample's: tests/analysis/test_export_sizes.py. Here: the tool itself.


@pytest.mark.parametrize("fmt", _formats())
def test_the_tool_writes_the_file_a_size_table_and_export_json(fmt, tmp_path, capsys):
    """Through the tool, on the one case no other test exports: PAFPN with one FADE per top-down
    step; the sample and one more size."""
    import json

    result = runpy.run_path(TOOL)["main"](
        ["--config-file", PAFPN_PER_LEVEL[0], "--output", str(tmp_path), "--format", fmt, "--check-sizes", "49x65"]
        + [*SMALL, *PAFPN_PER_LEVEL[1:]]
    )
    _check(result, masks=True)
    assert result.sizes[1].matched == result.sizes[1].pytorch > 0
    out = capsys.readouterr().out
    assert "traced on a random 64x85 image (seed 0" in out  # the default sample, named
    rows = [line.split()[:4] for line in out.splitlines()[1:4]]
    assert rows[0] == ["size", "PyTorch", "exported", "matched"] and [r[0] for r in rows[1:]] == ["64x85", "49x65"]
    assert f"{fmt}: checked at 2 sizes (64x85, 49x65); {result.detections} detections in the traced image; " in out
    assert out.rstrip().endswith("all within tolerance")
    info = json.load(open(tmp_path / "export.json"))
    assert info["format"] == fmt and info["outputs"] == result.outputs and info["ok"] is True
    assert [s["size"] for s in info["sizes"]] == [[64, 85], [49, 65]]
    assert info["sizes"][0]["matched"] == result.detections and info["inputs"] == ["image"]
    assert info["tolerances"] == {
        "match_iou": 0.5,
        "box_px": 0.05,
        "score": 1e-4,
        "mask_mean_abs": 1e-3,
        "cut_epsilon": 1e-3,
    }
    assert info["cut_offs"] == {"score_threshold": 0.05, "topk": 50}  # the toy configs' R-CNN test settings
    assert result.outputs == ["pred_boxes", "pred_classes", "pred_masks", "scores", "image_size"]
    if fmt == "onnx":
        onnx = pytest.importorskip("onnx")
        graph = onnx.load(result.path)
        assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
        assert [o.name for o in graph.graph.output] == result.outputs
        assert [i.name for i in graph.graph.input] == ["image"]


def test_cut_offs_of_each_family():
    """The cuts an unmatched detection may sit at, in the scale of the output scores: R-CNN's last
    box predictor (Cascade's third), RetinaNet's own, FCOS's top-k, and FCOS's threshold only where
    it thresholds probability x centerness (its score is the square root of that)."""
    from detectron2.modeling import build_model

    from afigan.analysis.export_check import cut_offs
    from afigan.config import load_config

    def cuts(config, *opts):
        return cut_offs(build_model(load_config(config, ["MODEL.DEVICE", "cpu", *opts])))

    assert cuts(MASK_RCNN) == (0.05, 50)
    assert cuts(os.path.join(DETECTORS, "cascade_mask_rcnn_S_101_PAFPN_toy_afi.yaml"), *SMALL) == (0.05, 50)
    assert cuts(RETINANET, "MODEL.RETINANET.SCORE_THRESH_TEST", "0.1") == (pytest.approx(0.1), 50)
    assert cuts(FCOS) == (None, 100)
    assert cuts(FCOS, "MODEL.FCOS.THRESH_WITH_CTR", "True", "MODEL.FCOS.INFERENCE_TH_TEST", "0.04") == (
        pytest.approx(0.2),
        100,
    )


def test_sample_image_is_resized_like_the_predictor(tmp_path):
    from PIL import Image

    from afigan.analysis.export import sample_image
    from afigan.config import load_config

    Image.new("RGB", (200, 100), (10, 200, 30)).save(tmp_path / "a.png")
    cfg = load_config(MASK_RCNN, SMALL)
    image, text = sample_image(cfg, str(tmp_path / "a.png"))
    assert tuple(image.shape) == (3, 48, 96) and image.dtype == torch.float32  # 64 x 128, long side capped at 96
    assert image[:, 0, 0].tolist() == [30.0, 200.0, 10.0]  # BGR, INPUT.FORMAT of the config
    assert text.endswith("resized to 48x96")


def test_a_kind_that_cannot_export_stops_with_one_sentence(tmp_path, monkeypatch):
    from afigan.analysis import export

    monkeypatch.setitem(export.NOT_EXPORTABLE, ("onnx", "nearest"), "a reason named here")
    monkeypatch.setattr(
        sys,
        "argv",
        [
            TOOL,
            "--config-file",
            MASK_RCNN,
            "--output",
            str(tmp_path),
            "--format",
            "onnx",
            *SMALL,
            "MODEL.AFI.INTERP",
            "nearest",
        ],
    )
    with pytest.raises(SystemExit) as e:
        runpy.run_path(TOOL, run_name="__main__")
    assert e.value.code == "export_model: MODEL.AFI.INTERP 'nearest' cannot be exported to onnx: a reason named here."
    assert not os.path.exists(tmp_path / "model.onnx")


def test_deformable_convolution_is_refused_for_onnx_only_before_exporting(tmp_path):
    from d2_helpers import make_cfg

    from afigan.analysis.export import ExportError
    from afigan.analysis.export_limits import NOT_EXPORTABLE, limit

    why = NOT_EXPORTABLE["onnx", "deformable convolution"]
    resnet = make_cfg(None, "MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[False, False, True, True]")
    assert limit(resnet, "onnx", None, NOT_EXPORTABLE) == (
        "deformable convolution (MODEL.RESNETS.DEFORM_ON_PER_STAGE [False, False, True, True])",
        why,
    )
    assert limit(resnet, "torchscript", None, NOT_EXPORTABLE) is None
    assert limit(make_cfg(FCOS), "onnx", "afi", NOT_EXPORTABLE) is None  # switches off: nothing refused
    with pytest.raises(ExportError) as e:
        _export(FCOS, "onnx", tmp_path, "MODEL.FCOS.USE_DEFORMABLE", "True")
    assert str(e.value) == f"deformable convolution (MODEL.FCOS.USE_DEFORMABLE True) cannot be exported to onnx: {why}."
    assert not os.path.exists(tmp_path / "model.onnx")


def test_an_exporter_failure_becomes_one_sentence(tmp_path, monkeypatch):
    from afigan.analysis import export

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator foo\nlong trace")

    monkeypatch.setattr(torch.jit, "trace", broken)
    with pytest.raises(export.ExportError) as e:
        _export(MASK_RCNN, "torchscript", tmp_path)
    assert str(e.value) == (
        "GeneralizedRCNN (build_resnet_fpn_sr_backbone, MODEL.AFI.INTERP 'afi') could not be "
        "exported to torchscript (RuntimeError: unsupported operator foo)."
    )


def test_help_lists_detectron2s_flags(capsys):
    with pytest.raises(SystemExit) as e:
        runpy.run_path(TOOL)["parse_args"](["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    first = ast.get_docstring(ast.parse(open(TOOL).read())).splitlines()[0]
    assert first in " ".join(out.split("\n"))
    for flag in (
        "--config-file",
        "--output",
        "--format",
        "--export-method",
        "--sample-image",
        "--check-sizes",
        "--batch",
    ):
        assert flag in out


def _run_tool(monkeypatch, *args):
    """``tools/export_model.py ARGS`` as ``__main__``: its exit code."""
    monkeypatch.setattr(sys, "argv", [TOOL, *args])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(TOOL, run_name="__main__")
    return e.value.code


def _wrap_exported(monkeypatch, change):
    """Make the check see ``change(outputs)`` of the written file's outputs (as a faulty runtime would)."""
    from afigan.analysis import export, export_check

    real = export_check.exported_runner
    monkeypatch.setattr(export, "exported_runner", lambda fmt, path: lambda *x: change(real(fmt, path)(*x)))


def _reorder(outputs):
    # Reverse the detections (the first four outputs of Mask R-CNN: boxes, classes, masks, scores).
    return [o.flip(0) for o in outputs[:4]] + outputs[4:]


def _move_first_box(outputs):
    boxes = outputs[0].clone()
    boxes[0] += 2.0
    return [boxes] + outputs[1:]


def test_the_check_matches_detections_in_another_order_and_catches_a_moved_box(tmp_path, monkeypatch, capsys):
    """Issue 22's false alarm: the same detections in another order (near-tied scores) made the
    index-by-index comparison exit 1 on pred_boxes; matched as sets they pass, at every size, and a
    box moved by 2 px still fails with exit 1."""
    args = ["--config-file", MASK_RCNN, "--format", "torchscript", "--check-sizes", "49x65", *SMALL]
    _wrap_exported(monkeypatch, _reorder)
    assert _run_tool(monkeypatch, "--output", str(tmp_path / "a"), *args) == 0
    out = capsys.readouterr().out
    assert "all within tolerance" in out and out.count(" ok ") == 2
    _wrap_exported(monkeypatch, _move_first_box)
    assert _run_tool(monkeypatch, "--output", str(tmp_path / "b"), *args) == 1
    out = capsys.readouterr().out
    assert "DIFFERENT at 64x85: a matched box differs by 2 px (> 0.05)" in out


@pytest.mark.skipif(not _has("onnxruntime"), reason="onnxruntime is not installed (pip install -e '.[onnx]')")
def test_onnx_batch_of_two_at_every_default_size(tmp_path, capsys):
    """--batch 2: two image inputs with dynamic height and width, checked at the sample's size, the
    three default sizes and once with two different sizes in one call."""
    import json

    onnx = pytest.importorskip("onnx")
    result = runpy.run_path(TOOL)["main"](
        ["--config-file", MASK_RCNN, "--output", str(tmp_path), "--format", "onnx", "--batch", "2", *SMALL]
    )
    assert result.ok, result.summary()
    assert [c.label for c in result.sizes] == ["64x85", "49x65", "81x49", "97x129", "mixed"]
    assert result.sizes[-1].image == "mixed sizes: 49x65, 81x49"
    assert all(c.pytorch == c.exported == c.matched > 0 for c in result.sizes)
    assert result.outputs[:5] == ["0.pred_boxes", "0.pred_classes", "0.pred_masks", "0.scores", "0.image_size"]
    graph = onnx.load(result.path).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims == {"image0": [3, "height0", "width0"], "image1": [3, "height1", "width1"]}
    assert "it takes 2 float32 (3, H, W) images" in capsys.readouterr().out
    assert json.load(open(tmp_path / "export.json"))["inputs"] == ["image0", "image1"]


def test_scripting_is_refused_in_one_sentence_before_anything_is_built(tmp_path, monkeypatch):
    from afigan.analysis import export

    monkeypatch.setattr(export, "build_detector", None)  # would fail if reached
    code = _run_tool(monkeypatch, "--config-file", MASK_RCNN, "--output", str(tmp_path), "--export-method", "scripting")
    assert code == f"export_model: {export.SCRIPTING_REFUSAL}"
    assert code.count(". ") == 0 and not os.listdir(tmp_path)


def test_a_family_that_cannot_take_a_batch_or_other_sizes_says_so(tmp_path, monkeypatch, caplog):
    from afigan.analysis import export

    monkeypatch.setitem(export.NOT_BATCHABLE, ("torchscript", "GeneralizedRCNN"), "a reason")
    with pytest.raises(export.ExportError) as e:
        export.export_model(MASK_RCNN, str(tmp_path), "torchscript", opts=SMALL, batch=2)
    assert str(e.value) == (
        "MODEL.META_ARCHITECTURE 'GeneralizedRCNN' cannot be exported to torchscript with more than one image: "
        "a reason."
    )
    monkeypatch.setitem(export.FIXED_SIZE, ("torchscript", "build_resnet_fpn_sr_backbone"), "an op")
    result = export.export_model(MASK_RCNN, str(tmp_path), "torchscript", opts=SMALL)
    assert [c.label for c in result.sizes] == ["64x85"] and result.ok
    assert (
        "MODEL.BACKBONE.NAME 'build_resnet_fpn_sr_backbone' exports to torchscript at the traced image size only "
        "(an op), so the file is checked at the sample's size only." in caplog.text
    )


def test_help_states_the_tolerances(capsys):
    from afigan.analysis.export_match import BOX_TOLERANCE_PX, CUT_EPSILON, MASK_TOLERANCE, SCORE_TOLERANCE

    with pytest.raises(SystemExit):
        runpy.run_path(TOOL)["parse_args"](["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"a matched box corner differing by more than {BOX_TOLERANCE_PX:g} px" in out
    assert f"a matched score by more than {SCORE_TOLERANCE:g}" in out
    assert f"a matched mask by more than {MASK_TOLERANCE:g}" in out
    assert f"not within {CUT_EPSILON:g} of the score threshold or of the top-k cut-off" in out


def test_check_sizes_flag(capsys):
    parse = runpy.run_path(TOOL)["parse_args"]
    base = ["--config-file", MASK_RCNN, "--output", "x"]
    assert parse([*base, "--check-sizes", "81x49,97X129"]).check_sizes == [(81, 49), (97, 129)]
    assert parse([*base, "--check-sizes", "none"]).check_sizes == []
    assert parse(base).check_sizes is None  # the defaults of default_check_sizes
    with pytest.raises(SystemExit):
        parse([*base, "--check-sizes", "81,49"])
    assert "sizes are HEIGHTxWIDTH in pixels separated by commas" in capsys.readouterr().err


def test_default_check_sizes_are_odd_smaller_portrait_and_larger():
    from afigan.analysis.export_check import default_check_sizes
    from afigan.config import load_config

    assert default_check_sizes(load_config(MASK_RCNN, SMALL)) == [(49, 65), (81, 49), (97, 129)]
    assert default_check_sizes(load_config(MASK_RCNN, [])) == [(121, 161), (201, 121), (241, 321)]


def test_the_check_runs_in_full_float32_and_restores_tf32():
    from afigan.analysis.export_check import full_float32

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        with full_float32():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32 == before[1]
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
