#!/usr/bin/env python
r"""Pseudo-label unlabeled images with a trained detector for self-training: its detections with
score >= the threshold written as a COCO annotation file with the training set's categories
(boxes, and masks as RLE for mask models). See afigan/analysis/pseudo_label.py.

    python tools/pseudo_label.py --config-file CONFIG --images DIR_OR_GLOB [...] --output P.json \
        [--score-threshold 0.5] [--image-info image_info.json] MODEL.WEIGHTS model_final.pth [KEY VALUE ...]

Train on labeled + pseudo-labeled images by naming both in DATASETS.TRAIN, e.g.
    DATASETS.TRAIN '("coco_2017_train", "pseudo:P.json")' DATALOADER.SOURCE_REPEAT_FACTORS '(1.0, 0.5)'
"""

import sys

import afigan  # noqa: F401  (registers afigan's components)
from afigan.analysis.pseudo_label import pseudo_label_main
from afigan.quiet import quiet_third_party

if __name__ == "__main__":
    quiet_third_party()  # notes of torch and Detectron2 a user cannot act on
    try:
        pseudo_label_main(description=__doc__)
    except (FileNotFoundError, KeyError, ValueError) as e:
        sys.exit(f"Error: {e.args[0] if isinstance(e, KeyError) and e.args else e}")
