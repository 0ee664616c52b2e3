"""The study's outputs: study.json (every run and every number), study.md (how it was run, then the
curves, probe, fidelity, ablation and detection tables) and the charts fidelity_curves.png,
fidelity.png and detection.png. A part not run by this invocation keeps its section from the
study.json already there."""

import dataclasses
import json
import math
import os
import platform
from typing import Dict, List, Sequence

import torch

from afigan.io import atomic_write, atomic_write_json

from .report_evidence import format_curves, format_probe, plot_curves
from .settings import ABLATION_RUN, ABLATIONS, ARMS, PARTS, REFERENCE_ARM, StudySettings
from .stats import seed_noise, summarize

__all__ = ["write_json", "format_markdown", "plot_fidelity", "plot_detection", "write_outputs"]


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # "inf", "nan": JSON has no such numbers
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_json(path: str, obj) -> str:
    """``obj`` as JSON into ``path``, atomically; inf and nan become the strings "inf" and "nan"."""
    return atomic_write_json(path, _json_safe(obj), indent=2)


def _pm(ms: Dict) -> str:
    if ms.get("mean") is None:
        return "–"
    return f"{ms['mean']:.2f}" + (f" ± {ms['std']:.2f}" if ms.get("std") is not None else "")


def _fmt(v, spec: str) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    return "∞" if math.isinf(v) else format(v, spec)


def format_markdown(study: Dict) -> str:
    """study.md: how it was run, then the fidelity, ablation and detection tables."""
    lines = [
        "# AFI-GAN study",
        "",
        f"Command: `{study['command']}`  ",
        f"Machine: {study['machine']}; torch {study['torch']}; "
        f"load average {study['load_average_1min']:.2f} at the end; wall time of this invocation "
        f"{study['wall_s'] / 60:.1f} min (sum of all runs' own wall times {study['runs_wall_s'] / 60:.1f} min).",
        "",
    ]
    s = study["settings"]
    lines += format_curves(study.get("curves") or {})
    lines += format_probe(study.get("probe") or {})
    lines += [
        f"Detection study settings (parts run by this invocation: {', '.join(s.get('parts', PARTS))}): "
        f"kinds {', '.join(s['kinds'])}; seeds {', '.join(map(str, s['seeds']))} (stage 3 only; one "
        f"teacher and one stage-1/2 chain per learned kind serve all seeds); ablations "
        f"{', '.join(s['ablations']) or 'none'}; "
        f"SOLVER.MAX_ITER stage 0/1/2/3 = {'/'.join(str(i or 'YAML') for i in s['max_iter'])}; data "
        f"{s['dataset_train']} -> {s['dataset_test']}.",
        "",
    ]
    fid = study.get("fidelity") or {}
    if fid:
        lines += [
            f"## Interpolation fidelity (teacher features of {fid['dataset']})",
            "",
            "x2 of the teacher's half-resolution level vs its full-resolution level; L1 and relative L2 "
            "(lower is better), PSNR over the level's feature range in dB (higher is better).",
            "",
        ]
        names = list(fid["scores"])
        lines += [
            "| interpolator | " + " | ".join(f"{l} L1 / relL2 / PSNR" for l in fid["levels"]) + " |",
            "|---|" + "---|" * len(fid["levels"]),
        ]
        for n in names:
            cells = []
            for l in fid["levels"]:
                m = fid["scores"][n].get(l)
                cells.append(
                    "–"
                    if m is None
                    else f"{_fmt(m['l1'], '.4f')} / {_fmt(m['rel_l2'], '.3f')} / {_fmt(m['psnr'], '.2f')}"
                )
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    if study.get("content_loss"):
        lines += [
            "## Ablations after stage 1 (AFI)",
            "",
            "| stage-1 run | content loss (sum over levels, last logged) | p2 L1 | mean rel. L2 over levels |",
            "|---|---|---|---|",
        ]
        label = {
            "afi": "afi (adversarial gradient to G, shared)",
            ABLATION_RUN["adv"]: "adversarial term detached (ADV_GRAD_TO_G False)",
            ABLATION_RUN["shared"]: "one interpolator per level (SHARED False)",
        }
        fid_name = {
            "afi": "afi G (stage 1)",
            ABLATION_RUN["adv"]: f"afi G, {ABLATIONS['adv'][1]}",
            ABLATION_RUN["shared"]: f"afi G, {ABLATIONS['shared'][1]}",
        }
        for name, c in study["content_loss"].items():
            sc = (fid.get("scores") or {}).get(fid_name.get(name, ""), {})
            rel = [m["rel_l2"] for m in sc.values()]
            lines.append(
                f"| {label.get(name, name)} | {_fmt(c and c['total'], '.4f')} | "
                f"{_fmt(sc.get('p2', {}).get('l1'), '.4f')} | "
                f"{_fmt(sum(rel) / len(rel) if rel else None, '.3f')} |"
            )
        lines.append("")
    summary = study.get("summary") or {}
    if summary:
        t = study.get("teacher") or {}
        lines += [
            "## Detection (stage 3, COCO AP on " + s["dataset_test"] + ")",
            "",
            f"Mean ± sample std over seeds; the stage-0 teacher (nearest FPN, same detector) reached bbox AP "
            f"{_fmt(t.get('bbox/AP'), '.2f')} / segm AP {_fmt(t.get('segm/AP'), '.2f')}.",
            "",
            "| arm | seeds | bbox AP | segm AP | bbox APs | segm APs | bbox AP per seed |",
            "|---|---|---|---|---|---|---|",
        ]
        for arm, e in summary.items():
            per = ", ".join(f"{e['bbox']['per_seed'][k]:.2f}" for k in sorted(e["bbox"]["per_seed"]))
            lines.append(
                f"| {ARMS[arm].label} | {e['bbox']['AP']['n']} | {_pm(e['bbox']['AP'])} | {_pm(e['segm']['AP'])} | "
                f"{_pm(e['bbox']['APs'])} | {_pm(e['segm']['APs'])} | {per} |"
            )
        noise = study.get("noise") or {}
        if noise.get("bbox") is not None:
            lines += [
                "",
                f"Seed noise (pooled std over seeds of one arm): bbox AP {noise['bbox']:.2f}, segm AP "
                f"{_fmt(noise.get('segm'), '.2f')}.",
            ]
        img = study.get("image_noise") or {}
        if img.get("bbox"):
            lines += [
                "",
                f"Image-sampling noise: the {REFERENCE_ARM} seed-{s['seeds'][0]} model on {img['parts']} "
                f"disjoint, interleaved parts of the test images: bbox AP "
                f"{', '.join(f'{v:.2f}' for v in img['bbox'])}; segm AP "
                f"{', '.join(f'{v:.2f}' for v in img['segm'])}.",
            ]
        if REFERENCE_ARM in summary and len(summary) > 1:
            lines += [
                "",
                f"Paired by seed, arm − {REFERENCE_ARM} (mean ± std of the per-seed differences; wins = "
                f"seeds where the arm is higher):",
                "",
                "| arm | Δ bbox AP | wins | Δ segm AP | wins | per-seed Δ bbox |",
                "|---|---|---|---|---|---|",
            ]
            for arm, e in summary.items():
                if arm == REFERENCE_ARM:
                    continue
                b, g = e["bbox"]["vs_" + REFERENCE_ARM], e["segm"]["vs_" + REFERENCE_ARM]
                per = ", ".join(f"{v:+.2f}" for _, v in sorted(b["diffs"].items()))
                lines.append(
                    f"| {ARMS[arm].label} | {_pm(b)} | {b['wins']}/{b['n']} | {_pm(g)} | {g['wins']}/{g['n']} | {per} |"
                )
        lines.append("")
    lines += ["## Runs", "", "| run | status | wall s | seed | output |", "|---|---|---|---|---|"]
    for r in study["runs"]:
        lines.append(
            f"| {r['name']} | {r['status']} | {_fmt(r.get('wall_s'), '.1f')} | {r.get('seed', '–')} | "
            f"{r['output_dir']} |"
        )
    return "\n".join(lines) + "\n"


def plot_fidelity(fid: Dict, path: str) -> str:
    """One column per level; rows: the L1 and relative-L2 reduction against nearest (%) and the
    PSNR gain over nearest (dB), one labelled bar per interpolator. Against nearest, because the
    differences between interpolators are a few per cent of the error itself."""
    import matplotlib  # only when drawing

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels, names = fid["levels"], list(fid["scores"])
    ref = fid["scores"].get(REFERENCE_ARM, {})
    rows = [
        ("L1 reduction vs nearest (%)", lambda m, r: 100.0 * (1.0 - m["l1"] / r["l1"])),
        ("rel. L2 reduction vs nearest (%)", lambda m, r: 100.0 * (1.0 - m["rel_l2"] / r["rel_l2"])),
        ("PSNR gain over nearest (dB)", lambda m, r: m["psnr"] - r["psnr"]),
    ]
    fig, axes = plt.subplots(len(rows), len(levels), figsize=(3.2 * len(levels), 2.6 * len(rows) + 1.2), squeeze=False)
    colours = plt.get_cmap("tab10")
    for j, l in enumerate(levels):
        for i, (title, measure) in enumerate(rows):
            ax = axes[i, j]
            vals = []
            for n in names:
                m, r = fid["scores"][n].get(l), ref.get(l)
                v = measure(m, r) if m and r else math.nan
                vals.append(v if math.isfinite(v) else 0.0)
            bars = ax.bar(range(len(names)), vals, color=[colours(k % 10) for k in range(len(names))])
            ax.bar_label(bars, fmt="%.2f", fontsize=6)
            ax.axhline(0, color="black", linewidth=0.6)
            ax.set_xticks([])
            ax.set_title(f"{l}: {title}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.margins(y=0.2)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours(k % 10)) for k in range(len(names))]
    fig.legend(handles, names, loc="lower center", ncol=min(4, len(names)), fontsize=7)
    fig.suptitle(
        f"x2 of the teacher's half-resolution features vs its full-resolution features ({fid['dataset']}): "
        f"gain over nearest (higher is better)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path


def plot_detection(summary: Dict, path: str) -> str:
    """bbox and segm AP per arm: mean with sample-std error bars, and each seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.1 * len(arms), 4.2), squeeze=False)
    for ax, task in zip(axes[0], ("bbox", "segm")):
        means = [summary[a][task]["AP"]["mean"] or 0.0 for a in arms]
        stds = [summary[a][task]["AP"]["std"] or 0.0 for a in arms]
        ax.bar(range(len(arms)), means, yerr=stds, capsize=4, color="#9ecae1", edgecolor="#3182bd")
        for i, a in enumerate(arms):
            seeds = summary[a][task]["per_seed"]
            ax.plot([i] * len(seeds), list(seeds.values()), "k.", markersize=5)
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels([ARMS[a].label.replace(", ", ",\n") for a in arms], fontsize=7, rotation=30, ha="right")
        ax.set_ylabel(f"{task} AP")
        ax.set_title(f"stage-3 {task} AP, mean ± std over seeds (dots: seeds)", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path


def _machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


# study.json's sections written by each part.
SECTIONS = {
    "curves": ("curves",),
    "probe": ("probe",),
    "detection": ("fidelity", "content_loss", "teacher", "detection", "summary", "noise", "image_noise"),
}


def write_outputs(
    output_dir: str,
    settings: StudySettings,
    results: Dict,
    runs: List[Dict],
    command: str,
    wall_s: float,
    parts: Sequence[str] = PARTS,
) -> Dict[str, str]:
    """Write study.json, study.md and the charts of the sections present; return their paths.
    ``results`` holds the sections of ``parts``; the others, and the runs of earlier invocations,
    are kept from the study.json already in ``output_dir``."""
    json_path = os.path.join(output_dir, "study.json")
    previous = {}
    if os.path.isfile(json_path):
        with open(json_path) as f:
            previous = json.load(f)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    names = {r["name"] for r in runs}
    study = {
        "command": command,
        "machine": _machine(),
        "torch": torch.__version__,
        "load_average_1min": load,
        "wall_s": wall_s,
        "runs_wall_s": sum(r.get("wall_s") or 0.0 for r in runs),
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()},
        "runs": [r for r in previous.get("runs", []) if r["name"] not in names] + runs,
    }
    if "detection" in parts:
        summary = summarize(results["detection"])
        results = dict(results, summary=summary, noise=seed_noise(summary))
    for part, keys in SECTIONS.items():
        for key in keys:
            study[key] = results.get(key) if part in parts else previous.get(key)
    study["image_noise"] = study.get("image_noise") or {}
    paths = {
        "json": json_path,
        "md": os.path.join(output_dir, "study.md"),
        "curves_png": os.path.join(output_dir, "fidelity_curves.png"),
        "fidelity_png": os.path.join(output_dir, "fidelity.png"),
        "detection_png": os.path.join(output_dir, "detection.png"),
    }
    write_json(paths["json"], study)
    atomic_write(paths["md"], format_markdown(study))
    if (study.get("curves") or {}).get("arms"):
        plot_curves(study["curves"], paths["curves_png"])
    else:
        del paths["curves_png"]
    if study.get("fidelity"):
        plot_fidelity(study["fidelity"], paths["fidelity_png"])
    else:
        del paths["fidelity_png"]
    if study.get("summary"):
        plot_detection(study["summary"], paths["detection_png"])
    else:
        del paths["detection_png"]
    return paths
