"""What the study runs: the detection arms, the stage-1 ablations, the study's own toy set and the
two sizes of study (:data:`QUICK`, :data:`FULL`)."""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from afigan.data.datasets import register_toy_dataset, toy_root
from afigan.data.toy_shapes import ensure_toy_dataset

__all__ = [
    "Arm",
    "ARMS",
    "REFERENCE_ARM",
    "ABLATIONS",
    "ABLATION_RUN",
    "STUDY_TOY",
    "StudySettings",
    "QUICK",
    "FULL",
    "ensure_study_toy",
    "config_set",
    "chain_kinds",
]


@dataclass(frozen=True)
class Arm:
    """One detector of the detection comparison. ``chain``: the learned kind whose stage-1/2 chain
    (config set ``<config-dir>`` for afi, ``<config-dir>_<kind>`` otherwise) trains the
    interpolator that stage 3 starts from; None: stage 3 alone from ``<config-dir>/stage3.yaml``
    with ``MODEL.AFI.INTERP interp`` (a fixed kind, or a learned one from random init)."""

    chain: Optional[str] = None
    interp: str = ""
    label: str = ""


ARMS: Dict[str, Arm] = {
    "nearest": Arm(interp="nearest", label="nearest"),
    "bilinear": Arm(interp="bilinear", label="bilinear"),
    "afi": Arm(chain="afi", label="AFI, progressive (stages 1-2-3)"),
    "afi_stage3_only": Arm(interp="afi", label="AFI, stage 3 only (random init)"),
    "dysample": Arm(chain="dysample", label="DySample, progressive"),
    "carafe": Arm(chain="carafe", label="CARAFE, progressive"),
    "fade": Arm(chain="fade", label="FADE, progressive"),
}
REFERENCE_ARM = "nearest"

# name -> (the chain whose stage 1 is varied, what the variant is, its overrides)
ABLATIONS: Dict[str, Tuple[str, str, List[str]]] = {
    "adv": ("afi", "adversarial term detached from G (reference, B1)", ["MODEL.AFI.ADV_GRAD_TO_G", "False"]),
    "shared": ("afi", "one interpolator per level", ["MODEL.AFI.SHARED", "False"]),
}
ABLATION_RUN = {"adv": "afi_adv_detached", "shared": "afi_per_level"}

STUDY_TOY = "afigan_toy_study"
# The study's toy set: the package's generator with 64 validation images instead of 16 (the
# training split is the same 48 images); 16 images (~40 objects) made one evaluation's AP move
# by points from the choice of images alone.
STUDY_TOY_VAL = 64


@dataclass
class StudySettings:
    kinds: Tuple[str, ...]
    seeds: Tuple[int, ...]
    ablations: Tuple[str, ...]
    # SOLVER.MAX_ITER of stage 0, 1, 2, 3 (0: the YAML's); the YAML's schedule is compressed to it.
    max_iter: Tuple[int, int, int, int] = (200, 60, 60, 240)
    config_dir: str = "configs/toy/pipeline"
    dataset_train: str = STUDY_TOY + "_train"
    dataset_test: str = STUDY_TOY + "_val"
    fidelity_images: int = 0  # 0: all of dataset_test
    opts: List[str] = field(default_factory=list)


QUICK = StudySettings(kinds=("nearest", "bilinear", "afi", "afi_stage3_only"), seeds=(0,), ablations=("adv",))
FULL = StudySettings(
    kinds=("nearest", "bilinear", "afi", "afi_stage3_only", "dysample", "carafe"),
    seeds=(0, 1, 2),
    ablations=("adv", "shared"),
)


def ensure_study_toy() -> str:
    """Make (when missing or made with other settings) and register the study's toy set
    ``afigan_toy_study_{train,val}``; returns its root."""
    root = toy_root() + "_study"
    ensure_toy_dataset(root, num_val=STUDY_TOY_VAL)
    register_toy_dataset(root, prefix=STUDY_TOY)
    return root


def config_set(settings: StudySettings, kind: str) -> str:
    """The config set of a learned kind's chain: ``<config-dir>`` for afi, ``<config-dir>_<kind>`` else."""
    return settings.config_dir if kind == "afi" else f"{settings.config_dir.rstrip('/')}_{kind}"


def chain_kinds(settings: StudySettings) -> List[str]:
    """The learned kinds whose stage-1/2 chain the study trains (for an arm or an ablation)."""
    kinds = {ARMS[k].chain for k in settings.kinds if ARMS[k].chain}
    kinds |= {ABLATIONS[a][0] for a in settings.ablations}
    return sorted(kinds)
