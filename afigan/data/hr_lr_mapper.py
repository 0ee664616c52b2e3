"""The HR/LR dataset mapper of stages 1-2: one augmented image and its low-resolution twin.

Per image it returns ``image`` (the augmented high-resolution image, uint8 C x H x W),
``image_x{r}`` (the same image resized to (floor(H r), floor(W r)), PIL bilinear),
``instances`` and ``instances_x{r}`` (the annotations through the HR transforms, then through
the x r resize). Because the LR image is derived from the *augmented* HR image, both share one
flip decision and one crop (B2 and B9 of docs/differences_from_reference.md). ``MODEL.AFI.LEGACY.INDEPENDENT_FLIP``
flips the LR twin again with probability 1/2, which reproduces the reference's independent flips.
"""

import copy
import logging
import warnings
from typing import Dict

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from afigan.config import lr_key

from .image_io import UnreadableImageError, read_image_or_raise, require_image_file

__all__ = ["HRLRDatasetMapper", "FileCheckingDatasetMapper"]


class FileCheckingDatasetMapper(DatasetMapper):
    """Detectron2's DatasetMapper that first checks the image file exists, so a missing image
    stops with its name instead of a traceback from inside PIL (detector training, evaluation)."""

    def __call__(self, dataset_dict):
        require_image_file(dataset_dict["file_name"])
        try:
            if self.instance_mask_format != "bitmask":
                return super().__call__(dataset_dict)
            with warnings.catch_warnings():
                # Bitmasks (RLE pseudo-labels): Detectron2's annotations_to_instances makes tensors of the
                # read-only arrays its PIL resize returns, on which PyTorch warns; nothing writes to them.
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
                return super().__call__(dataset_dict)
        except (OSError, SyntaxError) as e:  # PIL: UnidentifiedImageError, "image file is truncated", ...
            raise UnreadableImageError(dataset_dict["file_name"], e) from None


class HRLRDatasetMapper(DatasetMapper):
    """DatasetMapper that also emits the x ``scale_ratio`` twin of the image and annotations.

    Args: those of :class:`detectron2.data.DatasetMapper`, plus ``scale_ratio`` (LR size / HR
    size, default 0.5) and ``independent_flip`` (the reference's behaviour, B2; default False).
    """

    @configurable
    def __init__(self, is_train: bool = True, *, scale_ratio: float = 0.5, independent_flip: bool = False, **kwargs):
        super().__init__(is_train, **kwargs)
        if not 0 < scale_ratio < 1:
            raise ValueError(f"MODEL.AFI.SCALE_RATIO must be in (0, 1), got {scale_ratio}.")
        self.scale_ratio = scale_ratio
        self.independent_flip = independent_flip
        if independent_flip:
            logging.getLogger(__name__).warning(
                "Legacy mode: HR and LR images are flipped independently (B2 of docs/differences_from_reference.md)."
            )

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        ret.update(scale_ratio=cfg.MODEL.AFI.SCALE_RATIO, independent_flip=cfg.MODEL.AFI.LEGACY.INDEPENDENT_FLIP)
        return ret

    def _instances(self, annos, transforms, image_shape):
        annos = [
            utils.transform_instance_annotations(
                copy.deepcopy(obj), transforms, image_shape, keypoint_hflip_indices=self.keypoint_hflip_indices
            )
            for obj in annos
        ]
        instances = utils.annotations_to_instances(annos, image_shape, mask_format=self.instance_mask_format)
        if self.recompute_boxes:
            instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
        return utils.filter_empty_instances(instances)

    def __call__(self, dataset_dict: Dict) -> Dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image_or_raise(dataset_dict["file_name"], self.image_format)
        utils.check_image_size(dataset_dict, image)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        h, w = image.shape[:2]
        lh, lw = int(h * self.scale_ratio), int(w * self.scale_ratio)
        if min(lh, lw) < 1:
            raise ValueError(
                f"Image {dataset_dict['file_name']!r} is {h}x{w} after augmentation; its x{self.scale_ratio:g} "
                "twin would be empty."
            )
        lr_transforms = [T.ResizeTransform(h, w, lh, lw)]
        if self.independent_flip and np.random.rand() < 0.5:
            lr_transforms.append(T.HFlipTransform(lw))
        lr_transforms = T.TransformList(lr_transforms)
        lr_image = lr_transforms.apply_image(image)

        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        dataset_dict[lr_key("image", self.scale_ratio)] = torch.as_tensor(
            np.ascontiguousarray(lr_image.transpose(2, 0, 1))
        )
        annos = dataset_dict.pop("annotations", None)
        if not self.is_train or annos is None:
            return dataset_dict
        for obj in annos:
            if not self.use_instance_mask:
                obj.pop("segmentation", None)
            if not self.use_keypoint:
                obj.pop("keypoints", None)
        annos = [obj for obj in annos if obj.get("iscrowd", 0) == 0]
        dataset_dict["instances"] = self._instances(annos, transforms, (h, w))
        dataset_dict[lr_key("instances", self.scale_ratio)] = self._instances(
            annos, transforms + lr_transforms, (lh, lw)
        )
        return dataset_dict
