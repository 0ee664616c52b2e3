"""The progressive AFI-GAN chain, written down once: which trainer runs each stage, which files
mark it done, and which config keys of a stage are fed by which earlier result. The command-line
entry points (:mod:`afigan.engine.cli`) and the pipeline (:mod:`afigan.engine.pipeline`) both
read this table.
"""

import os
from dataclasses import dataclass, field
from typing import Dict, List, Tuple, Union

from .detector import DetectorTrainer
from .stage1 import Stage1Trainer
from .stage2 import Stage2Trainer

__all__ = ["Stage", "Output", "Teacher", "STAGES", "final_files"]


@dataclass(frozen=True)
class Output:
    """The ``index``-th final file of ``stage`` (see :func:`final_files`): always what the
    pipeline passes on, unless the command line names the key."""

    stage: str
    index: int = 0


@dataclass(frozen=True)
class Teacher:
    """The teacher of stages 1 and 2 (one for both): the command line's ``MODEL.GUIDE_WEIGHTS``,
    else stage1.yaml's, else the model stage 0 trains. ``yaml_first``: the stage's own YAML value
    of the key, when it sets one, comes before the teacher (the command line still comes first)."""

    yaml_first: bool = False


Source = Union[Output, Teacher]


@dataclass(frozen=True)
class Stage:
    """One stage: its trainer, what it is, and its inputs (config key -> where the value comes
    from in a pipeline run). ``evaluates``: the trainer's ``test`` runs COCO evaluation, so the
    stage accepts ``--eval-only``."""

    name: str
    trainer: type
    description: str
    inputs: Dict[str, Source] = field(default_factory=dict)
    evaluates: bool = False
    required: Tuple[str, ...] = ()  # weights keys the stage cannot start without


STAGES: Dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("stage0", DetectorTrainer, "the nearest-neighbour teacher detector", evaluates=True),
        Stage(
            "stage1",
            Stage1Trainer,
            "the AF interpolator G and the feature patch discriminator D",
            inputs={"MODEL.GUIDE_WEIGHTS": Teacher()},
            required=("MODEL.GUIDE_WEIGHTS",),
        ),
        Stage(
            "stage2",
            Stage2Trainer,
            "the multi-scale AF extractor on half-size images",
            # MODEL.WEIGHTS: M starts from the teacher's weights, as in the reference.
            inputs={
                "MODEL.GUIDE_WEIGHTS": Teacher(),
                "MODEL.WEIGHTS": Teacher(yaml_first=True),
                "MODEL.AFI_GEN_WEIGHTS": Output("stage1", 0),
                "MODEL.AFI_DIS_WEIGHTS": Output("stage1", 1),
            },
            required=("MODEL.GUIDE_WEIGHTS", "MODEL.AFI_GEN_WEIGHTS", "MODEL.AFI_DIS_WEIGHTS"),
        ),
        Stage(
            "stage3",
            DetectorTrainer,
            "the target detector with the stage-2 interpolator",
            inputs={"MODEL.AF_EXTRACTOR_WEIGHTS": Output("stage2", 0)},
            evaluates=True,
        ),
    )
}


def final_files(stage: str, output_dir: str) -> List[str]:
    """The files whose existence marks ``stage`` as done when it wrote to ``output_dir``:
    ``model_final.pth`` in each of its trainer's checkpoint folders (G then D for stage 1, M then
    D for stage 2)."""
    dirs: Tuple[str, ...] = STAGES[stage].trainer.checkpoint_dirs
    return [os.path.join(output_dir, d, "model_final.pth") for d in dirs]
