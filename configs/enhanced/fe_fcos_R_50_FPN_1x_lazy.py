"""Detectron2's own FCOS R-50-FPN with Feature Enhancement, as a LazyConfig (Detectron2's FCOS has
no yacs config; fe_fcos_R_50_FPN_1x.yaml is the yacs counterpart with afigan's FCOS).

Run with ``tools/lazy_train_net.py --config-file <this file>`` (or Detectron2's
``tools/lazyconfig_train_net.py`` from a Detectron2 checkout). The reference
never trained FCOS with the final method (its FCOS model could not run), so there is no reference
lambda: the RetinaNet values (1e-5 / 1e-5) are used. Baseline: ``model.enabled=False``.
Detectron2's standard FCOS 1x recipe otherwise (MSRA R-50, 16 images/iter, lr 0.01, 90k iters).
"""

import detectron2.data.transforms as T
import torch
from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.evaluation import COCOEvaluator
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import FPN, BasicStem, ResNet
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import MultiStepParamScheduler
from omegaconf import OmegaConf

import afigan  # noqa: F401  (registers afigan's data sets and components)
from afigan.modeling import feature_enhanced

model = L(feature_enhanced)(
    model=L(FCOS)(
        backbone=L(FPN)(
            bottom_up=L(ResNet)(
                stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
                stages=L(ResNet.make_default_stages)(depth=50, stride_in_1x1=True, norm="FrozenBN"),
                out_features=["res3", "res4", "res5"],
                freeze_at=2,
            ),
            in_features=["res3", "res4", "res5"],
            out_channels=256,
            # P6/P7 from P5 (FCOS paper, Sec. 2.2)
            top_block=L(LastLevelP6P7)(
                in_channels="${..out_channels}", out_channels="${..out_channels}", in_feature="p5"
            ),
        ),
        head=L(FCOSHead)(
            input_shape=[ShapeSpec(channels=256)] * 5,
            conv_dims=[256, 256, 256, 256],
            num_classes="${..num_classes}",
            prior_prob=0.01,
            norm="GN",
        ),
        head_in_features=["p3", "p4", "p5", "p6", "p7"],
        num_classes=80,
        test_score_thresh=0.2,
        test_nms_thresh=0.6,
        pixel_mean=[103.530, 116.280, 123.675],
        pixel_std=[1.0, 1.0, 1.0],
    ),
    enabled=True,
    sharp_stages=["res3"],  # torchvision layer2: weight variance maximised
    smooth_stages=["res5"],  # torchvision layer4: weight Frobenius norm penalised
    sharp_weight=1e-5,
    smooth_weight=1e-5,
    weight_decay=1e-4,  # only for the start-up log of the terms' strength; keep equal to optimizer.weight_decay
)

dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train"),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(
                short_edge_length=(640, 672, 704, 736, 768, 800), sample_style="choice", max_size=1333
            ),
            L(T.RandomFlip)(horizontal=True),
        ],
        image_format="BGR",
        use_instance_mask=False,
    ),
    total_batch_size=16,
    num_workers=4,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333)],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=4,
)
dataloader.evaluator = L(COCOEvaluator)(dataset_name="${..test.dataset.names}")

optimizer = L(torch.optim.SGD)(
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0),  # params.model is set by the trainer
    lr=0.01,
    momentum=0.9,
    weight_decay=1e-4,
)

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[60000, 80000, 90000]),
    warmup_length=1000 / 90000,
    warmup_method="linear",
    warmup_factor=0.001,
)

train = dict(
    output_dir="./output/fe_fcos_R_50_FPN_1x_lazy",
    init_checkpoint="detectron2://ImageNetPretrained/MSRA/R-50.pkl",
    max_iter=90000,
    amp=dict(enabled=False),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=5000, max_to_keep=100),
    eval_period=5000,
    log_period=20,
    device="cuda",
    seed=0,  # read by tools/lazy_train_net.py: every iteration's random draws depend on it only
)
