"""tools/benchmark_export.py (afigan/benchmark/export_speed.py) at its smallest settings: the table and
JSON it writes, and that eager, TorchScript and onnxruntime give the same detections. Timings are
never asserted."""

import json
import os
import runpy

import pytest

pytest.importorskip("detectron2")
pytest.importorskip("onnxruntime")

from d2_helpers import REPO  # noqa: E402
from detector_helpers import one_thread  # noqa: E402

TOOL = os.path.join(REPO, "tools", "benchmark_export.py")
_one_thread = pytest.fixture(autouse=True)(one_thread)


def test_one_kind_at_64_px_gives_a_row_per_kind_and_matching_detections(tmp_path, capsys):
    from afigan.benchmark.export_speed import RUNTIMES

    out = tmp_path / "bench.json"
    rows = runpy.run_path(TOOL)["main"](
        ["--size", "64", "--repeats", "1", "--kinds", "afi", "--device", "cpu", "--out", str(out)]
    )
    info = json.load(open(out))
    assert set(info) == {"machine", "torch", "load_average_1min", "args", "rows"}
    assert info["args"]["kinds"] == ["afi"] and info["args"]["size"] == 64
    (row,) = info["rows"]
    assert row == json.loads(json.dumps(rows[0]))
    assert row["kind"] == "afi" and row["image"] == [64, 85]
    assert sorted(row["seconds"]) == sorted(RUNTIMES) and all(v > 0 for v in row["seconds"].values())
    assert sorted(row["speedup"]) == ["onnxruntime", "torchscript"]
    assert row["onnxruntime_provider"] == "CPUExecutionProvider"
    # Score threshold 0: every one of the toy config's 50 detections per image is kept, and both
    # files give all 50, matched one-to-one with eager's within the export check's tolerances.
    assert row["detections"] == 50 and row["ok"] is True
    for fmt in ("torchscript", "onnx"):
        check = row["checks"][fmt]
        assert check["detections"] == check["exported"] == check["matched"] == 50 and check["ok"] is True
    assert os.path.isfile(tmp_path / "bench_files" / "afi" / "onnx" / "model.onnx")
    text = capsys.readouterr().out
    assert "device: cpu (" in text and "toy sizes; short side 64; median of 1" in text and "load average" in text
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| upsampler | image | detections | eager ms (perf_counter) | TorchScript ms |")
    assert len(lines) == 3 and lines[2].startswith("| afi | 64x85 | 50 | ") and lines[2].endswith("| yes |")


def test_reference_options_are_the_papers_sizes():
    from afigan.benchmark.export_speed import options
    from afigan.benchmark.training import REFERENCE_SIZES

    opts = options(800, reference=True)
    common = [
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.PIXEL_STD", "[57.375, 57.12, 58.395]"
    ]  # fmt: skip
    assert opts[:8] == ["INPUT.MIN_SIZE_TEST", "800", "INPUT.MAX_SIZE_TEST", "1333", *common]
    assert opts[8 : 8 + len(REFERENCE_SIZES)] == REFERENCE_SIZES
    assert opts[8 + len(REFERENCE_SIZES) :] == ["MODEL.ROI_HEADS.NUM_CLASSES", "80", "TEST.DETECTIONS_PER_IMAGE", "100"]
    assert options(64, reference=False) == ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "106", *common]
