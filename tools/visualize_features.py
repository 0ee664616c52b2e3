#!/usr/bin/env python
"""Draw what the necks of two or more detectors see in one image: per model (rows) and neck level
(columns) the channel-mean |feature| map and a Grad-CAM map of the top detection's class score; or,
with --interpolation, how a stage-1/2 interpolator upsamples the teacher's features. See
afigan/analysis/feature_figures.py and gradcam.py.

    python tools/visualize_features.py --input IMAGE --output PNG \
        --model CONFIG WEIGHTS --model CONFIG WEIGHTS [...] [KEY VALUE ...]
    python tools/visualize_features.py --input IMAGE --output PNG --interpolation CONFIG WEIGHTS [KEY VALUE ...]

WEIGHTS may be "" (an empty string): the model (or interpolator) keeps its random
initialisation, and MODEL.WEIGHTS / MODEL.AF_EXTRACTOR_WEIGHTS of the config are not loaded.
Each model sees the image resized to its INPUT.MIN_SIZE_TEST. Grad-CAM score: two-stage
detectors, the box head's logit of the top detection's class for its box RoIAligned from each
level; one-stage detectors (FCOS, RetinaNet, CenterMask's boxes), the dense head's logit of that
class at the location of each level containing the box centre. With no detection the highest
class score over all proposals/locations is used, and the figure title says so.
--interpolation: CONFIG must name the teacher (MODEL.GUIDE_WEIGHTS; a pipeline's stageN/config.yaml
does); per level of MODEL.AFI.LEVELS it shows the teacher's full-resolution features, nearest,
bilinear and AFI x2 of its half-resolution features and their |error| maps with their L1.
Trailing KEY VALUE overrides apply to every model; the models run on the CPU unless MODEL.DEVICE is given.
"""

import argparse
import logging
import sys

import afigan  # noqa: F401  (registers afigan's components)
from afigan.analysis.feature_figures import visualize_features, visualize_interpolation
from afigan.quiet import quiet_third_party


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, metavar="IMAGE", help="the image")
    p.add_argument("--output", required=True, metavar="PNG", help="the figure to write")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--model",
        nargs=2,
        action="append",
        metavar=("CONFIG", "WEIGHTS"),
        help='a detector config and its weights ("" = random init); give two or more',
    )
    mode.add_argument(
        "--interpolation",
        nargs=2,
        metavar=("CONFIG", "WEIGHTS"),
        help='a stage-1/2 config naming the teacher and a G_0 / AFExtractor checkpoint ("" = random init)',
    )
    p.add_argument(
        "--levels",
        type=lambda v: [l for l in v.split(",") if l],
        metavar="P2,P3,...",
        help="comma-separated neck levels to show, e.g. p2,p3,p4,p5 (default every level up to p6)",
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides for every model")
    args = p.parse_args(argv)
    if args.model is not None and len(args.model) < 2:
        p.error("give two or more --model CONFIG WEIGHTS pairs (or --interpolation CONFIG WEIGHTS)")
    if args.interpolation and args.levels:
        p.error("--levels applies to --model figures; --interpolation shows MODEL.AFI.LEVELS (set it as KEY VALUE)")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.interpolation:
        path = visualize_interpolation(args.input, args.output, *args.interpolation, opts=args.opts)
    else:
        path = visualize_features(args.input, args.output, [tuple(m) for m in args.model], args.opts, args.levels)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    quiet_third_party()  # notes of torch and Detectron2 a user cannot act on
    try:
        main()
    except (OSError, KeyError, ValueError) as e:  # missing/unreadable files, bad keys, one sentence each
        sys.exit(f"visualize_features: {e}")
