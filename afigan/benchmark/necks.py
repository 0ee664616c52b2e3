"""Inference cost of the necks with each upsampler: parameters, FLOPs (fvcore) and median latency
of the neck alone and of a whole Mask R-CNN R-50 forward. Used by tools/benchmark_necks.py."""

from typing import Dict, List

import torch
from detectron2.modeling import build_model
from detectron2.utils.analysis import FlopCountAnalysis
from torch import nn

from afigan.config import load_config

from .timing import median_seconds as _median_seconds
from .timing import peak_memory

__all__ = ["NECKS", "neck_cfg", "benchmark", "format_table", "ConstantFeatures", "median_seconds"]

# Backbone builder and the RPN / ROI feature names each neck needs in a Mask R-CNN.
NECKS = {
    "FPN": dict(name="build_resnet_fpn_sr_backbone", rpn=["p2", "p3", "p4", "p5", "p6"], roi=["p2", "p3", "p4", "p5"]),
    "PAFPN": dict(
        name="build_resnet_pafpn_sr_backbone", rpn=["p2", "p3", "p4", "p5", "p6"], roi=["p2", "p3", "p4", "p5"]
    ),
    "BiFPN": dict(
        name="build_resnet_bifpn_sr_backbone", rpn=["p3", "p4", "p5", "p6", "p7"], roi=["p3", "p4", "p5", "p6"]
    ),
}


def neck_cfg(neck: str, kind: str, device: str):
    """Mask R-CNN R-50 config with ``neck`` upsampling with ``kind`` (reference sizes: 256 channels,
    3 dense blocks)."""
    spec = NECKS[neck]
    levels = ["res2", "res3", "res4", "res5"]
    return load_config(
        None,
        [
            *("MODEL.DEVICE", device, "MODEL.MASK_ON", True, "MODEL.BACKBONE.NAME", spec["name"]),
            *("MODEL.RESNETS.OUT_FEATURES", levels, "MODEL.FPN.IN_FEATURES", levels),
            *("MODEL.BIFPN.IN_FEATURES", levels[1:], "MODEL.BIFPN.NORM", "BN", "MODEL.AFI.INTERP", kind),
            *("MODEL.RPN.IN_FEATURES", spec["rpn"], "MODEL.ROI_HEADS.NAME", "StandardROIHeads"),
            *("MODEL.ROI_HEADS.IN_FEATURES", spec["roi"], "MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead"),
            *("MODEL.ROI_BOX_HEAD.NUM_FC", 2, "MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead"),
            *("MODEL.ROI_MASK_HEAD.NUM_CONV", 4, "MODEL.ANCHOR_GENERATOR.SIZES", [[32], [64], [128], [256], [512]]),
        ],
    )


class ConstantFeatures(nn.Module):
    """Stands in for the bottom-up network: returns precomputed features (neck-only timing)."""

    def __init__(self, features):
        super().__init__()
        self.features = features

    def forward(self, x):
        return self.features


def median_seconds(fn, repeats: int, device: str) -> float:
    """Median seconds of ``repeats`` calls after one untimed warm-up (CUDA events on a GPU,
    afigan/benchmark/timing.py)."""
    return _median_seconds(fn, repeats, device, warmup=1)


@torch.no_grad()
def benchmark(
    necks: List[str], kinds: List[str], size=(800, 1216), device: str = "cpu", repeats: int = 5, full: bool = True
) -> List[Dict]:
    """One row per (neck, kind): neck parameters, neck GFLOPs and ms, full-model GFLOPs and ms."""
    rows = []
    h, w = size
    for neck in necks:
        for kind in kinds:
            model = build_model(neck_cfg(neck, kind, device)).eval()
            backbone = model.backbone
            image = torch.randint(0, 255, (3, h, w), dtype=torch.uint8)
            images = model.preprocess_image([{"image": image}]).tensor
            bottom_up = backbone.bottom_up
            feats = bottom_up(images)
            neck_params = sum(p.numel() for n, p in backbone.named_parameters() if not n.startswith("bottom_up."))
            srf_params = (
                sum(p.numel() for p in backbone.srf_module.parameters()) if hasattr(backbone, "srf_module") else 0
            )
            backbone.bottom_up = ConstantFeatures(feats)
            memory = {}  # peak MiB of the timed calls, on CUDA only
            try:
                neck_flops = (
                    FlopCountAnalysis(backbone, images)
                    .unsupported_ops_warnings(False)
                    .uncalled_modules_warnings(False)
                    .total()
                )
                with peak_memory(device, memory, "neck_peak_mib"):
                    neck_s = median_seconds(lambda: backbone(images), repeats, device)
            finally:
                backbone.bottom_up = bottom_up
            row = dict(
                neck=neck,
                kind=kind,
                neck_params=neck_params,
                interpolator_params=srf_params,
                neck_gflops=neck_flops / 1e9,
                neck_ms=neck_s * 1e3,
                image=f"{h}x{w}",
                device=device,
                **memory,
            )
            if full:
                inputs = [{"image": image, "height": h, "width": w}]
                flops = (
                    FlopCountAnalysis(model, inputs)
                    .unsupported_ops_warnings(False)
                    .uncalled_modules_warnings(False)
                    .total()
                )
                with peak_memory(device, row, "model_peak_mib"):
                    model_s = median_seconds(lambda: model(inputs), repeats, device)
                row.update(
                    model_params=sum(p.numel() for p in model.parameters()),
                    model_gflops=flops / 1e9,
                    model_ms=model_s * 1e3,
                )
            rows.append(row)
            model = None  # free it before the next one is built
    return rows


def format_table(rows: List[Dict]) -> str:
    cols = [
        ("neck", "neck", "{}"),
        ("kind", "upsampler", "{}"),
        ("neck_params", "neck params (M)", "{:.2f}"),
        ("neck_gflops", "neck GFLOPs", "{:.1f}"),
        ("neck_ms", "neck ms", "{:.1f}"),
        ("neck_peak_mib", "neck MiB", "{:.0f}"),  # CUDA only (afigan/benchmark/timing.py)
        ("model_gflops", "Mask R-CNN GFLOPs", "{:.1f}"),
        ("model_ms", "Mask R-CNN ms", "{:.1f}"),
        ("model_peak_mib", "Mask R-CNN MiB", "{:.0f}"),
    ]
    cols = [c for c in cols if c[0] in rows[0]]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vals = [c[2].format(r[c[0]] / 1e6 if c[0] == "neck_params" else r[c[0]]) for c in cols]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)
