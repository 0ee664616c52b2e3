"""The study of ``tools/study.py``: does the AF interpolator do what AFI-GAN promises?

Three questions, asked on one data set with one teacher (README, "What we measured"):

* **Interpolation fidelity**: on held-out images (``DATASETS.TEST``), per pyramid level, how far
  the x2 upsampling of the teacher's half-resolution features P^lr_l is from its full-resolution
  features P^hr_l, for nearest, bilinear, every stage-1 G and every stage-2 interpolator of the
  study (:func:`.fidelity.interpolation_fidelity`: L1, relative L2 and PSNR over the level's feature range).
  The half-size image is made as stage 1 makes it (:class:`afigan.data.hr_lr_mapper.HRLRDatasetMapper`)
  and each G is called as stage 1 calls it (:class:`afigan.engine.stage1.LevelwiseGenerator`).
* **Detection**: stage-3 COCO bbox/segm AP of one detector config whose only difference is the
  upsampler (:data:`ARMS`: nearest, bilinear, AFI from the whole progressive chain, AFI trained
  by stage 3 alone from random init, DySample, CARAFE, FADE), each for several ``SEED`` values at
  one stage-3 budget; mean, sample standard deviation and a paired per-seed comparison with nearest.
* **Ablations** (:data:`ABLATIONS`): stage 1 with the reference's detached adversarial term
  (``MODEL.AFI.ADV_GRAD_TO_G False``) and with one interpolator per level (``MODEL.AFI.SHARED
  False``), compared with the chain's own stage 1 by content loss and fidelity.

One teacher (stage 0) serves every run, and one stage-1/2 chain per learned kind serves all of
its stage-3 seeds: the seeds vary stage 3 only. Every run goes through the pipeline's public stage
API (:class:`afigan.engine.pipeline.Pipeline`, wiring from the stage table), is skipped when
finished (stages 0-2: their final checkpoints; stage 3: its ``results.json``) and resumes from its
last checkpoint when interrupted, both only when it was started with the same settings (the
pipeline's stale-settings rule). ``study.json`` records every run's config, overrides, seed and
wall time as it goes; ``study.md``, ``fidelity.png`` and ``detection.png`` are written at the end.

Two more parts (``--part curves|probe|detection``; the above is "detection") ask the question
without the two reasons the detection part cannot answer it (too little training, training noise):

* **Curves** (:mod:`.curves`): stage 1 alone per learned kind (and AFI at three adversarial
  weights, and a second seed for AFI and the best other kind), trained until its fidelity curve
  flattens; G evaluated at every checkpoint per level (L1, PSNR and the blur measure of
  :mod:`.blur`), a convergence verdict per arm, ``fidelity_curves.png``.
* **Probe** (:mod:`.probe`): the teacher's own RPN and heads on its full-resolution pyramid, on
  the half-size image's pyramid upsampled by nearest, bilinear and each converged G, and on the
  half-size pyramid alone; COCO AP per arm on the probe's own 256 images and a paired bootstrap
  over them of each arm's difference to bilinear (:mod:`.bootstrap`).

Modules by job: :mod:`.settings` (arms, ablations, curve arms, study sizes, the study's toy sets),
:mod:`.fidelity` (interpolation fidelity), :mod:`.blur` (high-frequency error and energy ratio),
:mod:`.curves`, :mod:`.probe`, :mod:`.bootstrap` (AP from per-image matching, paired bootstrap),
:mod:`.stats` (seed statistics, subset AP), :mod:`.runner` (the runs, through the pipeline's
public stage API), :mod:`.report` and :mod:`.report_evidence` (study.json, study.md, charts).
"""

from .blur import BlurSums, blur_scores, laplacian
from .bootstrap import average_precision, coco_matching, paired_bootstrap
from .curves import CONVERGED_BELOW, convergence, run_curves
from .fidelity import ErrorSums, fixed_x2, interpolation_fidelity, learned_x2, teacher_pyramids
from .probe import load_detector, probe_detections, probe_scores, run_probe
from .report import format_markdown, plot_detection, plot_fidelity, write_outputs
from .runner import StudyRunner, content_loss, run_study
from .settings import (
    ABLATIONS,
    ARMS,
    CURVE_KINDS,
    FULL,
    PARTS,
    QUICK,
    STUDY_TOY,
    Arm,
    CurveSettings,
    ProbeSettings,
    StudySettings,
    budget_overrides,
    ensure_probe_toy,
    ensure_study_toy,
)
from .stats import mean_over_levels, mean_std, paired, seed_noise, subset_ap, summarize

__all__ = [
    "BlurSums",
    "blur_scores",
    "laplacian",
    "average_precision",
    "coco_matching",
    "paired_bootstrap",
    "CONVERGED_BELOW",
    "convergence",
    "run_curves",
    "load_detector",
    "probe_detections",
    "probe_scores",
    "run_probe",
    "CURVE_KINDS",
    "PARTS",
    "CurveSettings",
    "ProbeSettings",
    "ensure_probe_toy",
    "mean_over_levels",
    "ErrorSums",
    "fixed_x2",
    "interpolation_fidelity",
    "learned_x2",
    "teacher_pyramids",
    "mean_std",
    "paired",
    "summarize",
    "seed_noise",
    "subset_ap",
    "Arm",
    "ARMS",
    "ABLATIONS",
    "StudySettings",
    "QUICK",
    "FULL",
    "STUDY_TOY",
    "ensure_study_toy",
    "budget_overrides",
    "StudyRunner",
    "content_loss",
    "run_study",
    "write_outputs",
    "format_markdown",
    "plot_fidelity",
    "plot_detection",
]
