#!/usr/bin/env python
"""Export an afigan detector to TorchScript or ONNX with Detectron2's TracingAdapter, run the exported
file again on the sample image and on more image sizes, and compare its detections with the PyTorch
model's. See afigan/analysis/export.py.

    python tools/export_model.py --config-file CONFIG --output DIR [--format torchscript|onnx]
        [--export-method tracing] [--batch N] [--sample-image IMAGE] [--check-sizes HxW,HxW,...|none]
        [KEY VALUE ...]
        (e.g. MODEL.WEIGHTS model_final.pth)

Writes DIR/model.ts or DIR/model.onnx and DIR/export.json (output names, sample, per-size checks).
The graph's input is one float32 image (3, H, W) (with --batch N: N of them, inputs image0 ...) in
INPUT.FORMAT order, resized but not normalised (normalisation and padding are inside); the ONNX
graph's height and width axes are dynamic. ONNX needs the onnx extra: pip install -e ".[onnx]".

The check matches exported and PyTorch detections one-to-one (same class, box IoU >= {match_iou:g},
greedy in decreasing score), so near-tied detections in another order are no difference. Exit
status 1 only on a real difference at some size: a matched box corner differing by more than
{box_px:g} px, a matched score by more than {score:g}, a matched mask by more than {mask_mean_abs:g}
(mean |difference| of its probabilities), a detection without partner whose score is not within
{cut_epsilon:g} of the score threshold or of the top-k cut-off, or a size the exported file fails
on; and when the model cannot be exported (one sentence says why).
"""

import argparse
import logging
import sys

import afigan  # noqa: F401  (registers afigan's components)
from afigan.analysis.export import FORMATS, ExportError, export_model
from afigan.analysis.export_match import TOLERANCES, size_table
from afigan.quiet import quiet_third_party


def _sizes(text: str):
    """'81x49,97x129' -> [(81, 49), (97, 129)]; 'none' -> []."""
    if text.strip().lower() == "none":
        return []
    sizes = []
    for part in text.split(","):
        try:
            h, w = (int(x) for x in part.strip().lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"sizes are HEIGHTxWIDTH in pixels separated by commas (e.g. 81x49,97x129) or none, not {text!r}"
            ) from None
        if h < 1 or w < 1:
            raise argparse.ArgumentTypeError(f"a size must be at least 1x1, not {part.strip()!r}")
        sizes.append((h, w))
    return sizes


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.format(**TOLERANCES), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config-file", required=True, metavar="FILE", help="config of the detector")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory for the exported model")
    p.add_argument("--format", choices=FORMATS, default="torchscript", help="output format (default torchscript)")
    p.add_argument(
        "--export-method",
        choices=["tracing", "scripting"],
        default="tracing",
        help="tracing (Detectron2's TracingAdapter); scripting stops with one sentence (afigan's upsamplers and "
        "necks are not scriptable); Detectron2's caffe2_tracing is not offered",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=1,
        metavar="N",
        help="trace with N images (the sample and N-1 copies rolled sideways): the file then takes exactly N "
        "images, each of any size, and returns N images' detections (default 1)",
    )
    p.add_argument(
        "--sample-image",
        metavar="IMAGE",
        help="image to trace and check on, resized to INPUT.MIN_SIZE_TEST; default: a random image "
        "of INPUT.MIN_SIZE_TEST x 4/3 of it (seed 0), which a trained model may find nothing in",
    )
    p.add_argument(
        "--check-sizes",
        type=_sizes,
        metavar="HxW[,HxW...]",
        help="image sizes to run the exported file at besides the sample's (the sample resized to each); "
        "default: three odd sizes from INPUT.MIN_SIZE_TEST S: 3/4 S x S, 5/4 S x 3/4 S (portrait), "
        "3/2 S x 2 S; none: the sample only",
    )
    p.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides, e.g. MODEL.WEIGHTS FILE"
    )
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = export_model(
        args.config_file,
        args.output,
        args.format,
        args.sample_image,
        args.opts,
        args.check_sizes,
        batch=args.batch,
        method=args.export_method,
    )
    takes = "one float32 (3, H, W) image" if args.batch == 1 else f"{args.batch} float32 (3, H, W) images"
    print(f"wrote {result.path} (traced on {result.sample}; it takes {takes})")
    print(size_table(result.sizes))
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
