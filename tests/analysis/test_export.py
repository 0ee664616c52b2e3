"""tools/export_model.py (afigan/analysis/export.py): toy detectors with random weights traced to
TorchScript and ONNX on a 64 x 85 image; the exported files, run again (TorchScript in PyTorch,
ONNX in onnxruntime), give the PyTorch model's boxes, scores, classes and masks."""

import ast
import os
import runpy
import sys

import pytest
import torch

pytest.importorskip("detectron2")

from d2_helpers import CONFIGS, REPO  # noqa: E402
from detector_helpers import one_thread  # noqa: E402

from afigan.layers import upsampler_kinds  # noqa: E402

TOOL = os.path.join(REPO, "tools", "export_model.py")
# PIXEL_STD: Detectron2's torchvision-style std instead of the toy configs' 1.0 (Caffe2 style). A
# randomly initialised BN network in eval mode passes its O(100) input pixels on unscaled, so its
# neck levels are O(1000), where a learned upsampler's softmax over kernel logits (FADE, CARAFE)
# is nearly an argmax that turns float rounding into box differences of 1e-2 px (measured for FADE
# in ONNX); O(1) inputs bring the levels down to the size a trained neck's have.
SMALL = ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96", "MODEL.PIXEL_STD", "[57.375, 57.12, 58.395]"]
DETECTORS = os.path.join(CONFIGS, "toy", "detectors")
MASK_RCNN = os.path.join(CONFIGS, "toy", "fpn_toy.yaml")  # Mask R-CNN R-18, 32-channel AFI FPN
# Random heads score below the default thresholds; 0 keeps every candidate so boxes are compared.
FCOS = (os.path.join(DETECTORS, "fcos_R_50_FPN_toy_afi.yaml"), "MODEL.FCOS.INFERENCE_TH_TEST", "0.0")
RETINANET = (os.path.join(DETECTORS, "retinanet_R_50_FPN_toy_afi.yaml"), "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0")
PAFPN = (os.path.join(DETECTORS, "mask_rcnn_R_50_PAFPN_toy_afi.yaml"),)
# One upsampler per top-down step (srf_modules), of a guided kind (FADE gets the finer lateral).
PAFPN_PER_LEVEL = (PAFPN[0], "MODEL.AFI.SHARED", "False", "MODEL.AFI.INTERP", "fade")

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


def _kind_formats():
    """Every kind in the strictest available format (ONNX when onnxruntime is there), and AFI and
    the guided FADE in TorchScript too; every kind's module alone is traced to TorchScript in
    tests/test_learned_upsamplers.py, so the whole-model TorchScript run of each adds little."""
    if not _has("onnxruntime"):
        return [(k, "torchscript") for k in upsampler_kinds()]
    return [(k, "onnx") for k in upsampler_kinds()] + [(k, "torchscript") for k in ("afi", "fade")]


@pytest.mark.parametrize("kind, fmt", _kind_formats())
def test_mask_rcnn_exports_with_every_upsampler_kind(kind, fmt, tmp_path):
    """Every kind of the upsampler registry (read when the tests are collected) either exports
    and matches, or is listed in NOT_EXPORTABLE and stops with its one sentence."""
    from afigan.analysis.export import NOT_EXPORTABLE, ExportError

    if (fmt, kind) in NOT_EXPORTABLE:
        with pytest.raises(ExportError) as e:
            _export(MASK_RCNN, fmt, tmp_path, "MODEL.AFI.INTERP", kind)
        assert str(e.value) == f"MODEL.AFI.INTERP {kind!r} cannot be exported to {fmt}: {NOT_EXPORTABLE[fmt, kind]}."
        return
    _check(_export(MASK_RCNN, fmt, tmp_path, "MODEL.AFI.INTERP", kind), masks=True)


@pytest.mark.parametrize("fmt", _formats())
@pytest.mark.parametrize(
    "model",
    [FCOS, RETINANET, PAFPN, PAFPN_PER_LEVEL],
    ids=["fcos", "retinanet", "mask_rcnn_pafpn", "mask_rcnn_pafpn_per_level_fade"],
)
def test_fcos_retinanet_and_pafpn_export_through_the_tool(model, fmt, tmp_path, capsys):
    import json

    result = runpy.run_path(TOOL)["main"](
        [
            "--config-file",
            model[0],
            "--output",
            str(tmp_path),
            "--format",
            fmt,
            "--check-sizes",
            "none",
            *SMALL,
            *model[1:],
        ]
    )
    masks = model[0] == PAFPN[0]
    _check(result, masks=masks)
    out = capsys.readouterr().out
    assert "traced on a random 64x85 image (seed 0" in out  # the default sample, named
    assert f"{fmt}: checked at 1 sizes (64x85); {result.detections} detections at the sample; " in out
    assert out.rstrip().endswith("all within tolerance")
    info = json.load(open(tmp_path / "export.json"))
    assert info["format"] == fmt and info["outputs"] == result.outputs and info["ok"] is True
    assert [s["size"] for s in info["sizes"]] == [[64, 85]] and info["sizes"][0]["matched"] == result.detections
    assert result.outputs == ["pred_boxes", "pred_classes", *(["pred_masks"] if masks else []), "scores", "image_size"]
    if fmt == "onnx":
        onnx = pytest.importorskip("onnx")
        graph = onnx.load(result.path)
        assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
        assert [o.name for o in graph.graph.output] == result.outputs
        assert [i.name for i in graph.graph.input] == ["image"]


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
    for flag in ("--config-file", "--output", "--format", "--export-method", "--sample-image"):
        assert flag in out
