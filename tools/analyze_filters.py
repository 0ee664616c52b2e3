#!/usr/bin/env python
"""Does a backbone look like the Feature Enhancement README says? Per ResNet stage, report the
quantities the regulariser targets (Σ‖W‖_F, ΣVar(W)) and the claimed property (high-frequency
share of the stage's k×k kernels; with images, edge/blur response of its feature maps), for one
checkpoint or two (baseline first), as a Markdown table, JSON and a PNG plot.

  # weights only (Detectron2 .pth / plain state dict with ResNet names):
  python tools/analyze_filters.py output/baseline/model_final.pth output/fe/model_final.pth -o report/
  # with the model, on images:
  python tools/analyze_filters.py base.pth fe.pth --config-file configs/toy/fe_retinanet_R_18_FPN.yaml \
      --images datasets/afigan_toy/val -o report/ [--opts KEY VALUE ...]
"""

import argparse
import logging
import os
import sys

from afigan.analysis.filters import DEFAULT_CUT
from afigan.analysis.report import analyze_checkpoint, format_table, verdicts, write_report
from afigan.config import load_config
from afigan.quiet import quiet_third_party


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="one checkpoint, or two to compare (baseline first)")
    p.add_argument("--labels", nargs="+", help="names of the checkpoints in the table (default: file names)")
    p.add_argument("--config-file", help="config that builds the model; needed for images and non-ResNet-named files")
    p.add_argument("--images", nargs="+", default=[], help="image files or directories for the feature-map measures")
    p.add_argument("--dataset", help="registered Detectron2 data set whose images to use instead of --images")
    p.add_argument("--num-images", type=int, default=8, help="images used at most (default 8)")
    p.add_argument("--image-size", type=int, help="shortest image edge (default INPUT.MIN_SIZE_TEST)")
    p.add_argument("--stages", nargs="+", help="stages to report (default: every stem/resN found)")
    p.add_argument(
        "--sharp-stages", nargs="+", help="stages claimed to become edge-like (default MODEL.FE.SHARP_STAGES or res3)"
    )
    p.add_argument(
        "--smooth-stages", nargs="+", help="stages claimed to become blur-like (default MODEL.FE.SMOOTH_STAGES or res5)"
    )
    p.add_argument("--cut", type=float, default=DEFAULT_CUT, help="radial frequency cut in cycles/pixel (default 0.25)")
    p.add_argument("-o", "--output-dir", default="filter_report", help="where filters.md/.json/.png go")
    p.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="KEY VALUE config overrides; everything after --opts (so put it last)",
    )
    args = p.parse_args(argv)
    if len(args.checkpoints) > 2:
        p.error("give one checkpoint, or two to compare")
    if args.labels and len(args.labels) != len(args.checkpoints):
        p.error("give one label per checkpoint")
    if (args.images or args.dataset) and not args.config_file:
        p.error("--images/--dataset need --config-file (the feature maps come from the model)")
    if not 0 < args.cut < 0.71:
        p.error("--cut must lie in (0, 0.71) cycles/pixel")
    return args


def _fe_stages(args):
    sharp, smooth = args.sharp_stages or ["res3"], args.smooth_stages or ["res5"]
    if args.config_file and not (args.sharp_stages and args.smooth_stages):
        fe = load_config(args.config_file, args.opts, device="cpu").MODEL.FE
        sharp, smooth = args.sharp_stages or list(fe.SHARP_STAGES), args.smooth_stages or list(fe.SMOOTH_STAGES)
    return sharp, smooth


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    images = list(args.images)
    if args.dataset:
        from detectron2.data import DatasetCatalog

        import afigan  # noqa: F401  (registers afigan's data sets)

        images += [d["file_name"] for d in DatasetCatalog.get(args.dataset)[: args.num_images]]
    names = [os.path.basename(c) for c in args.checkpoints]
    labels = args.labels or (names if len(set(names)) == len(names) else list(args.checkpoints))
    results = [
        analyze_checkpoint(
            c, args.config_file, args.opts, images, args.stages, args.cut, args.image_size, args.num_images, label
        )
        for c, label in zip(args.checkpoints, labels)
    ]
    sharp, smooth = _fe_stages(args)
    paths = write_report(results, args.output_dir, sharp, smooth, args.cut)
    print(format_table(results))
    print()
    print("\n".join(verdicts(results, sharp, smooth, args.cut)))
    print(f"\nwrote {paths['md']}, {paths['json']}, {paths['png']}")
    return paths


if __name__ == "__main__":
    quiet_third_party()  # notes of torch and Detectron2 a user cannot act on
    try:
        main()
    except (FileNotFoundError, KeyError, ValueError) as e:
        sys.exit(f"analyze_filters: {e}")
