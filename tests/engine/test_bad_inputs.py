"""Bad inputs given to the real entry points (tools/stage{1,2,3}_train.py, run_net.py, pipeline.py
through their main functions): each stops with exit status 1 and ONE sentence on stderr naming
the file / key / value and what to do, without a traceback (unless --debug or AFIGAN_DEBUG=1).
The one case that is skipped instead of stopped, an unreadable image during training, is the
last test here."""

import copy
import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest
import torch

pytest.importorskip("detectron2")

from conftest import one_sentence_error  # noqa: E402
from d2_helpers import CONFIGS, REPO  # noqa: E402
from stage_helpers import TINY, save_teacher  # noqa: E402

S1, S2, S3 = (os.path.join(CONFIGS, "toy", "pipeline", f"stage{i}.yaml") for i in (1, 2, 3))
TINY_OPTS = [str(o) for o in TINY]


def _stop(tool, main, *argv):
    """Run, and return the one sentence of a run that must stop (status 1, no traceback)."""
    code, err, everything = tool(main, *argv)
    assert code == 1, everything[-3000:]
    assert "Traceback" not in everything, everything[-3000:]
    return one_sentence_error(err)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A teacher checkpoint, a stage-1 G and D pair (2 iterations) and the first half of the teacher file."""
    from stage_helpers import stage_cfg

    from afigan.engine import Stage1Trainer

    root = tmp_path_factory.mktemp("files")
    teacher = save_teacher(str(root / "teacher.pth"))
    t = Stage1Trainer(
        stage_cfg("toy/pipeline/stage1.yaml", str(root / "s1"), "MODEL.GUIDE_WEIGHTS", teacher, "SOLVER.MAX_ITER", 1)
    )
    t.resume_or_load(resume=False)
    t.train()
    data = open(teacher, "rb").read()
    half = root / "half.pth"
    half.write_bytes(data[: len(data) // 2])
    return {
        "teacher": teacher,
        "G": str(root / "s1" / "G_0" / "model_final.pth"),
        "D": str(root / "s1" / "D_0" / "model_final.pth"),
        "half": str(half),
    }


def _coco_set(tmp_path, n=3, edit=None):
    """A registered COCO data set of the first ``n`` toy training images (copied); ``edit(js,
    image_dir)`` may change the JSON dict and the files first. Returns its name."""
    from detectron2.data.datasets import register_coco_instances

    from afigan.data.datasets import toy_root
    from afigan.data.toy_shapes import ensure_toy_dataset, toy_paths

    json_file, image_root = toy_paths(ensure_toy_dataset(toy_root()), "train")
    src = json.load(open(json_file))
    js = copy.deepcopy(src)
    js["images"] = src["images"][:n]
    ids = {im["id"] for im in js["images"]}
    js["annotations"] = [a for a in src["annotations"] if a["image_id"] in ids]
    images = tmp_path / "images"
    images.mkdir()
    for im in js["images"]:
        shutil.copy(os.path.join(image_root, im["file_name"]), images / im["file_name"])
    if edit:
        edit(js, images)
    out = tmp_path / "instances.json"
    out.write_text(json.dumps(js))
    name = f"bad_{uuid.uuid4().hex[:8]}"
    register_coco_instances(name, {}, str(out), str(images))
    return name


def _stage3(tmp_path, *opts):
    return ["--config-file", S3, *TINY_OPTS, "OUTPUT_DIR", tmp_path / "out", "SOLVER.MAX_ITER", 2, *opts]


# --- the config ---------------------------------------------------------------------------


def test_missing_config_file(tool, tmp_path):
    s = _stop(tool, "stage3", "--config-file", tmp_path / "nope.yaml")
    assert "nope.yaml' does not exist; give the path of a YAML config" in s


def test_yaml_syntax_error(tool, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{S3}"\nSOLVER:\n  MAX_ITER: [1, 2\n')
    s = _stop(tool, "stage3", "--config-file", bad)
    assert s.startswith(f"YAML syntax error in {bad}, line 4, column 1:") and "fix the file" in s


@pytest.mark.parametrize("where", ["file", "command line"])
def test_unknown_key_names_the_closest_valid_one(tool, tmp_path, where):
    if where == "file":
        bad = tmp_path / "bad.yaml"
        bad.write_text(f'_BASE_: "{S3}"\nMODEL:\n  AFI:\n    INTREP: nearest\n')
        s = _stop(tool, "stage3", "--config-file", bad)
        assert s == f"{bad}: unknown config key MODEL.AFI.INTREP; did you mean MODEL.AFI.INTERP?"
    else:
        s = _stop(tool, "stage3", "--config-file", S3, "SOLVER.BASE_LRR", "0.1")
        assert s == "the command line: unknown config key SOLVER.BASE_LRR; did you mean SOLVER.BASE_LR?"


def test_wrong_type_for_a_key(tool, tmp_path):
    s = _stop(tool, "stage3", "--config-file", S3, "SOLVER.MAX_ITER", "many")
    assert s == (
        "the command line: SOLVER.MAX_ITER takes a value of type int (it was 300), not the str many; give a "
        "value of that type."
    )


# --- weights ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stage,key",
    [
        ("stage3", "MODEL.WEIGHTS"),
        ("stage1", "MODEL.GUIDE_WEIGHTS"),
        ("stage2", "MODEL.AFI_GEN_WEIGHTS"),
        ("stage3", "MODEL.AF_EXTRACTOR_WEIGHTS"),
    ],
)
def test_missing_weights_file(tool, tmp_path, files, stage, key):
    cfg = {"stage1": S1, "stage2": S2, "stage3": S3}[stage]
    given = {
        "stage1": [],
        "stage3": [],
        "stage2": ["MODEL.GUIDE_WEIGHTS", files["teacher"], "MODEL.AFI_DIS_WEIGHTS", files["D"]],
    }
    missing = tmp_path / "gone.pth"
    s = _stop(tool, stage, "--config-file", cfg, "OUTPUT_DIR", tmp_path / "out", *given[stage], key, missing)
    assert s == (
        f"{key}: file '{missing}' does not exist; give the path of an existing checkpoint (.pth or .pkl) or "
        "fix the path."
    )


def test_truncated_checkpoint(tool, tmp_path, files):
    s = _stop(tool, "stage3", *_stage3(tmp_path, "MODEL.WEIGHTS", files["half"]))
    assert s.startswith(f"Checkpoint '{files['half']}' cannot be read (") and "it is truncated or not a checkpoint" in s


def test_checkpoint_of_another_architecture_lists_how_many_tensors_fit(tool, tmp_path, files):
    # The teacher is a backbone-only network: evaluating it as the toy Mask R-CNN would run random heads.
    s = _stop(tool, "run_net", "--eval-only", *_stage3(tmp_path, "MODEL.WEIGHTS", files["teacher"]))
    teacher_keys = len(torch.load(files["teacher"], weights_only=False)["model"])
    assert (
        s.startswith(f"MODEL.WEIGHTS '{files['teacher']}' fits only ")
        and "it is a checkpoint of another architecture" in s
    )
    fit, total = (int(w) for w in s.split("fits only ")[1].split(" tensors")[0].split(" of the model's "))
    assert 0 < fit <= teacher_keys < total


# --- data ---------------------------------------------------------------------------------


def test_unregistered_dataset_lists_registered_ones(tool, tmp_path):
    s = _stop(tool, "stage3", *_stage3(tmp_path, "DATASETS.TRAIN", "('coco_2017_trian',)"))
    assert s.startswith("DATASETS.TRAIN: data set 'coco_2017_trian' is not registered;")
    assert "registered ones (closest: coco_2017_train," in s


def test_missing_annotation_json(tool, tmp_path):
    from detectron2.data.datasets import register_coco_instances

    name = f"bad_{uuid.uuid4().hex[:8]}"
    register_coco_instances(name, {}, str(tmp_path / "instances.json"), str(tmp_path))
    s = _stop(tool, "stage3", *_stage3(tmp_path, "DATASETS.TRAIN", f"('{name}',)"))
    assert s.startswith(
        f"DATASETS.TRAIN: data set '{name}' reads '{tmp_path / 'instances.json'}', which does not exist;"
    )


def test_annotation_file_that_is_not_json(tool, tmp_path):
    name = _coco_set(tmp_path)
    (tmp_path / "instances.json").write_text('{"images": [}')
    s = _stop(tool, "stage3", *_stage3(tmp_path, "DATASETS.TRAIN", f"('{name}',)"))
    assert s.startswith(
        f"DATASETS.TRAIN: the annotation file '{tmp_path / 'instances.json'}' of data set '{name}' is not valid JSON"
    )


def test_image_listed_in_the_json_that_does_not_exist(tool, tmp_path):
    name = _coco_set(tmp_path, edit=lambda js, images: os.remove(images / js["images"][1]["file_name"]))
    s = _stop(tool, "stage3", *_stage3(tmp_path, "DATASETS.TRAIN", f"('{name}',)"))
    assert s.startswith(f"DATASETS.TRAIN ('{name}',): 1 of the 3 images listed in the annotations do not exist, e.g. ")
    assert "000002.png" in s


def test_category_id_outside_the_categories(tool, tmp_path):
    def edit(js, images):
        js["annotations"][0]["category_id"] = 99

    name = _coco_set(tmp_path, edit=edit)
    s = _stop(tool, "stage3", *_stage3(tmp_path, "DATASETS.TRAIN", f"('{name}',)"))
    assert s.startswith(
        f"DATASETS.TRAIN: an annotation in '{tmp_path / 'instances.json'}' has category_id 99, which is not"
    )


def test_num_classes_that_disagrees_with_the_data(tool, tmp_path):
    s = _stop(tool, "stage3", *_stage3(tmp_path, "MODEL.ROI_HEADS.NUM_CLASSES", 5))
    assert s == (
        "MODEL.ROI_HEADS.NUM_CLASSES is 5, but DATASETS.TRAIN 'afigan_toy_train' has 3 categories "
        "(square, disc, triangle); set MODEL.ROI_HEADS.NUM_CLASSES 3."
    )


# --- processes, folders, resume -----------------------------------------------------------


def test_ims_per_batch_not_divisible_by_the_processes(tool, tmp_path):
    s = _stop(tool, "stage3", "--num-gpus", 3, *_stage3(tmp_path, "SOLVER.IMS_PER_BATCH", 4))
    assert s == (
        "SOLVER.IMS_PER_BATCH (4) must be divisible by the number of processes (3 = --num-gpus x "
        "--num-machines); change one of them."
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_num_gpus_on_a_machine_without_gpu_explains_the_cpu_route(tool, tmp_path):
    s = _stop(tool, "stage3", "--num-gpus", 2, *_stage3(tmp_path, "MODEL.DEVICE", "cuda"))
    assert s.startswith("--num-gpus 2: this machine has no GPU; to train with 2 CPU processes (gloo")
    assert "add MODEL.DEVICE cpu" in s


def test_output_dir_that_cannot_be_written(tool, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    s = _stop(tool, "stage3", *_stage3(tmp_path, "OUTPUT_DIR", blocker / "out"))
    assert s == (
        f"OUTPUT_DIR '{blocker / 'out'}' cannot be written: '{blocker}' is not a directory; choose another "
        f"OUTPUT_DIR or fix the permissions."
    )
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        s = _stop(tool, "stage3", *_stage3(tmp_path, "OUTPUT_DIR", ro / "out"))
        assert f"'{ro}' is not writable" in s


def test_resume_when_last_checkpoint_names_a_deleted_file(tool, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "last_checkpoint").write_text("model_0000009.pth")
    s = _stop(tool, "stage3", "--resume", *_stage3(tmp_path))
    assert s == (
        f"--resume: {out / 'last_checkpoint'} names 'model_0000009.pth', which does not exist; write the name "
        f"of an existing model_*.pth of that folder into it, or delete it to start again."
    )


# --- non-finite losses --------------------------------------------------------------------


def _nan_after(monkeypatch, module, name, calls, key=None):
    """Make ``module.name`` (a loss function) return a NaN term from its ``calls``-th call on."""
    original = getattr(module, name)
    count = [0]

    def poisoned(*args, **kwargs):
        losses = original(*args, **kwargs)
        count[0] += 1
        if count[0] > calls:
            k = key or next(iter(losses))
            losses = {**losses, k: losses[k] * float("nan")}
        return losses

    monkeypatch.setattr(module, name, poisoned)


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
def test_non_finite_loss_names_the_loss_iteration_and_last_good_checkpoint(tool, tmp_path, files, monkeypatch, stage):
    out = tmp_path / "out"
    common = [*TINY_OPTS, "OUTPUT_DIR", out, "SOLVER.MAX_ITER", 3, "SOLVER.CHECKPOINT_PERIOD", 1]
    if stage == "stage3":
        from detectron2.modeling.roi_heads import fast_rcnn

        _nan_after(monkeypatch, fast_rcnn.FastRCNNOutputLayers, "losses", 1, "loss_cls")
        argv, folder, bad = ["--config-file", S3, *common, "DATASETS.TEST", "()"], out, "loss_cls = nan"
    else:
        import afigan.engine.stage1 as s1
        import afigan.engine.stage2 as s2

        _nan_after(monkeypatch, s1 if stage == "stage1" else s2, "generator_loss", 1)
        key = "loss_adv_p2"
        extra = [
            "MODEL.AFI_GEN_WEIGHTS",
            files["G"],
            "MODEL.AFI_DIS_WEIGHTS",
            files["D"],
            "MODEL.WEIGHTS",
            files["teacher"],
        ]
        argv = [
            "--config-file",
            S1 if stage == "stage1" else S2,
            *common,
            "MODEL.GUIDE_WEIGHTS",
            files["teacher"],
            *(extra if stage == "stage2" else []),
        ]
        folder = out / ("G_0" if stage == "stage1" else "AFExtractor")
        bad = f"{'G' if stage == 'stage1' else 'M'} {key} = nan"
    s = _stop(tool, stage, *argv)
    assert s.startswith(f"Loss became infinite or NaN at iteration=1: {bad}"), s
    assert f"the last good checkpoint is '{folder / 'model_0000000.pth'}'" in s
    assert (folder / "last_checkpoint").read_text() == "model_0000000.pth"
    state = torch.load(folder / "model_0000000.pth", weights_only=False)
    assert state["iteration"] == 0 and all(
        torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()
    )


# --- --debug, bugs, the pipeline tool, a real subprocess -----------------------------------


def test_debug_flag_and_environment_show_the_traceback(tool, tmp_path, monkeypatch):
    monkeypatch.setenv("AFIGAN_DEBUG", "0")  # --debug sets it (for spawned ranks); restored after the test
    with pytest.raises(FileNotFoundError, match="nope.yaml' does not exist"):
        tool("stage3", "--debug", "--config-file", tmp_path / "nope.yaml")
    monkeypatch.setenv("AFIGAN_DEBUG", "0")
    assert _stop(tool, "stage3", "--config-file", tmp_path / "nope.yaml").endswith(
        "does not exist; give the path of a YAML config, e.g. configs/toy/pipeline/stage3.yaml."
    )
    monkeypatch.setenv("AFIGAN_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        tool("stage3", "--config-file", tmp_path / "nope.yaml")


def test_a_bug_keeps_its_traceback():
    import argparse

    from afigan.engine.cli import run_tool

    def buggy():
        raise AttributeError("'NoneType' object has no attribute 'shape'")

    with pytest.raises(AttributeError):  # not an input error: re-raised, so Python prints the traceback
        run_tool(buggy, argparse.Namespace(debug=False))


# What a spawned rank raised reaches the parent only as text: torch.multiprocessing's
# ProcessRaisedException carries the rank's formatted traceback.
def _rank_failure(rank: int, last_line: str):
    from torch.multiprocessing import ProcessRaisedException

    tb = f'Traceback (most recent call last):\n  File "x.py", line 1, in main\n    f()\n{last_line}\n'
    return ProcessRaisedException(f"\n\n-- Process {rank} terminated with the following error:\n{tb}", rank, 4242)


def test_user_error_types_are_one_list_and_the_names_of_spawned_ranks_are_derived_from_it():
    from afigan.data.image_io import UnreadableImageError
    from afigan.engine.errors import USER_ERRORS, is_user_error_name

    assert USER_ERRORS == (ValueError, KeyError, OSError, FloatingPointError)
    assert issubclass(UnreadableImageError, USER_ERRORS)
    # As a traceback prints them: built-in types bare, the others with their module.
    names = {
        "ValueError": True,
        "KeyError": True,
        "FloatingPointError": True,
        "FileNotFoundError": True,
        "PermissionError": True,
        "json.decoder.JSONDecodeError": True,
        "afigan.data.image_io.UnreadableImageError": True,
        "ConnectionResetError": True,  # an OSError: one sentence in-process, so from a rank too
        "UnicodeDecodeError": True,  # a ValueError
        "RuntimeError": False,
        "AssertionError": False,
        "AttributeError": False,
        "torch.OutOfMemoryError": False,  # a RuntimeError
        "no_such_module.ValueError": False,  # a type this process cannot see is not trusted
        "UnreadableImageError": False,  # not a built-in: the traceback would name its module
    }
    assert {n: is_user_error_name(n) for n in names} == names


@pytest.mark.parametrize(
    "last_line, sentence",
    [
        ("ValueError: MODEL.AFI.LEVELS: bad value; fix the config.", "MODEL.AFI.LEVELS: bad value; fix the config."),
        ("KeyError: 'unknown config key X'", "unknown config key X"),
        ("json.decoder.JSONDecodeError: Expecting value: line 1", "Expecting value: line 1"),
        ("ConnectionResetError: [Errno 104] Connection reset by peer", "[Errno 104] Connection reset by peer"),
    ],
)
def test_a_spawned_ranks_user_error_is_one_sentence(last_line, sentence, capsys):
    import argparse

    from afigan.engine.cli import run_tool

    def failing():
        raise _rank_failure(1, last_line)

    with pytest.raises(SystemExit) as stop:
        run_tool(failing, argparse.Namespace(debug=False, num_gpus=2, num_machines=1))
    assert stop.value.code == 1
    assert capsys.readouterr().err == f"Error: rank 1 of 2: {sentence}\n"


def test_a_spawned_ranks_bug_keeps_its_traceback():
    import argparse

    from torch.multiprocessing import ProcessRaisedException

    from afigan.engine.cli import run_tool

    def failing():
        raise _rank_failure(1, "RuntimeError: shape mismatch")

    with pytest.raises(ProcessRaisedException):
        run_tool(failing, argparse.Namespace(debug=False, num_gpus=2, num_machines=1))


def test_pipeline_tool_checks_every_stage_config_first(tool, tmp_path):
    shutil.copytree(CONFIGS, tmp_path / "configs")
    configs = tmp_path / "configs" / "toy" / "pipeline"
    with open(configs / "stage3.yaml", "a") as f:
        f.write("MODEL:\n  AF_EXTRACTOR_WEIGHT: x.pth\n")
    s = _stop(tool, "pipeline", "--config-dir", configs, "--output-dir", tmp_path / "out")
    assert s == (
        f"{configs / 'stage3.yaml'}: unknown config key MODEL.AF_EXTRACTOR_WEIGHT; did you mean "
        "MODEL.AF_EXTRACTOR_WEIGHTS?"
    )
    assert not (tmp_path / "out").exists()  # stopped before stage 0 started


def test_the_script_itself_exits_1_with_one_sentence_and_debug_shows_the_traceback(tmp_path):
    script = os.path.join(REPO, "tools", "stage1_train.py")
    env = {k: v for k, v in os.environ.items() if k != "AFIGAN_DEBUG"}
    for debug in ([], ["--debug"]):
        p = subprocess.run(
            [sys.executable, script, *debug, "--config-file", str(tmp_path / "nope.yaml")],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert p.returncode == 1
        if debug:
            assert "Traceback (most recent call last)" in p.stderr and "FileNotFoundError" in p.stderr
        else:
            assert "Traceback" not in p.stdout + p.stderr
            assert one_sentence_error(p.stderr).endswith(
                "nope.yaml' does not exist; give the path of a YAML config, e.g. configs/toy/pipeline/stage3.yaml."
            )


# --- skipped, not stopped -----------------------------------------------------------------


def test_unreadable_training_image_is_skipped_with_one_warning_and_counted(tool, tmp_path):
    def edit(js, images):
        (images / js["images"][0]["file_name"]).write_bytes(b"not a png")

    name = _coco_set(tmp_path, edit=edit)
    code, err, everything = tool(
        "stage3",
        *_stage3(
            tmp_path,
            "DATASETS.TRAIN",
            f"('{name}',)",
            "DATASETS.TEST",
            "()",
            "SOLVER.MAX_ITER",
            6,
            "DATALOADER.ASPECT_RATIO_GROUPING",
            False,
        ),
    )
    assert code == 0, everything[-3000:]
    warnings = [l for l in everything.splitlines() if "Skipped an unreadable training image" in l]
    assert len(warnings) == 1 and "000001.png" in warnings[0], warnings  # once per file, not per use
    metrics = [json.loads(l) for l in open(tmp_path / "out" / "metrics.json")]
    counts = [m["data/skipped_images"] for m in metrics if "data/skipped_images" in m]
    assert counts and counts[-1] >= 1
    assert os.path.isfile(tmp_path / "out" / "model_final.pth")


def test_unreadable_image_in_evaluation_stops_even_from_a_loader_worker(tool, tmp_path):
    from stage_helpers import stage_cfg

    from afigan.engine import DetectorTrainer

    def edit(js, images):
        (images / js["images"][0]["file_name"]).write_bytes(b"not a png")

    name = _coco_set(tmp_path, edit=edit)
    weights = tmp_path / "model.pth"
    torch.save(
        {"model": DetectorTrainer.build_model(stage_cfg("toy/pipeline/stage3.yaml", str(tmp_path / "m"))).state_dict()},
        weights,
    )
    # Evaluation stops: AP over a silently smaller set would not be the data set's AP.
    s = _stop(
        tool,
        "run_net",
        "--eval-only",
        *_stage3(tmp_path, "MODEL.WEIGHTS", weights, "DATASETS.TEST", f"('{name}',)", "DATALOADER.NUM_WORKERS", 1),
    )
    assert s.startswith(f"Cannot read image '{tmp_path / 'images' / '000001.png'}' (UnidentifiedImageError: ")
    assert s.endswith("replace or remove it from the data set.")
