#!/usr/bin/env python
"""Plot the training curves of a run: one panel per metrics.json found in OUTPUT_DIR (a stage's
OUTPUT_DIR) or in its sub-folders (a pipeline's stage0..stage3), with every loss, the learning
rates on a twin axis and the COCO bbox/segm AP of each evaluation. See afigan/analysis/metrics.py.

    python tools/plot_metrics.py output/toy_pipeline                 # -> output/toy_pipeline/metrics.png
    python tools/plot_metrics.py output/toy_pipeline/stage1 --output stage1.png
"""

import argparse
import sys

from afigan.analysis.metrics import plot_metrics
from afigan.quiet import quiet_third_party


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="a stage's OUTPUT_DIR or a pipeline's --output-dir")
    p.add_argument("--output", default="", metavar="PNG", help="where the plot goes (default OUTPUT_DIR/metrics.png)")
    args = p.parse_args(argv)
    path = plot_metrics(args.output_dir, args.output)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    quiet_third_party()  # notes of torch and Detectron2 a user cannot act on
    try:
        main()
    except FileNotFoundError as e:
        sys.exit(f"plot_metrics: {e}")
    except ImportError as e:
        sys.exit(f"plot_metrics: matplotlib is needed to draw the plot ({e}); pip install matplotlib.")
