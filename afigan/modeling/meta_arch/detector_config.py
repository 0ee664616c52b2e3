"""Config keys of the FCOS and CenterMask heads (``add_detector_config``).

Key names and defaults follow CenterMask2 / AdelaiDet (``MODEL.FCOS.*``, ``MODEL.MASKIOU_ON``,
``MODEL.ROI_MASKIOU_HEAD.*``, ``MODEL.ROI_MASK_HEAD.ASSIGN_CRITERION``), so configs written for
those projects load. Called from :func:`afigan.config.add_afigan_config`; like it, it only
touches the cfg it is given and is idempotent.
"""
from detectron2.config import CfgNode as CN

from afigan.config_utils import node as _node
from afigan.config_utils import set_default as _set_default

__all__ = ["add_detector_config", "add_fcos_config", "add_centermask_config"]


def add_fcos_config(cfg: CN) -> CN:
    """Add ``MODEL.FCOS.*`` (CenterMask2 names and defaults, plus AdelaiDet's loss keys)."""
    f = _node(cfg.MODEL, "FCOS")
    _set_default(f, "NUM_CLASSES", 80)  # foreground classes (no background); must equal the data set's
    _set_default(f, "IN_FEATURES", ["p3", "p4", "p5", "p6", "p7"])  # pyramid levels the head runs on
    _set_default(f, "FPN_STRIDES", [8, 16, 32, 64, 128])  # their strides (checked against the backbone)
    _set_default(f, "PRIOR_PROB", 0.01)  # initial foreground probability of the classifier
    _set_default(f, "INFERENCE_TH_TRAIN", 0.05)  # score threshold of the training-time proposals
    _set_default(f, "INFERENCE_TH_TEST", 0.05)  # score threshold at test time
    _set_default(f, "NMS_TH", 0.6)  # class-aware NMS IoU threshold
    _set_default(f, "PRE_NMS_TOPK_TRAIN", 1000)  # candidates kept per level before NMS (training)
    _set_default(f, "PRE_NMS_TOPK_TEST", 1000)  # candidates kept per level before NMS (test)
    _set_default(f, "POST_NMS_TOPK_TRAIN", 100)  # boxes kept per image after NMS (training proposals)
    _set_default(f, "POST_NMS_TOPK_TEST", 100)  # boxes kept per image after NMS (CenterMask: 50)
    _set_default(f, "TOP_LEVELS", 2)  # extra levels above P5 made from P5 (2: P6, P7)
    _set_default(f, "NORM", "GN")  # norm in the towers: "GN" | "BN" | "SyncBN" | "none"
    _set_default(f, "USE_SCALE", True)  # learnable scalar per level on the box regression
    _set_default(f, "THRESH_WITH_CTR", False)  # threshold cls*centerness instead of cls alone
    _set_default(f, "LOSS_ALPHA", 0.25)  # focal-loss alpha
    _set_default(f, "LOSS_GAMMA", 2.0)  # focal-loss gamma
    _set_default(f, "SIZES_OF_INTEREST", [64, 128, 256, 512])  # level boundaries of max(l, t, r, b)
    _set_default(f, "USE_RELU", True)  # ReLU on the distances (improved FCOS); False: exp (original)
    _set_default(f, "USE_DEFORMABLE", False)  # deformable 3x3 convs in the box and shared towers
    _set_default(f, "NUM_CLS_CONVS", 4)  # convs in the classification tower
    _set_default(f, "NUM_BOX_CONVS", 4)  # convs in the box tower
    _set_default(f, "NUM_SHARE_CONVS", 0)  # convs shared by both towers, before them
    _set_default(f, "CENTER_SAMPLE", True)  # positives only within POS_RADIUS strides of the box centre
    _set_default(f, "POS_RADIUS", 1.5)  # centre-sampling radius in strides
    _set_default(f, "LOC_LOSS_TYPE", "giou")  # box loss: "giou" | "iou" | "linear_iou" | "diou" | "ciou"
    _set_default(f, "LOSS_NORMALIZER_CLS", "fg")  # cls-loss divisor: "fg" | "moving_fg" | "all" (AdelaiDet)
    _set_default(f, "LOSS_WEIGHT_CLS", 1.0)  # weight of the classification loss (AdelaiDet)
    _set_default(f, "YIELD_PROPOSAL", False)  # emit proposals while training (always on under R-CNN meta-archs)
    return cfg


def add_centermask_config(cfg: CN) -> CN:
    """Add CenterMask's keys: MaskIoU head and the ratio-based RoI level assignment."""
    m = cfg.MODEL
    _set_default(m, "MASKIOU_ON", False)  # MaskIoU head that rescales mask scores (CenterMask)
    _set_default(m, "MASKIOU_LOSS_WEIGHT", 1.0)  # weight of its L2 loss
    h = _node(m, "ROI_MASKIOU_HEAD")
    _set_default(h, "NAME", "MaskIoUHead")  # name in afigan's ROI_MASKIOU_HEAD_REGISTRY
    _set_default(h, "CONV_DIM", 256)  # width of its convs
    _set_default(h, "NUM_CONV", 4)  # convs (the last has stride 2)
    _set_default(h, "FC_DIM", 1024)  # width of its two fully-connected layers
    # "area": FPN's canonical-size rule; "ratio": box area / image area (CenterMask eq. 2).
    _set_default(m.ROI_MASK_HEAD, "ASSIGN_CRITERION", "area")
    return cfg


def add_detector_config(cfg: CN) -> CN:
    """Add every FCOS and CenterMask key to ``cfg`` in place (idempotent) and return it."""
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    add_fcos_config(cfg)
    add_centermask_config(cfg)
    if was_frozen:
        cfg.freeze()
    return cfg
