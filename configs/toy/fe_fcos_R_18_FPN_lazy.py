"""Toy CPU variant of ../enhanced/fe_fcos_R_50_FPN_1x_lazy.py: R-18, FPN width 64, the synthetic
afigan_toy set, 200 iterations. Run with tools/lazy_train_net.py --config-file <this file>."""

from detectron2.layers import ShapeSpec

from ..enhanced.fe_fcos_R_50_FPN_1x_lazy import dataloader, lr_multiplier, model, optimizer, train

det = model.model
det.backbone.bottom_up.stem.norm = "BN"
det.backbone.bottom_up.stages.depth = 18
det.backbone.bottom_up.stages.norm = "BN"
del det.backbone.bottom_up.stages.stride_in_1x1  # R-18 basic blocks have a single stride
det.backbone.bottom_up.freeze_at = 0  # random init: nothing to keep
det.backbone.out_channels = 64
det.head.input_shape = [ShapeSpec(channels=64)] * 5
det.head.conv_dims = [64, 64]
det.num_classes = 3
det.pixel_std = [57.375, 57.120, 58.395]  # no MSRA weights that absorbed the std

dataloader.train.dataset.names = "afigan_toy_train"
dataloader.test.dataset.names = "afigan_toy_val"
dataloader.train.mapper.augmentations[0].short_edge_length = (128, 144, 160)
dataloader.train.mapper.augmentations[0].max_size = 256
dataloader.test.mapper.augmentations[0].short_edge_length = 160
dataloader.test.mapper.augmentations[0].max_size = 256
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = 0
dataloader.test.num_workers = 0

# values [1, 0.1, 0.01]: LR drops at 150 and 180, the schedule ends at 200 (= train.max_iter)
lr_multiplier.scheduler.milestones = [150, 180, 200]
lr_multiplier.warmup_length = 20 / 200

train.output_dir = "./output/toy_fe_fcos_lazy"
train.init_checkpoint = ""
train.max_iter = 200
train.checkpointer.period = 100
train.eval_period = 0
train.device = "cpu"
