"""What the study runs: the detection arms, the stage-1 ablations, the fidelity curves' arms, the
probe's settings, the study's own toy sets and the two sizes of study (:data:`QUICK`, :data:`FULL`)."""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from afigan.config import load_config
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
    "PARTS",
    "CURVE_KINDS",
    "CurveArm",
    "CurveSettings",
    "ProbeSettings",
    "PROBE_TOY",
    "ensure_probe_toy",
    "first_seed_arms",
    "second_seed_arms",
    "budget_overrides",
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


PROBE_TOY = "afigan_toy_probe"
# The probe's own validation split: 256 images drawn with generator seed 1, so none of them is one
# of the study's 64 (seed 0); its training split is never used.
PROBE_TOY_VAL = 256
PROBE_TOY_SEED = 1

PARTS = ("curves", "probe", "detection")
# Learned kinds with a toy chain (configs/toy/pipeline_<kind>, afi: configs/toy/pipeline).
CURVE_KINDS = ("afi", "dysample", "carafe", "fade", "deconv", "pixelshuffle")


@dataclass(frozen=True)
class CurveArm:
    """One stage-1 run of the fidelity curves: ``kind``'s chain, ``SEED seed``, and ``opts`` on top."""

    name: str
    kind: str
    seed: int = 0
    opts: Tuple[str, ...] = ()
    label: str = ""


@dataclass(frozen=True)
class CurveSettings:
    """Stage 1 alone per learned kind for ``iters`` iterations, G evaluated every ``period``;
    ``adv_weights``: further AFI arms at these ``MODEL.AFI.ADV_WEIGHT`` values (the default arm
    keeps the YAML's 1e-3); ``second_seed``: AFI and the best other kind again with SEED 1."""

    kinds: Tuple[str, ...] = CURVE_KINDS
    adv_weights: Tuple[str, ...] = ("0", "1e-2")
    second_seed: bool = True
    # Sized for curves + probe in 45 min alone on 2 CPU cores: ten arms at 0.22-0.32 s of one core
    # per iteration (AFI the dearest) in bfloat16, about 0.14-0.2 s each on two.
    iters: int = 1000
    period: int = 100


@dataclass(frozen=True)
class ProbeSettings:
    """The detection probe: the first ``images`` images of ``dataset`` (0: all), ``resamples``
    paired bootstrap resamples drawn with ``seed``."""

    images: int = 0
    resamples: int = 1000
    seed: int = 0
    dataset: str = PROBE_TOY + "_val"


def first_seed_arms(c: CurveSettings) -> List[CurveArm]:
    """Every kind at SEED 0, then AFI at each extra adversarial weight."""
    arms = [CurveArm(k, k, 0, (), f"{k}, seed 0") for k in c.kinds]
    if "afi" in c.kinds:
        arms += [
            CurveArm(f"afi_adv{w}", "afi", 0, ("MODEL.AFI.ADV_WEIGHT", str(float(w))), f"afi, ADV_WEIGHT {w}, seed 0")
            for w in c.adv_weights
        ]
    return arms


def second_seed_arms(kinds: Sequence[str]) -> List[CurveArm]:
    """The second-seed runs (SEED 1) of ``kinds``."""
    return [CurveArm(f"{k}_seed1", k, 1, (), f"{k}, seed 1") for k in kinds]


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
    parts: Tuple[str, ...] = PARTS
    curves: CurveSettings = field(default_factory=CurveSettings)
    probe: ProbeSettings = field(default_factory=ProbeSettings)


# --quick: every part, shrunk to fit 10 minutes on 2 CPU cores: detection with nearest and the AFI
# chain at seed 0 with half the stage-3 budget (so give it its own --output-dir: the full study's
# stage-3 runs have other settings), curves of AFI and DySample over 150 iterations, the probe on
# 64 images.
QUICK = StudySettings(
    kinds=("nearest", "afi"),
    seeds=(0,),
    ablations=(),
    max_iter=(200, 60, 60, 120),
    curves=CurveSettings(kinds=("afi", "dysample"), adv_weights=(), second_seed=False, iters=150, period=50),
    probe=ProbeSettings(images=64),
)
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


def ensure_probe_toy() -> str:
    """Make (when missing) and register the probe's toy set ``afigan_toy_probe_{train,val}``
    (:data:`PROBE_TOY_VAL` validation images, generator seed :data:`PROBE_TOY_SEED`); returns its root."""
    root = toy_root() + "_probe"
    ensure_toy_dataset(root, num_val=PROBE_TOY_VAL, seed=PROBE_TOY_SEED)
    register_toy_dataset(root, prefix=PROBE_TOY)
    return root


def budget_overrides(config_file: str, iters: int, opts: Sequence[str]) -> List[str]:
    """Overrides that compress the YAML's schedule (steps and warm-up scaled alike) to ``iters``."""
    if iters <= 0:
        return []
    solver = load_config(config_file, list(opts)).SOLVER
    scale = iters / solver.MAX_ITER
    # fvcore's schedule wants every step before the last iteration; a budget that short keeps none.
    steps = tuple(sorted({max(1, round(s * scale)) for s in solver.STEPS if round(s * scale) < iters}))
    return [
        "SOLVER.MAX_ITER",
        str(iters),
        "SOLVER.STEPS",
        str(steps),
        "SOLVER.WARMUP_ITERS",
        str(max(1, round(solver.WARMUP_ITERS * scale))),
    ]
