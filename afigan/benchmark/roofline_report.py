"""The roofline benchmark's Markdown table, its targets and its chart."""

from typing import Dict, List

__all__ = ["format_table", "targets", "plot"]


def format_table(rows: List[Dict]) -> str:
    """The Markdown table; on CUDA with a last column, the peak memory of each row's timed calls."""
    memory = any("peak_mem_mib" in r for r in rows)  # CUDA rows only (afigan/benchmark/timing.py)
    lines = [
        "| component | variant | short side | ms | GFLOPs | GFLOP/s | plain 3x3 conv GFLOP/s | ratio | own "
        "layers ratio |" + (" peak MiB |" if memory else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if memory else ""),
    ]
    for r in rows:
        own = f"{r['ratio_to_own_layers']:.2f}" if "ratio_to_own_layers" in r else ""
        name = f"{r['component']} ({r['image'][0]}x{r['image'][1]})" if "image" in r else r["component"]
        lines.append(
            f"| {name} | {r['variant']} | {r['short_side']} | {r['seconds'] * 1e3:.0f} | {r['gflops']:.1f} | "
            f"{r['gflops_per_s']:.0f} | {r['plain_conv_gflops_per_s']:.0f} | {r['ratio_to_plain_conv']:.2f} | {own} |"
            + (f" {r['peak_mem_mib']:.0f} |" if memory else "")
        )
    return "\n".join(lines)


def targets(rows: List[Dict]) -> List[Dict]:
    """The issue's three targets, checked on ``rows`` of one run (per short side): the AF
    interpolator forward at >= 70 % of its own layers' throughput; a stage-3 step at most 1.1 x
    (its FLOP ratio to the plain Detectron2 step) x that step's time; the fastest stage-1 variant
    at least 30 % below the float32 default."""
    out = []
    for side in sorted({r["short_side"] for r in rows}):
        at = {(r["component"], r["variant"]): r for r in rows if r["short_side"] == side}
        afi = at.get(("AF interpolator fwd", "fp32"))
        if afi and "ratio_to_own_layers" in afi:
            out.append(
                dict(
                    short_side=side,
                    target="AF interpolator fwd >= 0.70 x own layers' GFLOP/s (fp32)",
                    value=afi["ratio_to_own_layers"],
                    met=afi["ratio_to_own_layers"] >= 0.70,
                )
            )
        s3, plain = at.get(("stage3 step", "fp32")), at.get(("plain step", "fp32"))
        if s3 and plain:
            allowed = 1.1 * s3["gflops"] / plain["gflops"]
            value = s3["seconds"] / plain["seconds"]
            out.append(
                dict(
                    short_side=side,
                    target=f"stage-3 step time / plain step <= 1.1 x FLOP ratio = {allowed:.2f}",
                    value=value,
                    met=value <= allowed,
                )
            )
        s1 = [r for (c, v), r in at.items() if c == "stage1 step"]
        base = at.get(("stage1 step", "fp32"))
        if base and len(s1) > 1:
            best = min(s1, key=lambda r: r["seconds"])
            value = best["seconds"] / base["seconds"]
            out.append(
                dict(
                    short_side=side,
                    target=f"stage-1 step ({best['variant']}) / fp32 default <= 0.70",
                    value=value,
                    met=value <= 0.70,
                )
            )
    return out


def plot(rows: List[Dict], path: str, title: str) -> None:
    """Bar chart of each component's ratio to the plain 3x3 conv, one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(f"{r['component']} @{r['short_side']}" for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(labels)), 4.5))
    for i, v in enumerate(variants):
        xs, ys = [], []
        for j, label in enumerate(labels):
            r = next((r for r in rows if r["variant"] == v and f"{r['component']} @{r['short_side']}" == label), None)
            if r is not None:
                xs.append(j + i * width)
                ys.append(r["ratio_to_plain_conv"])
        ax.bar(xs, ys, width, label=v)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("GFLOP/s / plain 3x3 conv GFLOP/s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
