"""Training curves of a run (``tools/plot_metrics.py`` and the end of the pipeline).

Every trainer writes Detectron2's ``metrics.json`` (one JSON object per line, with an
``iteration``) into its OUTPUT_DIR: the pipeline (:mod:`afigan.engine.pipeline`) gives each stage
``OUTPUT/stageN``, so a pipeline folder holds one per stage, a single stage folder one of its own.
:func:`plot_metrics` draws one panel per such file: every ``*loss*`` key (log scale when all its
values are positive), the learning rates (``lr``, ``lr_G``, ``lr_D``, ``lr_M``) on a twin axis and
the COCO ``bbox/AP`` / ``segm/AP`` points of the evaluations.

Pure Python until a plot is drawn; matplotlib is imported then (Agg, no display needed).
"""

import json
import os
import re
from typing import Dict, List, Tuple

__all__ = ["find_metrics", "read_metrics", "plot_metrics", "AP_KEYS"]

AP_KEYS = ("bbox/AP", "segm/AP")
_LR = re.compile(r"^lr(_\w+)?$")


def find_metrics(output_dir: str) -> List[Tuple[str, str]]:
    """``[(panel name, metrics.json path)]``: ``output_dir``'s own file, then those of its
    immediate sub-folders (the pipeline's stage folders) in name order. FileNotFoundError with
    one sentence when there is none."""
    if not os.path.isdir(output_dir):
        raise FileNotFoundError(f"{output_dir!r} is not a folder.")
    found = []
    own = os.path.join(output_dir, "metrics.json")
    if os.path.isfile(own):
        found.append((os.path.basename(os.path.normpath(output_dir)), own))
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name, "metrics.json")
        if os.path.isfile(path):
            found.append((name, path))
    if not found:
        raise FileNotFoundError(
            f"No metrics.json in {output_dir!r} or its sub-folders: nothing to plot "
            f"(give a stage's OUTPUT_DIR or a pipeline's --output-dir after training)."
        )
    return found


def read_metrics(path: str) -> List[Dict]:
    """The records of one metrics.json, by iteration. A resumed run appends the iterations after
    its checkpoint again (Detectron2's JSONWriter opens the file for appending); for a repeated
    iteration the keys of the later record win. Lines that are not JSON objects (a run killed
    mid-write) are skipped."""
    by_iter: Dict[int, Dict] = {}
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("iteration"), int):
                by_iter.setdefault(rec["iteration"], {}).update(rec)
    return [by_iter[i] for i in sorted(by_iter)]


def _series(records: List[Dict], key: str) -> Tuple[List[int], List[float]]:
    pts = [(r["iteration"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _keys(records: List[Dict]):
    keys = sorted({k for r in records for k in r})
    losses = [k for k in keys if "loss" in k]
    lrs = [k for k in keys if _LR.match(k)]
    aps = [k for k in AP_KEYS if k in keys]
    return losses, lrs, aps


def plot_metrics(output_dir: str, output: str = "") -> str:
    """Write the plot of every metrics.json under ``output_dir`` (see :func:`find_metrics`) to
    ``output`` (default ``output_dir/metrics.png``) and return its path. ImportError when
    matplotlib is not installed."""
    import matplotlib  # only here: reading and finding metrics needs no plotting library

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, read_metrics(path)) for name, path in find_metrics(output_dir)]
    output = output or os.path.join(output_dir, "metrics.png")
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, 3.8 * len(panels)), squeeze=False)
    for ax, (name, records) in zip(axes[:, 0], panels):
        _panel(ax, name, records)
    # The right quarter holds the learning-rate and AP axes and the legends.
    fig.subplots_adjust(
        left=0.06, right=0.7, top=1 - 0.4 / (3.8 * len(panels)), bottom=0.5 / (3.8 * len(panels)), hspace=0.45
    )
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def _panel(ax, name: str, records: List[Dict]) -> None:
    losses, lrs, aps = _keys(records)
    last = records[-1]["iteration"] if records else 0
    ax.set_title(f"{name} ({len(records)} logged iterations, last {last})")
    ax.set_xlabel("iteration")
    positive = True
    for key in losses:
        x, y = _series(records, key)
        positive = positive and all(v > 0 for v in y)
        # The totals are what to read first; the per-term / per-level losses are thinner.
        ax.plot(x, y, label=key, linewidth=1.6 if "total" in key else 0.8)
    if losses:
        ax.set_ylabel("loss" + (" (log)" if positive else ""))
        if positive:
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no loss logged", transform=ax.transAxes, ha="center")
    handles, labels = ax.get_legend_handles_labels()
    if lrs:
        ax_lr = ax.twinx()
        for key in lrs:
            x, y = _series(records, key)
            ax_lr.plot(x, y, "--", color="black" if key == "lr" else None, linewidth=1.0, label=key)
        ax_lr.set_ylabel("learning rate")
        h, l = ax_lr.get_legend_handles_labels()
        handles, labels = handles + h, labels + l
    if aps:
        ax_ap = ax.twinx()
        ax_ap.spines["right"].set_position(("axes", 1.1))  # beside the learning-rate axis
        top = 0.0
        for key, marker in zip(aps, "os"):
            x, y = _series(records, key)
            ax_ap.plot(x, y, marker, linestyle="none", markersize=6, label=key)
            for xi, yi in zip(x, y):
                ax_ap.annotate(
                    f"{yi:.1f}", (xi, yi), textcoords="offset points", xytext=(-4, 6), ha="right", fontsize=7
                )
            top = max([top] + y)
        ax_ap.set_ylim(0, max(1.0, top * 1.25))  # from 0, so one evaluation is not a point at mid-height
        ax_ap.set_ylabel("COCO AP")
        h, l = ax_ap.get_legend_handles_labels()
        handles, labels = handles + h, labels + l
    if handles:
        ax.legend(
            handles,
            labels,
            fontsize=6,
            ncol=max(1, (len(labels) + 17) // 18),
            loc="upper left",
            bbox_to_anchor=(1.2, 1.0),
            borderaxespad=0.0,
        )
