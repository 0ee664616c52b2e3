"""The figures of ``tools/visualize_features.py``.

* :func:`features_figure`: one row per model (label: config file, upsampler kind, weights), one
  column with the resized input and the Grad-CAM target box, then per neck level the
  channel-mean |feature| map (one colour scale per column, shared by the models, its maximum in
  the title) and the Grad-CAM map of :mod:`afigan.analysis.gradcam` (each normalised to its own
  maximum, over the grey image).
* :func:`interpolation_figure`: for a stage-1/2 checkpoint, per level (rows) the teacher's
  full-resolution features (stage 1's target), nearest / bilinear / learned (G, the config's
  ``MODEL.AFI.INTERP``: the AF interpolator by default) x2 of the teacher's half-resolution
  features, and the three |error| maps, with the L1 of each in its title (mean
  |x2(P_lr) - P_hr| over channels and pixels after cropping both to their common size: stage 1's
  content term before its weight). All maps are channel means; one colour scale per row for the
  features, one for the errors. A stage-2 checkpoint's interpolator is shown on stage 1's task
  (the teacher's pyramid), not inside the AF extractor's own neck.

Both are drawn with matplotlib's Agg canvas (no pyplot, no global backend) at a fixed size:
``CELL_PX`` pixels per cell plus ``TITLE_PX`` for the figure title (:func:`grid_size_px`).
"""

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import detectron2.data.transforms as T
import numpy as np
import torch
from detectron2.modeling import build_model
from detectron2.modeling.backbone.fpn import FPN
from torch import nn
from torch.nn import functional as F

from afigan.checkpoint import AFICheckpointer
from afigan.config import load_config
from afigan.data.image_io import read_image_or_raise
from afigan.layers import crop_to_common, is_guided
from afigan.modeling.interpolator import finer_level, load_interpolator
from afigan.modeling.meta_arch import build_guide_model

from .gradcam import GradCAM, grad_cam, quiet_inference

__all__ = [
    "CELL_PX",
    "TITLE_PX",
    "DPI",
    "grid_size_px",
    "ModelRow",
    "load_detector",
    "upsampler_label",
    "resized_image",
    "features_figure",
    "model_rows",
    "visualize_features",
    "interpolation_maps",
    "interpolation_figure",
    "visualize_interpolation",
]

DPI = 100
CELL_PX = 160
TITLE_PX = 70
INTERP_COLUMNS = ("nearest", "bilinear", "learned")


def grid_size_px(rows: int, columns: int) -> Tuple[int, int]:
    """(width, height) in pixels of a figure with ``rows`` x ``columns`` cells."""
    return columns * CELL_PX, rows * CELL_PX + TITLE_PX


@dataclass
class ModelRow:
    """One row of the features figure: its label, the image it saw (RGB uint8) and its Grad-CAM."""

    label: str
    image: np.ndarray
    cam: GradCAM


def upsampler_label(cfg, model) -> str:
    """``MODEL.AFI.INTERP`` of an afigan neck, ``"nearest (Detectron2 FPN)"`` for Detectron2's own
    FPN, else the backbone builder's name."""
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    if names & {"srf_module", "srf_modules"}:
        return cfg.MODEL.AFI.INTERP
    if type(model.backbone) is FPN:
        return "nearest (Detectron2 FPN)"
    return cfg.MODEL.BACKBONE.NAME


def load_detector(config_file: str, weights: str, opts: Sequence[str] = ()):
    """``(cfg, model, label)``: the config's detector (on the CPU unless ``opts`` say otherwise)
    in eval mode with ``weights`` loaded; ``weights == ""`` keeps the random initialisation (and
    loads neither ``MODEL.WEIGHTS`` nor ``MODEL.AF_EXTRACTOR_WEIGHTS``)."""
    cfg = load_config(config_file, opts, device="cpu")
    with quiet_inference():
        model = build_model(cfg)
    if weights:
        AFICheckpointer(model).load(weights)
    label = f"{os.path.basename(config_file)} · {upsampler_label(cfg, model)}\n{weights or 'random init'}"
    return cfg, model.eval(), label


def resized_image(cfg, path: str) -> Tuple[torch.Tensor, np.ndarray]:
    """``(model input, RGB uint8)``: the image read in ``INPUT.FORMAT`` and resized like
    Detectron2's ``DefaultPredictor`` (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``)."""
    img = read_image_or_raise(path, cfg.INPUT.FORMAT)
    short = cfg.INPUT.MIN_SIZE_TEST
    img = T.ResizeShortestEdge([short, short], cfg.INPUT.MAX_SIZE_TEST).get_transform(img).apply_image(img)
    rgb = img[:, :, ::-1] if cfg.INPUT.FORMAT == "BGR" else img
    rgb = np.repeat(rgb, 3, axis=2) if rgb.shape[2] == 1 else rgb
    return torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1)).astype("float32")), np.ascontiguousarray(rgb)


def _figure(rows: int, columns: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = grid_size_px(rows, columns)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    top = 1 - TITLE_PX / height
    axes = fig.subplots(
        rows,
        columns,
        squeeze=False,
        gridspec_kw=dict(left=0.005, right=0.995, bottom=0.01, top=top, wspace=0.06, hspace=0.35),
    )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def _grey(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float32).mean(axis=2) / 255.0


def _blank(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=6, transform=ax.transAxes, wrap=True)
    ax.set_facecolor("#eeeeee")


def features_figure(rows: Sequence[ModelRow], output: str, title: str = "") -> str:
    """Write the features figure of ``rows`` (see the module docstring) to ``output`` (PNG)."""
    levels = list(dict.fromkeys(l for r in rows for l in r.cam.features))
    levels.sort(key=lambda l: min(r.cam.strides[l] for r in rows if l in r.cam.strides))
    fig, axes = _figure(len(rows), 1 + 2 * len(levels))
    vmax = {l: max(float(r.cam.features[l].abs().mean(0).max()) for r in rows if l in r.cam.features) for l in levels}
    for i, row in enumerate(rows):
        cam = row.cam
        ax = axes[i, 0]
        ax.imshow(row.image)
        x0, y0, x1, y1 = cam.target.box
        ax.add_patch(_rectangle(x0, y0, x1, y1))
        what = "top detection" if cam.target.detected else "NO DETECTION; best"
        ax.set_title(f"{row.label}\n{what}: class {cam.target.cls}, {cam.target.score:.2f}", fontsize=5)
        h, w = cam.image_size
        for j, level in enumerate(levels):
            ax_f, ax_c = axes[i, 1 + 2 * j], axes[i, 2 + 2 * j]
            if level not in cam.features:
                _blank(ax_f, f"no {level}")
                _blank(ax_c, f"no {level}")
                continue
            fmap = cam.features[level].abs().mean(0).numpy()
            s = cam.strides[level]
            extent = (0, fmap.shape[1] * s, fmap.shape[0] * s, 0)
            ax_f.imshow(fmap, cmap="viridis", vmin=0, vmax=vmax[level] or 1.0, interpolation="nearest", extent=extent)
            ax_f.set_title(f"{level} mean|F| (col. max {vmax[level]:.3g})", fontsize=6)
            c = cam.cams[level]
            if c is None:
                _blank(ax_c, f"Grad-CAM {level}:\n{cam.notes.get(level, 'not computed')}")
                continue
            peak = float(c.max())
            ax_c.imshow(_grey(row.image), cmap="gray", extent=(0, w, h, 0))
            ax_c.imshow(
                (c / peak if peak > 0 else c).numpy(),
                cmap="jet",
                alpha=0.5,
                vmin=0,
                vmax=1,
                interpolation="bilinear",
                extent=extent,
            )
            ax_c.set_xlim(0, w)
            ax_c.set_ylim(h, 0)
            mark = " (pooled here)" if cam.assigned == level else ""
            ax_c.set_title(f"Grad-CAM {level}{mark} max {peak:.3g}", fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.savefig(output, dpi=DPI)
    return output


def _rectangle(x0, y0, x1, y1):
    from matplotlib.patches import Rectangle

    return Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="red", linewidth=1)


def model_rows(
    image_path: str, models: Sequence[Tuple[str, str]], opts: Sequence[str] = (), levels: Optional[Sequence[str]] = None
) -> List[ModelRow]:
    """One :class:`ModelRow` per ``(config, weights)`` pair (weights ``""``: random init)."""
    rows = []
    for config_file, weights in models:
        cfg, model, label = load_detector(config_file, weights, opts)
        image, rgb = resized_image(cfg, image_path)
        rows.append(ModelRow(label, rgb, grad_cam(model, image, levels)))
    return rows


def features_title(rows: Sequence[ModelRow], image_path: str) -> str:
    """The figure title: the image, what is shown, what the Grad-CAM score is, and which rows had
    no detection."""
    heads = sorted({r.cam.head for r in rows})
    score = {
        "two-stage": "box-head logit of the top detection's class for its box pooled from each level",
        "one-stage": "dense-head logit of the top detection's class at its centre on each level",
    }
    text = f"{os.path.basename(image_path)}: channel-mean |feature| and Grad-CAM per neck level; score = " + "; ".join(
        f"{h}: {score[h]}" for h in heads
    )
    missing = [str(i + 1) for i, r in enumerate(rows) if not r.cam.target.detected]
    if missing:
        text += (
            f"\nrow {', '.join(missing)}: NO DETECTION, "
            "the target is the highest class score over all proposals/locations"
        )
    return text


def visualize_features(
    image_path: str,
    output: str,
    models: Sequence[Tuple[str, str]],
    opts: Sequence[str] = (),
    levels: Optional[Sequence[str]] = None,
) -> str:
    """``tools/visualize_features.py --model ...``: :func:`model_rows` drawn by :func:`features_figure`."""
    if len(models) < 2:
        raise ValueError("Give two or more --model CONFIG WEIGHTS pairs to compare.")
    rows = model_rows(image_path, models, opts, levels)
    _makedirs_for(output)
    return features_figure(rows, output, features_title(rows, image_path))


def _makedirs_for(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)


def _learned_x2(g: nn.Module, level: str, x: torch.Tensor, half: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
    """G's x2 of ``x`` (level ``level`` of the half-size pyramid ``half``), called as stage 1 calls
    it: a guided upsampler (FADE) gets the half-size pyramid's finer level as guide and output
    size, so the coarsest-but-one level has no result (None) when that finer level is missing."""
    up = g[level] if isinstance(g, nn.ModuleDict) else g
    if not is_guided(up):
        return up(x)
    finer = finer_level(level)
    if finer not in half:
        return None
    return up(x, output_size=half[finer].shape[-2:], guide=half[finer])


def interpolation_maps(cfg, weights: str, image_path: str) -> Dict[str, Dict[str, torch.Tensor]]:
    """Per level of ``MODEL.AFI.LEVELS``: ``{"target": P_hr, "nearest", "bilinear", "learned": x2 of
    P_lr}`` (each (C, h, w), cropped to common sizes; "learned" is missing where a guided G has no
    guide) for the teacher (``MODEL.GUIDE_WEIGHTS``) on the resized image and on its
    ``MODEL.AFI.SCALE_RATIO`` twin (made as stage 1's mapper makes it), G from :func:`load_interpolator`."""
    teacher = build_guide_model(cfg)  # a detector file: its heads go unused, as in stage 1
    g = load_interpolator(cfg, weights)
    image, _ = resized_image(cfg, image_path)
    hwc = image.permute(1, 2, 0).numpy().astype(np.uint8)
    h, w = hwc.shape[:2]
    r = cfg.MODEL.AFI.SCALE_RATIO
    low = T.ResizeTransform(h, w, int(h * r), int(w * r)).apply_image(hwc)
    low = torch.as_tensor(np.ascontiguousarray(low.transpose(2, 0, 1)).astype("float32"))
    out = {}
    with torch.no_grad(), quiet_inference():
        real = teacher([{"image": image}])
        half = teacher([{"image": low}])
        for level in cfg.MODEL.AFI.LEVELS:
            if level not in real:
                raise ValueError(f"MODEL.AFI.LEVELS names {level!r}, but the teacher returns only {sorted(real)}.")
            x = half[level]
            preds = {
                "nearest": F.interpolate(x, scale_factor=2.0, mode="nearest"),
                "bilinear": F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False),
                "learned": _learned_x2(g, level, x, half),
            }
            maps = {}
            for name, p in preds.items():
                if p is not None:
                    p, t = crop_to_common(p, real[level])
                    maps[name], maps["target"] = p[0].cpu(), t[0].cpu()
            out[level] = maps
    return out


def interpolation_figure(
    maps: Dict[str, Dict[str, torch.Tensor]], output: str, title: str = "", learned: str = "afi"
) -> str:
    """Write the interpolation figure (see the module docstring) of :func:`interpolation_maps`;
    ``learned`` names G's kind in the column titles."""
    columns = ["target"] + list(INTERP_COLUMNS) + [f"|err| {k}" for k in INTERP_COLUMNS]
    fig, axes = _figure(len(maps), len(columns))
    names = {
        "target": "teacher full-res",
        "nearest": "nearest",
        "bilinear": "bilinear",
        "learned": "AFI" if learned == "afi" else learned,
    }
    for i, (level, m) in enumerate(maps.items()):
        target = m["target"]
        shown = [k for k in INTERP_COLUMNS if k in m]
        means = {k: m[k].abs().mean(0) for k in ["target"] + shown}
        errors = {k: (m[k] - target).abs() for k in shown}
        l1 = {k: float(e.mean()) for k, e in errors.items()}
        fmax = max(float(v.max()) for v in means.values()) or 1.0
        emax = max(float(e.mean(0).max()) for e in errors.values()) or 1.0
        for j, col in enumerate(columns):
            ax = axes[i, j]
            k = col[len("|err| ") :] if col.startswith("|err| ") else col
            if k not in m:
                _blank(ax, f"{level}: no finer level\nto guide {names[k]}")
            elif col.startswith("|err| "):
                ax.imshow(errors[k].mean(0).numpy(), cmap="magma", vmin=0, vmax=emax, interpolation="nearest")
                ax.set_title(f"{level} |{names[k]} x2 - target|\nL1 {l1[k]:.4g}", fontsize=6)
            elif k == "target":
                ax.imshow(means[k].numpy(), cmap="viridis", vmin=0, vmax=fmax, interpolation="nearest")
                ax.set_title(f"{level} {names[k]} (target)\nrow max {fmax:.3g}", fontsize=6)
            else:
                ax.imshow(means[k].numpy(), cmap="viridis", vmin=0, vmax=fmax, interpolation="nearest")
                ax.set_title(f"{level} {names[k]} x2 of half-res\nL1 {l1[k]:.4g}", fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.savefig(output, dpi=DPI)
    return output


def visualize_interpolation(
    image_path: str, output: str, config_file: str, weights: str, opts: Sequence[str] = ()
) -> str:
    """``tools/visualize_features.py --interpolation CONFIG WEIGHTS``."""
    cfg = load_config(config_file, opts, device="cpu")
    maps = interpolation_maps(cfg, weights, image_path)
    title = (
        f"{os.path.basename(image_path)}: channel-mean |teacher features| and x2 interpolations of the half-size "
        f"image's features, |error| maps (L1 = stage 1's content term)\nG: {weights or 'random init'} "
        f"({os.path.basename(config_file)}); teacher: {cfg.MODEL.GUIDE_WEIGHTS}"
    )
    _makedirs_for(output)
    return interpolation_figure(maps, output, title, cfg.MODEL.AFI.INTERP)
