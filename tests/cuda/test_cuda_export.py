"""CUDA tier: a toy detector traced on the GPU, the file run as TorchScript on the GPU and in
onnxruntime, matching PyTorch (afigan.analysis.export's own matching and tolerances)."""

import importlib.util
import os

import pytest
from cuda_helpers import CUDA_TIER
from d2_helpers import CONFIGS

pytestmark = CUDA_TIER
SMALL = ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96", "MODEL.PIXEL_STD", "[57.375, 57.12, 58.395]"]


@pytest.mark.parametrize(
    "fmt",
    [
        "torchscript",
        pytest.param(
            "onnx",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed"
            ),
        ),
    ],
)
def test_export_traced_on_cuda_matches_pytorch(fmt, tmp_path):
    from afigan.analysis.export import export_model

    config = os.path.join(CONFIGS, "toy", "fpn_toy.yaml")
    result = export_model(config, str(tmp_path), fmt, opts=[*SMALL, "MODEL.DEVICE", "cuda"], check_sizes=[])
    assert result.ok, result.summary()
    assert result.detections > 0 and result.sizes[0].matched == result.detections, result.summary()
    assert os.path.isfile(os.path.join(str(tmp_path), "model.ts" if fmt == "torchscript" else "model.onnx"))
