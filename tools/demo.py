#!/usr/bin/env python
r"""Draw a trained detector's predictions on images and write them as COCO results (Detectron2's
demo/demo.py conventions; any afigan detector config). See afigan/analysis/predict.py.

    python tools/demo.py --config-file CONFIG --input a.jpg dir/ 'more/*.png' --output OUT \
        [--confidence-threshold 0.5] MODEL.WEIGHTS model_final.pth [KEY VALUE ...]

writes OUT/<image stem>.png per image and OUT/predictions.json (image_id, file_name,
category_id, bbox XYWH, score, segmentation RLE) for all of them.
"""

import sys

import afigan  # noqa: F401  (registers afigan's components)
from afigan.analysis.predict import demo_main
from afigan.quiet import quiet_third_party

if __name__ == "__main__":
    quiet_third_party()  # notes of torch and Detectron2 a user cannot act on
    try:
        demo_main(description=__doc__)
    except (FileNotFoundError, KeyError, ValueError) as e:
        sys.exit(f"demo: {e}")
