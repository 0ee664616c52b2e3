"""study.md's sections of the parts "curves" and "probe", and fidelity_curves.png."""

import math
from typing import Dict, List

from afigan.io import atomic_write

from .stats import mean_over_levels

__all__ = ["format_curves", "format_probe", "plot_curves"]

METRICS = (
    ("l1", "L1 (lower is better)"),
    ("psnr", "PSNR dB (higher is better)"),
    ("hf_l1", "high-frequency L1 (lower is better)"),
    ("hf_ratio", "high-frequency energy / target's (1 = as sharp)"),
)


def _f(v, spec: str) -> str:
    if isinstance(v, str):  # study.json's "inf" and "nan"
        v = float(v)
    if v is None or math.isnan(v):
        return "–"
    return "∞" if math.isinf(v) else format(v, spec)


def _verdict(c: Dict) -> str:
    if c.get("converged") is None:
        return "not judged (too few evaluations)"
    word = "converged" if c["converged"] else "NOT converged"
    return f"{word} ({100 * c['improvement']:+.2f} % L1 from iteration {c['from']} to {c['to']})"


def _cells(scores: Dict, levels: List[str]) -> List[str]:
    out = []
    for l in levels:
        m = scores.get(l)
        out.append(
            "–"
            if m is None
            else " / ".join(
                _f(m[k], s) for k, s in (("l1", ".4f"), ("psnr", ".2f"), ("hf_l1", ".4f"), ("hf_ratio", ".3f"))
            )
        )
    return out


def format_curves(c: Dict) -> List[str]:
    """The "Fidelity curves" section of study.md."""
    if not c or not c.get("arms"):
        return []
    levels, ref = c["levels"], c["reference"]
    lines = [
        f"## Fidelity curves (stage 1 alone, {c['iters']} iterations, {c['precision']})",
        "",
        f"Each arm: stage 1 of its kind's chain against the study's teacher, the YAML's schedule compressed to "
        f"{c['iters']} iterations, G evaluated every {c['period']} iterations on the teacher features of "
        f"{c['images']} held-out images of {c['dataset']} (float32). Converged: the L1 (mean over the arm's "
        f"levels) improved by less than {100 * c['converged_below']:.1f} % over the last third of the run. "
        + (
            f"Second seed: {c['second_seed_rule']} ({c['second_seed_kind'] or 'none'})."
            if c["second_seed_rule"]
            else ""
        ),
        "",
        "| arm | L1 vs bilinear | PSNR vs bilinear | HF L1 vs bilinear | HF energy ratio | verdict | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    if ref:
        for name in ("nearest", "bilinear"):
            lines.append(
                f"| {name} | {100 * (mean_over_levels(ref[name], 'l1', ref['bilinear']) - 1):+.2f} % | "
                f"{_psnr_gain(ref[name], ref['bilinear']):+.3f} dB | "
                f"{100 * (mean_over_levels(ref[name], 'hf_l1', ref['bilinear']) - 1):+.2f} % | "
                f"{mean_over_levels(ref[name], 'hf_ratio'):.3f} | – | – |"
            )
    for name, a in c["arms"].items():
        if not a["points"] or not ref:
            lines.append(f"| {a['label']} | – | – | – | – | not evaluated | {_f(a['train_wall_s'], '.0f')} |")
            continue
        s = a["points"][-1]["scores"]
        sub = {l: ref["bilinear"][l] for l in s}
        lines.append(
            f"| {a['label']} | {100 * (mean_over_levels(s, 'l1', sub) - 1):+.2f} % | {_psnr_gain(s, sub):+.3f} dB | "
            f"{100 * (mean_over_levels(s, 'hf_l1', sub) - 1):+.2f} % | {mean_over_levels(s, 'hf_ratio'):.3f} | "
            f"{_verdict(a['convergence'])} | {_f(a['train_wall_s'], '.0f')} |"
        )
    lines += [
        "",
        "Means over the levels each arm predicts (a guided kind: p3-p6). Per level at the end, "
        "L1 / PSNR / HF L1 / HF energy ratio:",
        "",
        "| arm | " + " | ".join(levels) + " |",
        "|---|" + "---|" * len(levels),
    ]
    for name in ("nearest", "bilinear"):
        if ref:
            lines.append(f"| {name} | " + " | ".join(_cells(ref[name], levels)) + " |")
    for a in c["arms"].values():
        if a["points"]:
            lines.append(f"| {a['label']} | " + " | ".join(_cells(a["points"][-1]["scores"], levels)) + " |")
    return lines + [""]


def _psnr_gain(s: Dict, ref: Dict) -> float:
    vals = [float(m["psnr"]) - float(ref[l]["psnr"]) for l, m in s.items() if math.isfinite(float(m["psnr"]))]
    return sum(vals) / len(vals) if vals else math.nan


def format_probe(p: Dict) -> List[str]:
    """The "Detection probe" section of study.md."""
    if not p or not p.get("scores"):
        return []
    lines = [
        f"## Detection probe (the teacher's own heads on {p['images']} images of {p['dataset']})",
        "",
        "COCO AP of the frozen stage-0 detector's RPN and heads on: `full` its own full-resolution pyramid; "
        "`nearest`, `bilinear` and each G: the half-size image's pyramid upsampled x2, fitted to the full "
        "sizes; `half` the half-size image's own pyramid, boxes rescaled. Δ = arm − bilinear on the same images, "
        f"with the 95 % percentile interval of a paired bootstrap over the images ({p['resamples']} resamples, "
        f"seed {p['seed']}, per-image matching computed once); resolved = the interval excludes 0. "
        "Δ vs afi: the same against AFI's G (first seed), on the same resamples; * = resolved.",
        "",
        "| arm | bbox AP | Δ bbox [95 % CI] | bbox | segm AP | Δ segm [95 % CI] | segm | G converged "
        "| Δ bbox vs afi | Δ segm vs afi |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    b, s = p["scores"]["bbox"], p["scores"]["segm"]
    for name in p["arms"]:
        conv = p.get("converged", {}).get(name)
        label = p["labels"].get(name, name)
        lines.append(
            f"| {label} | {b[name]['ap']:.2f} | {_delta(b[name])} | {_resolved(b[name], name, p)} "
            f"| {s[name]['ap']:.2f} | {_delta(s[name])} | {_resolved(s[name], name, p)} | "
            f"{'–' if conv is None else ('yes' if conv else 'no')} | {_versus_afi(b[name], name)} "
            f"| {_versus_afi(s[name], name)} |"
        )
    if p.get("fallback"):
        lines += [
            "",
            "Levels upsampled bilinearly because the arm has no guide for them: "
            + "; ".join(f"{n}: {', '.join(l)}" for n, l in p["fallback"].items())
            + ".",
        ]
    return lines + [""]


def _delta(e: Dict) -> str:
    return f"{e['diff']:+.2f} [{e['ci'][0]:+.2f}, {e['ci'][1]:+.2f}]"


def _versus_afi(e: Dict, name: str) -> str:
    v = e.get("vs_afi")
    if v is None or name == "afi":
        return "–"
    return _delta(v) + (" *" if v["resolved"] else "")


def _resolved(e: Dict, name: str, p: Dict) -> str:
    if name == p["reference"]:
        return "reference"
    return "resolved" if e["resolved"] else "not resolved"


def plot_curves(c: Dict, path: str) -> str:
    """fidelity_curves.png: one row per metric, one column per level; x = iterations; one line per
    arm, nearest (dotted) and bilinear (dashed) as horizontal lines."""
    import matplotlib  # only when drawing

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels, ref = c["levels"], c["reference"]
    fig, axes = plt.subplots(
        len(METRICS), len(levels), figsize=(3.3 * len(levels), 2.5 * len(METRICS) + 1.4), squeeze=False
    )
    colours = plt.get_cmap("tab10")  # distinct hues; second seeds are dashed
    names = list(c["arms"])
    for i, (metric, title) in enumerate(METRICS):
        for j, l in enumerate(levels):
            ax = axes[i, j]
            for k, name in enumerate(names):
                pts = [
                    (p["iteration"], float(p["scores"][l][metric]))
                    for p in c["arms"][name]["points"]
                    if l in p["scores"]
                ]
                if pts:
                    style = "--" if c["arms"][name]["seed"] else "-"
                    ax.plot(*zip(*pts), style, color=colours(k % 10), marker=".", markersize=3, linewidth=1)
            for name, style in (("nearest", ":"), ("bilinear", "--")):
                if ref and l in ref.get(name, {}):
                    ax.axhline(float(ref[name][l][metric]), color="black", linestyle=style, linewidth=0.9)
            ax.set_title(f"{l}: {title}", fontsize=7)
            ax.tick_params(labelsize=6)
            if i == len(METRICS) - 1:
                ax.set_xlabel("iteration", fontsize=7)
    handles = [
        plt.Line2D([], [], color=colours(k % 10), linestyle="--" if c["arms"][n]["seed"] else "-")
        for k, n in enumerate(names)
    ]
    handles += [plt.Line2D([], [], color="black", linestyle=s) for s in (":", "--")]
    labels = [c["arms"][n]["label"] for n in names] + ["nearest", "bilinear"]
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=7)
    fig.suptitle(
        f"x2 of the teacher's half-resolution features vs its full-resolution features during stage 1 "
        f"({c['dataset']}, {c['images']} images)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path
