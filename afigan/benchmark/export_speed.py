"""Speed of an exported detector: the same Mask R-CNN (one per upsampler kind) timed in PyTorch eager,
as the TorchScript file and as the ONNX file in onnxruntime, on the same image. Both files are written
and checked by :func:`afigan.analysis.export.export_detector` first, so every timed runtime gives the
eager model's detections (matched one-to-one) on that image. The check runs in full float32 (TF32 off,
:func:`afigan.analysis.export_check.full_float32`); the timings with PyTorch's defaults (on an Ampere
or newer GPU: cuDNN convolutions in TF32)."""

import os
import platform
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.export import TracingAdapter

from afigan.analysis.export import build_detector, export_detector, inference_func, quiet_export
from afigan.analysis.export_check import exported_runner, sample_image
from afigan.config import load_config

from .timing import clock_name, median_seconds, on_cuda
from .training import REFERENCE_SIZES

__all__ = ["KINDS", "RUNTIMES", "WARMUP", "CONFIG", "options", "measure", "format_table", "machine"]

# The issue's three: Detectron2's own upsampling, the AF interpolator and a learned point sampler.
KINDS = ("nearest", "afi", "dysample")
RUNTIMES = ("eager", "torchscript", "onnxruntime")
WARMUP = 3
CONFIG = "toy/pipeline/stage3.yaml"  # Mask R-CNN FPN; R-50 and the paper's neck with --reference-sizes


def options(size: int, reference: bool) -> List[str]:
    """Config overrides: test size ``size`` (short side; long side at most 5/3 of it, as 800/1333);
    score threshold 0 and Detectron2's torchvision-style PIXEL_STD (random BN layers pass the toy
    configs' unscaled O(100) pixels on, and a random R-50's RPN then clips most proposals to empty
    boxes), so the heads see as many boxes as a busy image gives them (the table counts them); with
    ``reference`` the paper's sizes (REFERENCE_SIZES: R-50, 256-channel FPN, full interpolator),
    COCO's 80 classes and 100 detections per image."""
    opts = ["INPUT.MIN_SIZE_TEST", str(size), "INPUT.MAX_SIZE_TEST", str(size * 5 // 3)]
    opts += ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.PIXEL_STD", "[57.375, 57.12, 58.395]"]
    if reference:
        opts += REFERENCE_SIZES + ["MODEL.ROI_HEADS.NUM_CLASSES", "80", "TEST.DETECTIONS_PER_IMAGE", "100"]
    return opts


def _onnx_provider(device: str) -> str:
    import onnxruntime

    if on_cuda(device) and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return "CUDAExecutionProvider"
    return "CPUExecutionProvider"


def _onnx_runner(path: str, provider: str):
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=[provider])
    name = session.get_inputs()[0].name
    return lambda image: session.run(None, {name: image.cpu().numpy()})


def measure(
    configs_dir: str,
    out_dir: str,
    size: int = 800,
    kinds: Sequence[str] = KINDS,
    repeats: int = 5,
    device: str = "cpu",
    reference: bool = False,
    seed: int = 0,
) -> List[Dict]:
    """One row per kind: median seconds per image of each runtime (after :data:`WARMUP` untimed calls), the
    speed-up over eager, and the export check (detections, matched, largest matched box
    difference, ok) of each written file. The files go to ``out_dir/<kind>/``."""
    rows = []
    for kind in kinds:
        opts = options(size, reference) + ["MODEL.AFI.INTERP", kind, "MODEL.DEVICE", device]
        cfg = load_config(os.path.join(configs_dir, CONFIG), opts)
        torch.manual_seed(seed)  # the same random weights for every runtime and run
        model = build_detector(cfg)
        image, _ = sample_image(cfg, seed=seed)
        image = image.to(device)
        row: Dict = {"kind": kind, "image": list(image.shape[1:]), "seconds": {}, "checks": {}}
        for fmt in ("torchscript", "onnx"):
            result = export_detector(cfg, model, image, fmt, os.path.join(out_dir, kind, fmt), check_sizes=[])
            c = result.sizes[0]
            row["checks"][fmt] = {
                "detections": c.pytorch,
                "exported": c.exported,
                "matched": c.matched,
                "box_px": c.box_px,
                "ok": result.ok,
            }
            row[fmt] = result.path
        adapter = TracingAdapter(model, [{"image": image}], inference_func(model)).eval()
        provider = _onnx_provider(device)
        with torch.no_grad(), quiet_export():
            runners = {
                "eager": adapter,
                "torchscript": exported_runner("torchscript", row["torchscript"]),
                "onnxruntime": _onnx_runner(row["onnx"], provider),
            }
            for name, run in runners.items():
                # WARMUP untimed calls: TorchScript's profiling executor specialises the graph on its
                # first two calls, and the first onnxruntime call allocates its arenas.
                row["seconds"][name] = median_seconds(lambda: run(image), repeats, device, warmup=WARMUP)
        row["onnxruntime_provider"] = provider
        row["speedup"] = {k: row["seconds"]["eager"] / v for k, v in row["seconds"].items() if k != "eager"}
        row["detections"] = row["checks"]["torchscript"]["detections"]
        row["ok"] = all(c["ok"] for c in row["checks"].values())
        row.pop("torchscript"), row.pop("onnx")
        rows.append(row)
    return rows


def machine(device: str) -> str:
    """The GPU's name on CUDA, else the CPU and torch's thread count."""
    if on_cuda(device):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def format_table(rows: Sequence[Dict], device: Optional[str] = None) -> str:
    """A Markdown table: per kind the image, detections, median ms per image of each runtime (x the
    speed-up over eager), and whether both files matched eager's detections."""
    clock = f" ({clock_name(device)})" if device else ""
    head = (
        f"| upsampler | image | detections | eager ms{clock} | TorchScript ms | onnxruntime ms | "
        "files match eager |\n|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        s, up = r["seconds"], r["speedup"]
        lines.append(
            f"| {r['kind']} | {r['image'][0]}x{r['image'][1]} | {r['detections']} | {1e3 * s['eager']:.1f} | "
            f"{1e3 * s['torchscript']:.1f} (x{up['torchscript']:.2f}) | "
            f"{1e3 * s['onnxruntime']:.1f} (x{up['onnxruntime']:.2f}) | {'yes' if r['ok'] else 'NO'} |"
        )
    return "\n".join(lines)
