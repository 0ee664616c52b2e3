#!/usr/bin/env python
"""Export an afigan detector to TorchScript or ONNX with Detectron2's TracingAdapter, run the exported
file again on the sample image and print its largest difference to the PyTorch model. See
afigan/analysis/export.py.

    python tools/export_model.py --config-file CONFIG --output DIR [--format torchscript|onnx]
        [--export-method tracing] [--sample-image IMAGE] [KEY VALUE ...]   (e.g. MODEL.WEIGHTS model_final.pth)

Writes DIR/model.ts or DIR/model.onnx and DIR/export.json (output names, sample, differences).
The graph's input is one float32 image (3, H, W) in INPUT.FORMAT order, resized to the test size
(normalisation and padding are inside). ONNX needs the onnx extra: pip install -e ".[onnx]".
Exit status 1 when a difference exceeds --tolerance, or when the model cannot be exported (one sentence says why).
"""

import argparse
import logging
import sys

import afigan  # noqa: F401  (registers afigan's components)
from afigan.analysis.export import FORMATS, ExportError, export_model
from afigan.quiet import quiet_third_party


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE", help="config of the detector")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory for the exported model")
    p.add_argument("--format", choices=FORMATS, default="torchscript", help="output format (default torchscript)")
    p.add_argument(
        "--export-method",
        choices=["tracing"],
        default="tracing",
        help="only tracing (Detectron2's TracingAdapter); Detectron2's caffe2_tracing and scripting are not supported",
    )
    p.add_argument(
        "--sample-image",
        metavar="IMAGE",
        help="image to trace and check on, resized to INPUT.MIN_SIZE_TEST; default: a random image "
        "of INPUT.MIN_SIZE_TEST x 4/3 of it (seed 0), which a trained model may find nothing in",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest allowed difference per output, absolute below 1 and relative above (default 1e-4)",
    )
    p.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides, e.g. MODEL.WEIGHTS FILE"
    )
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = export_model(args.config_file, args.output, args.format, args.sample_image, args.opts, args.tolerance)
    h, w = result.input_size
    print(f"wrote {result.path} (traced on {result.sample}; it takes float32 (3, {h}, {w}) images only)")
    print(result.summary())
    return result


if __name__ == "__main__":
    quiet_third_party()  # notes of torch and Detectron2 a user cannot act on
    try:
        sys.exit(0 if main().ok else 1)
    except (
        ExportError,
        FileNotFoundError,
        KeyError,
        ValueError,
    ) as e:  # ExportError is a ValueError; listed for the reader
        sys.exit(f"export_model: {e}")
