"""What the pipeline passes to each stage, per the stage table: earlier outputs, the teacher, and
the command line winning over both the table and the stage YAMLs."""

import argparse
import os
import shutil

import pytest

pytest.importorskip("detectron2")

from d2_helpers import CONFIGS, make_cfg  # noqa: E402

from afigan.config import flatten  # noqa: E402
from afigan.engine.pipeline import Pipeline, stage_final_files  # noqa: E402
from afigan.engine.stages import STAGES, final_files  # noqa: E402


def _config_set(tmp_path, stage1_weights="", stage2_weights=""):
    """A copy of configs/ whose toy stage1.yaml / stage2.yaml also set MODEL.GUIDE_WEIGHTS / MODEL.WEIGHTS."""
    root = tmp_path / "configs"
    shutil.copytree(CONFIGS, root)
    pipe = root / "toy" / "pipeline"
    for name, key, value in (("stage1", "GUIDE_WEIGHTS", stage1_weights), ("stage2", "WEIGHTS", stage2_weights)):
        if value:
            os.rename(pipe / f"{name}.yaml", pipe / f"{name}_orig.yaml")
            (pipe / f"{name}.yaml").write_text(f'_BASE_: "{name}_orig.yaml"\nMODEL:\n  {key}: {value}\n')
    return str(pipe)


def _stage_cfg(pipeline, stage, out):
    """The cfg a pipeline run gives ``stage``: its YAML, then the command line, then the wiring."""
    cfg = make_cfg(None)
    cfg.merge_from_file(pipeline.files[stage])
    cfg.merge_from_list(pipeline.opts + ["OUTPUT_DIR", os.path.join(out, stage)] + pipeline.overrides(stage))
    return cfg


def _pipeline(config_dir, out, *opts):
    args = argparse.Namespace(
        num_gpus=1,
        num_machines=1,
        machine_rank=0,
        dist_url="auto",
        opts=[],
        config_file="",
        resume=True,
        eval_only=False,
    )
    return Pipeline(config_dir, out, args, list(opts))


def test_stage_table_and_final_files():
    assert list(STAGES) == ["stage0", "stage1", "stage2", "stage3"]
    assert final_files("stage1", "o") == [
        os.path.join("o", "G_0", "model_final.pth"),
        os.path.join("o", "D_0", "model_final.pth"),
    ]
    assert final_files("stage2", "o") == [
        os.path.join("o", "AFExtractor", "model_final.pth"),
        os.path.join("o", "Disc", "model_final.pth"),
    ]
    assert final_files("stage3", "o") == [os.path.join("o", "model_final.pth")]
    assert [s for s in STAGES if STAGES[s].evaluates] == ["stage0", "stage3"]


def test_chain_without_command_line(tmp_path):
    out = str(tmp_path / "out")
    p = _pipeline(os.path.join(CONFIGS, "toy", "pipeline"), out)
    final = stage_final_files(out)
    s1, s2, s3 = (_stage_cfg(p, s, out) for s in ("stage1", "stage2", "stage3"))
    assert s1.MODEL.GUIDE_WEIGHTS == final["stage0"][0]
    assert s2.MODEL.GUIDE_WEIGHTS == s2.MODEL.WEIGHTS == final["stage0"][0]
    assert (s2.MODEL.AFI_GEN_WEIGHTS, s2.MODEL.AFI_DIS_WEIGHTS) == tuple(final["stage1"])
    assert s3.MODEL.AF_EXTRACTOR_WEIGHTS == final["stage2"][0]


def test_stage_yaml_beats_the_teacher_for_stage2_weights_and_the_command_line_beats_both(tmp_path):
    config_dir = _config_set(tmp_path, stage2_weights="from_stage2_yaml.pth")
    out = str(tmp_path / "out")
    s2 = _stage_cfg(_pipeline(config_dir, out), "stage2", out)
    assert s2.MODEL.WEIGHTS == "from_stage2_yaml.pth"
    p = _pipeline(config_dir, out, "MODEL.WEIGHTS", "from_cli.pth", "MODEL.AFI_GEN_WEIGHTS", "g_cli.pth")
    s2 = _stage_cfg(p, "stage2", out)
    assert s2.MODEL.WEIGHTS == "from_cli.pth"
    assert s2.MODEL.AFI_GEN_WEIGHTS == "g_cli.pth"  # the command line beats the chain too
    assert s2.MODEL.AFI_DIS_WEIGHTS == stage_final_files(out)["stage1"][1]


def test_teacher_is_command_line_then_stage1_yaml_then_stage0(tmp_path):
    out = str(tmp_path / "out")
    config_dir = _config_set(tmp_path, stage1_weights="teacher_yaml.pkl")
    p = _pipeline(config_dir, out)
    assert p.teacher_weights() == "teacher_yaml.pkl"
    assert _stage_cfg(p, "stage2", out).MODEL.GUIDE_WEIGHTS == "teacher_yaml.pkl"  # one teacher for stages 1 and 2
    p = _pipeline(config_dir, out, "MODEL.GUIDE_WEIGHTS", "teacher_cli.pkl")
    assert p.teacher_weights() == "teacher_cli.pkl"
    for stage in ("stage1", "stage2"):
        assert _stage_cfg(p, stage, out).MODEL.GUIDE_WEIGHTS == "teacher_cli.pkl"


def test_option_and_stage_config_read_the_command_line_over_the_yaml(tmp_path):
    out = str(tmp_path / "out")
    config_dir = _config_set(tmp_path, stage2_weights="from_stage2_yaml.pth")
    p = _pipeline(config_dir, out, "SOLVER.BASE_LR", "0.5")
    assert p.option("MODEL.WEIGHTS", "stage2") == "from_stage2_yaml.pth"  # the YAML's (through _BASE_)
    assert p.option("SOLVER.BASE_LR", "stage3") == 0.5  # the command line's
    assert p.option("SOLVER.MAX_ITER", "stage3") == 300  # the YAML's
    # The config a stage is trained (and recorded) with: YAML, command line, wiring, AFI.STAGE.
    for stage in ("stage1", "stage2", "stage3"):
        expected = dict(flatten(_stage_cfg(p, stage, out)), **{"MODEL.AFI.STAGE": stage})
        assert flatten(p.stage_config(stage)) == expected
