"""Every shipped LazyConfig trains for a few iterations with tools/lazy_train_net.py's code path
(model, optimizer, lr_multiplier, train loader, checkpointer, evaluation), on the toy data."""

import argparse
import glob
import json
import os

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from d2_helpers import CONFIGS  # noqa: E402

from afigan.engine.lazy import lazy_main, load_lazy_config  # noqa: E402

LAZY = sorted(os.path.relpath(p, CONFIGS) for p in glob.glob(os.path.join(CONFIGS, "**", "*.py"), recursive=True))


def _args(config, *opts, eval_only=False):
    return argparse.Namespace(
        config_file=os.path.join(CONFIGS, config),
        opts=list(opts),
        resume=False,
        eval_only=eval_only,
        num_gpus=1,
        num_machines=1,
        machine_rank=0,
        dist_url="auto",
    )


def test_lazy_configs_are_found():
    assert LAZY == ["enhanced/fe_fcos_R_50_FPN_1x_lazy.py", "toy/fe_fcos_R_18_FPN_lazy.py"]


@pytest.mark.parametrize("config", LAZY)
def test_lazy_config_trains_evaluates_and_checkpoints(config, tmp_path):
    opts = [
        f"train.output_dir={tmp_path}",
        "train.max_iter=3",
        "train.eval_period=3",
        "train.checkpointer.period=2",
        "train.init_checkpoint=",
        "train.device=cpu",
        "train.log_period=1",
        "model.model.num_classes=3",
        "dataloader.train.dataset.names=afigan_toy_train",
        "dataloader.test.dataset.names=afigan_toy_val",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "dataloader.train.mapper.augmentations.0.short_edge_length=[96]",
        "dataloader.train.mapper.augmentations.0.max_size=128",
        "dataloader.test.mapper.augmentations.0.short_edge_length=96",
        "dataloader.test.mapper.augmentations.0.max_size=128",
    ]
    results = lazy_main(_args(config, *opts))
    assert set(results) == {"bbox"} and "AP" in results["bbox"]
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".pth")) == ["model_0000001.pth", "model_final.pth"]
    lines = [json.loads(line) for line in open(tmp_path / "metrics.json") if "total_loss" in line]
    assert [r["iteration"] for r in lines] == [0, 1, 2]
    assert all(torch.isfinite(torch.tensor(r["total_loss"])) for r in lines)
    assert {"loss_fcos_cls", "loss_fe_sharp", "loss_fe_smooth", "lr"} <= set(lines[-1])
    # --eval-only evaluates the checkpoint it is given.
    res = lazy_main(_args(config, *opts, f"train.init_checkpoint={tmp_path / 'model_final.pth'}", eval_only=True))
    assert res["bbox"].keys() == results["bbox"].keys()


def test_missing_lazy_config_is_one_sentence(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--config-file '.*nope.py' does not exist"):
        load_lazy_config(str(tmp_path / "nope.py"))
