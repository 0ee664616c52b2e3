"""One check for the most common custom-data mistake with FCOS / CenterMask (CenterMask2 #36):
the class-count keys of the heads disagree with each other or with the data set."""

from typing import Dict, List, Tuple

__all__ = ["NO_ROI_HEAD_ARCHS", "class_count_keys", "dataset_class_counts", "check_num_classes"]

# Meta-architectures that carry no ROI heads, so ROI_HEADS.NUM_CLASSES does not matter to them.
NO_ROI_HEAD_ARCHS = ("OneStageDetector", "RetinaNet", "ProposalNetwork", "SemanticSegmentor")


def class_count_keys(cfg) -> Dict[str, int]:
    """The NUM_CLASSES keys that the configured model actually reads, with their values."""
    keys = {}
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "RetinaNet":
        keys["MODEL.RETINANET.NUM_CLASSES"] = cfg.MODEL.RETINANET.NUM_CLASSES
    if cfg.MODEL.PROPOSAL_GENERATOR.NAME == "FCOS" and arch not in ("RetinaNet", "SemanticSegmentor"):
        keys["MODEL.FCOS.NUM_CLASSES"] = cfg.MODEL.FCOS.NUM_CLASSES
    if arch not in NO_ROI_HEAD_ARCHS:
        keys["MODEL.ROI_HEADS.NUM_CLASSES"] = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    return keys


def dataset_class_counts(cfg) -> List[Tuple[str, int]]:
    """(name, number of ``thing_classes``) for each DATASETS.TRAIN/TEST entry whose metadata has them."""
    from detectron2.data import MetadataCatalog

    out = []
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes is not None:
            out.append((name, len(classes)))
    return out


def check_num_classes(cfg) -> None:
    """Raise ``ValueError`` naming the keys to set when the model's class counts disagree with
    each other or with the categories of the configured data sets; return None otherwise."""
    keys = class_count_keys(cfg)
    data = dataset_class_counts(cfg)
    values = set(keys.values()) | {n for _, n in data}
    if len(values) <= 1:
        return
    have = ", ".join([f"{k}={v}" for k, v in keys.items()] + [f"data set '{d}' has {n} categories" for d, n in data])
    data_counts = {n for _, n in data}
    if len(data_counts) > 1:
        raise ValueError(
            f"The configured data sets have different numbers of categories ({have}); "
            "train and test on data sets with the same categories."
        )
    target = f"to {data_counts.pop()}" if data_counts else "to the same value"
    raise ValueError(
        f"Class counts disagree ({have}): set {' and '.join(keys)} {target}, "
        "the number of foreground categories (no background class)."
    )
