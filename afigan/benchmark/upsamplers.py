"""Cost of every upsampler kind at 256 channels: parameters, GFLOPs (fvcore) and median latency of
one x2 call onto a P2-sized map, of a whole FPN neck with it, and the memory a training step of
that call keeps for backward. Used by tools/benchmark_upsamplers.py."""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.modeling import build_model
from detectron2.utils.analysis import FlopCountAnalysis
from torch import nn

from afigan.modeling.necks import upsampler_from_config

from .necks import ConstantFeatures, median_seconds, neck_cfg
from .timing import peak_memory

__all__ = ["VARIANTS", "benchmark", "format_table", "plot"]

# (label, kind, config overrides of MODEL.AFI): every registered kind, DySample in both styles
# and as DySample+. Learned kinds other than AFI get one instance per top-down step in the neck,
# as in their papers (configs/upsamplers/); AFI keeps its one shared interpolator.
VARIANTS: List[Tuple[str, str, Dict]] = [
    ("nearest", "nearest", {}),
    ("bilinear", "bilinear", {}),
    ("deconv", "deconv", {"SHARED": False}),
    ("pixelshuffle", "pixelshuffle", {"SHARED": False}),
    ("carafe", "carafe", {"SHARED": False}),
    ("dysample lp", "dysample", {"SHARED": False}),
    ("dysample pl", "dysample", {"SHARED": False, "DYSAMPLE.STYLE": "pl"}),
    ("dysample+ lp", "dysample", {"SHARED": False, "DYSAMPLE.DYSCOPE": True}),
    ("fade", "fade", {"SHARED": False}),
    ("afi", "afi", {}),
]


class _Call(nn.Module):
    """``up(x, output_size, guide)`` as a module of positional tensors, for fvcore's tracer."""

    def __init__(self, up: nn.Module, size: Sequence[int]):
        super().__init__()
        self.up, self.size = up, tuple(size)

    def forward(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        if getattr(self.up, "guided", False):
            return self.up(x, output_size=self.size, guide=guide)
        return self.up(x, output_size=self.size)


def _flops(module: nn.Module, inputs) -> float:
    return FlopCountAnalysis(module, inputs).unsupported_ops_warnings(False).uncalled_modules_warnings(False).total()


def _saved_for_backward_mb(fn) -> float:
    """MB of the tensors autograd keeps for backward while ``fn`` runs (distinct storages once):
    the activation memory of a training step, independent of the allocator and the machine."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.float().mean().backward()
    return sum(seen.values()) / 2**20


def _cfg(kind: str, overrides: Dict, device: str):
    cfg = neck_cfg("FPN", kind, device)
    for key, value in overrides.items():
        node = cfg.MODEL.AFI
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return cfg


def benchmark(
    variants=VARIANTS,
    channels: int = 256,
    p2: Tuple[int, int] = (200, 304),
    device: str = "cpu",
    repeats: int = 5,
    neck: bool = True,
    labels: Optional[Sequence[str]] = None,
) -> List[Dict]:
    """One row per variant: the x2 call from a (1, channels, H/2, W/2) map onto ``p2`` = (H, W)
    (guided kinds get a (1, channels, H, W) guide), and the whole FPN neck of a Mask R-CNN R-50
    on a (4H, 4W) image (so its P2 is ``p2``)."""
    rows = []
    h, w = p2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, channels, (h + 1) // 2, (w + 1) // 2, generator=g).to(device)
    guide = torch.randn(1, channels, h, w, generator=g).to(device)
    for label, kind, overrides in variants:
        if labels and label not in labels:
            continue
        cfg = _cfg(kind, overrides, device)
        torch.manual_seed(0)
        up = upsampler_from_config(cfg, channels).to(device)
        call = _Call(up, (h, w)).eval()
        params = sum(p.numel() for p in up.parameters())
        with torch.no_grad():
            row = dict(
                label=label,
                kind=kind,
                shared=cfg.MODEL.AFI.SHARED,
                params=params,
                call_gflops=_flops(call, (x, guide)) / 1e9,
            )
            with peak_memory(device, row, "call_peak_mib"):  # CUDA only
                row["call_ms"] = median_seconds(lambda: call(x, guide), repeats, device) * 1e3
        call.train()
        xg = x.clone().requires_grad_(True)
        row["train_saved_mb"] = _saved_for_backward_mb(lambda: call(xg, guide)) if params else 0.0
        if neck:
            model = build_model(cfg).eval()
            backbone = model.backbone
            image = torch.randint(0, 255, (3, 4 * h, 4 * w), dtype=torch.uint8)
            with torch.no_grad():
                images = model.preprocess_image([{"image": image}]).tensor
                bottom_up = backbone.bottom_up
                backbone.bottom_up = ConstantFeatures(bottom_up(images))
                try:
                    ups = backbone.srf_module if backbone.srf_modules is None else backbone.srf_modules
                    row.update(
                        neck_upsampler_params=sum(p.numel() for p in ups.parameters()),
                        neck_gflops=_flops(backbone, images) / 1e9,
                    )
                    with peak_memory(device, row, "neck_peak_mib"):
                        row["neck_ms"] = median_seconds(lambda: backbone(images), repeats, device) * 1e3
                finally:
                    backbone.bottom_up = bottom_up
            del model
        row.update(device=device, channels=channels, p2=f"{h}x{w}")
        rows.append(row)
    return rows


def format_table(rows: List[Dict]) -> str:
    cols = [
        ("label", "upsampler", "{}"),
        ("params", "params (one)", "{:,}"),
        ("call_gflops", "x2 GFLOPs", "{:.2f}"),
        ("call_ms", "x2 ms", "{:.1f}"),
        ("call_peak_mib", "x2 MiB", "{:.0f}"),  # CUDA only (afigan/benchmark/timing.py)
        ("train_saved_mb", "x2 train MB", "{:.0f}"),
        ("neck_upsampler_params", "neck upsampler params", "{:,}"),
        ("neck_gflops", "FPN GFLOPs", "{:.1f}"),
        ("neck_ms", "FPN ms", "{:.1f}"),
        ("neck_peak_mib", "FPN MiB", "{:.0f}"),
    ]
    cols = [c for c in cols if c[0] in rows[0]]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(c[2].format(r[c[0]]) for c in cols) + " |")
    return "\n".join(lines)


def plot(rows: List[Dict], path: str, title: str) -> None:
    """Latency of the x2 call against parameters, log axes (parameter-free kinds at x = 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=120)
    for r in rows:
        px = max(r["params"], 1)
        ax.scatter(px, r["call_ms"], s=30)
        ax.annotate(r["label"], (px, r["call_ms"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters of one upsampler (parameter-free at 1)")
    ax.set_ylabel("ms per x2 call onto P2")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
