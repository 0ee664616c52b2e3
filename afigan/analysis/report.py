"""The filter report behind ``tools/analyze_filters.py``: per backbone stage, what the Feature
Enhancement regulariser targets (Σ‖W‖_F, ΣVar(W)) and what its README claims (edge-like early
stage, blur-like late stage: kernel and feature-map high-frequency shares), for one checkpoint or
two to compare; written as a Markdown table, JSON and a PNG plot.
"""

import json
import logging
import os
from typing import Dict, Iterable, List, Optional, Sequence

import detectron2.data.transforms as T
import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model

from afigan.checkpoint import read_checkpoint
from afigan.config import load_config
from afigan.modeling.feature_enhancement import find_stage_root

from .features import stage_responses
from .filters import DEFAULT_CUT, stage_weight_stats, stage_weights_from_state_dict, white_noise_hf_share

__all__ = [
    "read_state_dict",
    "load_model",
    "load_images",
    "analyze_checkpoint",
    "verdicts",
    "format_table",
    "plot_report",
    "write_report",
]

logger = logging.getLogger(__name__)

COLUMNS = [  # (key, header, format)
    ("tensors", "conv tensors", "{:d}"),
    ("fro_sum", "Σ‖W‖_F", "{:.4g}"),
    ("var_sum", "ΣVar(W)", "{:.4g}"),
    ("kernels", "k×k kernels", "{:d}"),
    ("kernel_hf", "kernel HF share", "{:.4f}"),
    ("feat_hf", "feature HF share", "{:.4f}"),
    ("image_hf", "image HF share", "{:.4f}"),
    ("edge_gain", "edge gain", "{:.3f}"),
]


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Tensors of a checkpoint file without building a model (any file
    :func:`afigan.checkpoint.read_checkpoint` reads: ``.pth``, plain state dict, zoo ``.pkl``)."""
    return {k: v for k, v in read_checkpoint(path, "checkpoint")["model"].items() if isinstance(v, torch.Tensor)}


def load_model(config_file: str, checkpoint: str, opts: Sequence[str] = ()):
    """``(cfg, model)``: the config's detector (on the CPU unless ``opts`` set ``MODEL.DEVICE``)
    in eval mode with ``checkpoint`` loaded through Detectron2's checkpointer."""
    if "://" not in checkpoint and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"Checkpoint {checkpoint!r} does not exist.")
    cfg = load_config(config_file, opts, device="cpu")
    model = build_model(cfg)
    DetectionCheckpointer(model).load(checkpoint)
    return cfg, model.eval()


def load_images(
    paths: Iterable[str], cfg, model, short_edge: Optional[int] = None, max_images: int = 8
) -> List[torch.Tensor]:
    """Normalised (3, H, W) float tensors, as the model's bottom-up network sees them: read in
    ``cfg.INPUT.FORMAT``, shortest edge resized to ``short_edge`` (default ``INPUT.MIN_SIZE_TEST``,
    longest ≤ ``INPUT.MAX_SIZE_TEST``), minus pixel mean, over pixel std. Directories are listed."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += [
                os.path.join(p, f)
                for f in sorted(os.listdir(p))
                if f.lower().endswith((".jpg", ".jpeg", ".png", ".bmp"))
            ]
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"Image path {p!r} does not exist.")
    if not files:
        raise ValueError("No images (.jpg, .jpeg, .png, .bmp) were found for the feature-map measures.")
    short = short_edge or cfg.INPUT.MIN_SIZE_TEST
    resize = T.ResizeShortestEdge(short, max(cfg.INPUT.MAX_SIZE_TEST, short))
    device = torch.device(cfg.MODEL.DEVICE)
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN, device=device).view(-1, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD, device=device).view(-1, 1, 1)
    out = []
    for f in files[:max_images]:
        img = read_image(f, format=cfg.INPUT.FORMAT)
        img = resize.get_transform(img).apply_image(img)
        x = torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1)), dtype=torch.float32, device=device)
        out.append((x - mean) / std)
    return out


def analyze_checkpoint(
    checkpoint: str,
    config_file: Optional[str] = None,
    opts: Sequence[str] = (),
    images: Sequence[str] = (),
    stages: Optional[Sequence[str]] = None,
    cut: float = DEFAULT_CUT,
    short_edge: Optional[int] = None,
    max_images: int = 8,
    label: Optional[str] = None,
) -> Dict:
    """``{"label", "checkpoint", "stages": {stage: {column: value}}}`` for one checkpoint.

    Without ``config_file`` the weights are read from the file (names as in a Detectron2 ResNet);
    with it the checkpoint is loaded into the model (so any format Detectron2 reads works) and,
    given ``images``, the feature-map measures are added.
    """
    model = cfg = None
    if config_file:
        cfg, model = load_model(config_file, checkpoint, opts)
        state = model.state_dict()
    else:
        if images:
            raise ValueError("Feature-map measures need the model: pass the config file together with images.")
        state = read_state_dict(checkpoint)
    per_stage = stage_weights_from_state_dict(state, stages)
    result = {"label": label or os.path.basename(checkpoint), "checkpoint": checkpoint, "stages": {}}
    for stage, items in per_stage.items():
        result["stages"][stage] = stage_weight_stats([t for _, t in items], cut)
    if images:
        names = list(per_stage)
        path = find_stage_root(model.backbone, names)
        root = model.backbone.get_submodule(path) if path else model.backbone
        responses = stage_responses(root, names, load_images(images, cfg, model, short_edge, max_images), cut)
        for stage, values in responses.items():
            result["stages"][stage].update(values)
    return result


def _fmt(value, fmt: str) -> str:
    if value is None:
        return "—"
    return fmt.format(int(value)) if fmt == "{:d}" else fmt.format(value)


def format_table(results: Sequence[Dict]) -> str:
    """One Markdown row per (checkpoint, stage); feature columns only when some result has them."""
    cols = [c for c in COLUMNS if any(c[0] in s for r in results for s in r["stages"].values())]
    lines = ["| checkpoint | stage | " + " | ".join(h for _, h, _ in cols) + " |", "|---|---|" + "---:|" * len(cols)]
    for r in results:
        for stage, values in r["stages"].items():
            lines.append(f"| {r['label']} | {stage} | " + " | ".join(_fmt(values.get(k), f) for k, _, f in cols) + " |")
    return "\n".join(lines)


# A relative change of ΣVar, Σ‖W‖_F or edge gain at most this large is reported as no measurable
# change (two runs of one config and seed already differ by float reordering and data order).
MIN_RELATIVE_CHANGE = 0.01
# A kernel HF share change must exceed this many standard deviations of the measure over white-noise
# stages of the same shapes (filters.kernel_hf_noise).
NOISE_SIGMAS = 3.0


def _change(a, b, want: str, floor: Optional[float] = None) -> str:
    """``a -> b (direction, verdict)``; within ``floor`` (default MIN_RELATIVE_CHANGE * |a|) of
    each other the verdict is "no measurable change"."""
    if a is None or b is None:
        return "n/a"
    floor = MIN_RELATIVE_CHANGE * abs(a) if floor is None else floor
    if abs(b - a) <= floor:
        return f"{a:.4g} -> {b:.4g} (no measurable change: |Δ| = {abs(b - a):.2g} ≤ noise floor {floor:.2g})"
    went = "up" if b > a else "down"
    return f"{a:.4g} -> {b:.4g} ({went}{', as intended' if went == want else ', NOT as intended'})"


def verdicts(
    results: Sequence[Dict],
    sharp_stages: Sequence[str] = ("res3",),
    smooth_stages: Sequence[str] = ("res5",),
    cut: float = DEFAULT_CUT,
) -> List[str]:
    """Plain-language lines: with one result, is each sharp stage edge-like and each smooth stage
    blur-like (kernels vs white noise, features vs the image)? With two (baseline first), did the
    regulariser's targets and the claimed properties move the intended way from the first to the second?"""
    ref = white_noise_hf_share(cut)
    lines = []
    roles = [(s, "sharp") for s in sharp_stages] + [(s, "smooth") for s in smooth_stages]
    last = results[-1]["stages"]
    if len(results) == 1:
        for stage, role in roles:
            v = last.get(stage)
            if v is None:
                continue
            claim = "edge-like" if role == "sharp" else "blur-like"
            if v.get("kernel_hf") is not None:
                got = "edge-like" if v["kernel_hf"] > ref else "blur-like"
                lines.append(
                    f"{stage} kernels ({role} stage, claimed {claim}): HF share {v['kernel_hf']:.4f} vs white noise "
                    f"{ref:.4f} -> {got}{'' if got == claim else ' (claim not met)'}"
                )
            if v.get("edge_gain") is not None:
                got = "edge-like" if v["edge_gain"] > 1 else "blur-like"
                lines.append(
                    f"{stage} features: edge gain {v['edge_gain']:.3f} -> "
                    f"{got}{'' if got == claim else ' (claim not met)'}"
                )
        return lines
    first = results[0]["stages"]
    a_label, b_label = results[0]["label"], results[-1]["label"]
    lines.append(f"{a_label} -> {b_label}:")
    for stage, role in roles:
        a, b = first.get(stage), last.get(stage)
        if a is None or b is None:
            continue
        if role == "sharp":
            lines.append(f"  {stage} ΣVar(W) (sharp target): {_change(a['var_sum'], b['var_sum'], 'up')}")
        else:
            lines.append(f"  {stage} Σ‖W‖_F (smooth target): {_change(a['fro_sum'], b['fro_sum'], 'down')}")
        want = "up" if role == "sharp" else "down"
        noise = b.get("kernel_hf_noise")
        floor = NOISE_SIGMAS * noise if noise is not None else None
        lines.append(
            f"  {stage} kernel HF share (claimed {want}): "
            f"{_change(a.get('kernel_hf'), b.get('kernel_hf'), want, floor)}"
        )
        if a.get("edge_gain") is not None and b.get("edge_gain") is not None:
            lines.append(
                f"  {stage} feature edge gain (claimed {want}): {_change(a['edge_gain'], b['edge_gain'], want)}"
            )
    return lines


def plot_report(results: Sequence[Dict], path: str, cut: float = DEFAULT_CUT) -> str:
    """Four panels over stages, one bar per checkpoint: kernel HF share (white-noise line), ΣVar(W),
    Σ‖W‖_F, and feature edge gain (line at 1) when measured. Written as PNG with the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(dict.fromkeys(s for r in results for s in r["stages"]))
    x = np.arange(len(stages))
    width = 0.8 / len(results)
    panels = [
        ("kernel_hf", "kernel HF share", white_noise_hf_share(cut), False),
        ("var_sum", "ΣVar(W)  (sharp target)", None, True),
        ("fro_sum", "Σ‖W‖_F  (smooth target)", None, False),
        ("edge_gain", "feature edge gain", 1.0, False),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, title, line, log) in zip(axes.flat, panels):
        plotted = False
        for i, r in enumerate(results):
            vals = [r["stages"].get(s, {}).get(key) for s in stages]
            ys = [np.nan if v is None else v for v in vals]
            if all(v is None for v in vals):
                continue
            ax.bar(x + (i - (len(results) - 1) / 2) * width, ys, width, label=r["label"])
            plotted = True
        if line is not None and plotted:
            ax.axhline(line, color="k", linestyle="--", linewidth=1)
        if log and plotted:
            ax.set_yscale("log")
        if not plotted:
            ax.text(
                0.5,
                0.5,
                "not measured\n(needs --config-file and images)",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
        ax.set_title(title)
        ax.set_xticks(x)
        ax.set_xticklabels(stages)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Backbone filters by stage (HF: spectral energy above {cut} cycles/px)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(
    results: Sequence[Dict], output_dir: str, sharp_stages=("res3",), smooth_stages=("res5",), cut: float = DEFAULT_CUT
) -> Dict[str, str]:
    """Write ``filters.md`` (table + verdicts), ``filters.json`` and ``filters.png`` into
    ``output_dir``; returns their paths by kind ("md", "json", "png")."""
    os.makedirs(output_dir, exist_ok=True)
    lines = verdicts(results, sharp_stages, smooth_stages, cut)
    paths = {k: os.path.join(output_dir, f"filters.{k}") for k in ("md", "json", "png")}
    with open(paths["md"], "w") as f:
        f.write(format_table(results) + "\n\n")
        f.write(f"White-noise kernel HF share at cut {cut}: {white_noise_hf_share(cut):.4f}\n\n")
        f.write("\n".join(lines) + "\n")
    with open(paths["json"], "w") as f:
        json.dump(
            {
                "cut": cut,
                "white_noise_hf": white_noise_hf_share(cut),
                "sharp_stages": list(sharp_stages),
                "smooth_stages": list(smooth_stages),
                "results": list(results),
                "verdicts": lines,
            },
            f,
            indent=2,
        )
    plot_report(results, paths["png"], cut)
    return paths
