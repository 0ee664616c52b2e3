"""Deployment export behind ``tools/export_model.py``: a detector of any afigan config traced with
Detectron2's ``TracingAdapter`` into TorchScript or ONNX, then run again (the saved TorchScript
file in PyTorch, the ONNX file in onnxruntime) on the sample image, and its outputs compared with
the PyTorch model's.

What the exported graph computes is what Detectron2's ``tools/deploy/export_model.py`` exports
with ``--export-method tracing``: input one float32 image (3, H, W) in ``INPUT.FORMAT`` channel
order, already resized (normalisation and padding are inside the graph); outputs the flattened
``Instances`` of that image (for R-CNN meta-architectures ``inference(..., do_postprocess=False)``,
so boxes are in the input image's coordinates and masks are the per-box ``M x M`` mask
probabilities, not pasted; one-stage detectors ``model(inputs)`` with the input's own size as the
output size). The image's height and width are dynamic axes of the ONNX graph (and the number of
detections of every per-detection output), so the file takes any size where the model's shape logic
survives tracing. The written file is checked on the sample and on ``check_sizes`` more sizes by
matching its detections with PyTorch's one-to-one (:mod:`afigan.analysis.export_match`).
"""

import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.export import TracingAdapter
from detectron2.export.flatten import DictSchema, InstancesSchema, ListSchema, TensorWrapSchema
from detectron2.modeling import GeneralizedRCNN, build_model

from afigan.checkpoint import AFICheckpointer
from afigan.config import load_config
from afigan.io import atomic_write_json

from .export_check import (
    ExportError,
    batch_images,
    cut_offs,
    default_check_sizes,
    exported_runner,
    full_float32,
    resized,
    sample_image,
)
from .export_check import check_sizes as _check_sizes
from .export_limits import FIXED_SIZE, NOT_BATCHABLE, NOT_EXPORTABLE, SCRIPTING_REFUSAL, limit
from .export_match import TOLERANCES, SizeCheck, worst_differences
from .gradcam import quiet_inference

__all__ = [
    "FORMATS",
    "ONNX_OPSET",
    "NOT_EXPORTABLE",
    "FIXED_SIZE",
    "NOT_BATCHABLE",
    "SCRIPTING_REFUSAL",
    "ExportError",
    "ExportResult",
    "dynamic_axes",
    "sample_image",
    "upsampler_kind",
    "export_model",
    "export_detector",
    "quiet_export",
    "inference_func",
]

logger = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
# Not Detectron2's STABLE_ONNX_OPSET_VERSION (11): torchvision lowers Detectron2's ROIAlign
# (aligned=True) to ONNX RoiAlign correctly only from opset 16 on (at 11 it warns and drops the
# alignment); 17 is the oldest opset this project checks.
ONNX_OPSET = 17
FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}


@dataclass
class ExportResult:
    """What :func:`export_detector` did: the file it wrote, the sample it traced on, the output
    names (in the order of the exported graph's outputs), the sample's PyTorch detection count,
    one :class:`~afigan.analysis.export_match.SizeCheck` per image the written file was run on
    (the sample first), the largest matched-pair differences over all of them (``box_px``,
    ``score``, ``mask``) and the tolerances they were judged by. ``ok``: no size has a problem."""

    format: str
    path: str
    sample: str
    input_size: Tuple[int, int]
    outputs: List[str]
    detections: int
    sizes: List[SizeCheck] = field(default_factory=list)
    differences: Dict[str, float] = field(default_factory=dict)
    tolerances: Dict[str, float] = field(default_factory=lambda: dict(TOLERANCES))
    batch: int = 1

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.sizes)

    def summary(self) -> str:
        """One line: sizes checked, largest matched differences, unmatched count, verdict."""
        sizes = ", ".join(c.label for c in self.sizes)
        diffs = ", ".join(f"{k} {v:.3g}" for k, v in self.differences.items()) or "none"
        unmatched = sum(len(c.unmatched) for c in self.sizes)
        near = sum(u["near_cut"] for c in self.sizes for u in c.unmatched)
        bad = [c for c in self.sizes if not c.ok]
        verdict = (
            "all within tolerance"
            if not bad
            else "DIFFERENT at " + "; ".join(f"{c.label}: {c.problems[0]}" for c in bad)
        )
        traced = "traced image" + ("s" if self.batch > 1 else "")
        return (
            f"{self.format}: checked at {len(self.sizes)} sizes ({sizes}); {self.detections} detections in the "
            f"{traced}; largest matched difference to PyTorch: {diffs}; unmatched {unmatched} ({near} near a cut); "
            f"{verdict}"
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sizes"] = [c.to_dict() for c in self.sizes]
        d["ok"] = self.ok
        return d


@contextmanager
def quiet_export():
    """Silence what tracing a Detectron2 model always prints, and nothing else: the tracer's
    warnings (Detectron2's inference code converts shapes to Python numbers on purpose, which the
    tracer flags), the deprecation notices of ``torch.jit.*`` and of the TorchScript-based ONNX
    exporter this module uses on purpose (see :func:`_export_onnx`), the ONNX exporter's notes on
    how it lowers indexing and slicing, and :func:`afigan.analysis.gradcam.quiet_inference`'s two."""
    with quiet_inference(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        warnings.filterwarnings(
            "ignore", message="You are using the legacy TorchScript-based ONNX export", category=DeprecationWarning
        )
        warnings.filterwarnings(
            "ignore", message="The feature will be removed", category=DeprecationWarning, module=r"torch\.onnx"
        )
        warnings.filterwarnings(
            "ignore", message="Exporting aten::index operator of advanced indexing", category=UserWarning
        )
        warnings.filterwarnings(
            "ignore", message="Constant folding - Only steps=1 can be constant folded", category=UserWarning
        )
        yield


def upsampler_kind(cfg, model: torch.nn.Module) -> Optional[str]:
    """``MODEL.AFI.INTERP`` when the model's neck has an afigan upsampler (``srf_module`` or
    ``srf_modules``), else None (e.g. Detectron2's own FPN)."""
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    return cfg.MODEL.AFI.INTERP if names & {"srf_module", "srf_modules"} else None


def describe(cfg, kind: Optional[str]) -> str:
    """E.g. ``"GeneralizedRCNN (build_resnet_fpn_sr_backbone, MODEL.AFI.INTERP 'afi')"``."""
    up = f", MODEL.AFI.INTERP {kind!r}" if kind else ""
    return f"{cfg.MODEL.META_ARCHITECTURE} ({cfg.MODEL.BACKBONE.NAME}{up})"


def inference_func(model):
    """What TracingAdapter calls the model with: R-CNNs' ``inference(..., do_postprocess=False)`` per
    image, None (``model(inputs)``) for one-stage detectors."""
    if isinstance(model, GeneralizedRCNN):
        # As Detectron2's export_model.py: do_postprocess=False keeps the per-box mask
        # probabilities (pasting them into the image is data-dependent Python).
        def inference(model, inputs):
            return [{"instances": r} for r in model.inference(inputs, do_postprocess=False)]

        return inference
    return None  # one-stage detectors: model(inputs); without "height"/"width" the output size is the input's


def output_names(schema, prefix: str = "") -> List[str]:
    """Names of the flattened outputs described by a TracingAdapter ``outputs_schema``, in order
    (``pred_boxes``, ``pred_classes``, ..., ``image_size`` for one image)."""
    if isinstance(schema, InstancesSchema):
        names = [n for key, sub in zip(schema.keys, schema.schemas) for n in output_names(sub, prefix + key)]
        return names + [prefix + "image_size"]
    if isinstance(schema, DictSchema):
        return [
            n
            for key, sub in zip(schema.keys, schema.schemas)
            for n in output_names(sub, prefix if key == "instances" else prefix + key + ".")
        ]
    if isinstance(schema, ListSchema):
        if len(schema.schemas) == 1:
            return output_names(schema.schemas[0], prefix)
        return [n for i, sub in enumerate(schema.schemas) for n in output_names(sub, f"{prefix}{i}.")]
    if isinstance(schema, TensorWrapSchema):
        return [prefix]
    return [prefix or "output"]


def _export_torchscript(adapter, images: Tuple[torch.Tensor, ...], path: str):
    # check_trace=False: the tracer's own check re-traces and re-runs the model (about 2/3 of the
    # export's time) to compare on the same input; export_detector's check runs the written file on
    # the sample and on other sizes, which is the stronger test.
    traced = torch.jit.trace(adapter, images, check_trace=False)
    torch.jit.save(traced, path)


def input_names(batch: int) -> List[str]:
    """The ONNX graph's inputs: ``image``, or ``image0`` ... ``image{batch-1}``."""
    return ["image"] if batch == 1 else [f"image{i}" for i in range(batch)]


def dynamic_axes(names: Sequence[str], batch: int = 1) -> Dict[str, Dict[int, str]]:
    """The ONNX graph's dynamic axes: every image's height and width, and the detection count (the
    first axis) of every output but ``image_size`` (named per image when ``batch`` > 1)."""
    if batch == 1:
        axes = {"image": {1: "height", 2: "width"}}
        return {**axes, **{n: {0: "detections"} for n in names if not n.endswith("image_size")}}
    axes = {f"image{i}": {1: f"height{i}", 2: f"width{i}"} for i in range(batch)}
    per_image = {n: {0: "detections" + n.split(".")[0]} for n in names if not n.endswith("image_size")}
    return {**axes, **per_image}


def _export_onnx(adapter, images: Tuple[torch.Tensor, ...], path: str, names: List[str]):
    # dynamo=False: torch 2.14's default torch.export-based exporter stops at data-dependent
    # sizes (GuardOnDataDependentSymNode, first at the x2 map's crop/pad in afigan/layers/shape.py
    # for a Mask R-CNN); the TorchScript-based exporter traces TracingAdapter as torch.jit.trace does.
    torch.onnx.export(
        adapter,
        images,
        path,
        opset_version=ONNX_OPSET,
        dynamo=False,
        input_names=input_names(len(images)),
        output_names=names,
        dynamic_axes=dynamic_axes(names, len(images)),
    )


def export_detector(
    cfg,
    model: torch.nn.Module,
    image: torch.Tensor,
    fmt: str,
    output_dir: str,
    sample: str = "",
    check_sizes: Optional[Sequence[Tuple[int, int]]] = None,
    batch: int = 1,
) -> ExportResult:
    """Trace ``model`` (eval mode) on ``image`` (with ``batch`` > 1: on :func:`batch_images`, and the
    graph takes exactly that many images), write ``output_dir/model.ts`` or ``model.onnx``, run the
    written file on the traced images and on them resized to each (H, W) of ``check_sizes``, match
    its detections with the PyTorch model's on the same images, and write
    ``output_dir/export.json``. Raises :class:`ExportError` (one sentence) when the model cannot be
    exported in ``fmt``; a difference, or a size the file fails on, makes ``ok`` false."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {list(FORMATS)}, got {fmt!r}.")
    kind = upsampler_kind(cfg, model)
    what = describe(cfg, kind)
    if batch < 1:
        raise ExportError(f"--batch must be at least 1, got {batch}.")
    blocked = limit(cfg, fmt, kind, NOT_EXPORTABLE)
    if blocked:
        raise ExportError(f"{blocked[0]} cannot be exported to {fmt}: {blocked[1]}.")
    blocked = limit(cfg, fmt, kind, NOT_BATCHABLE) if batch > 1 else None
    if blocked:
        raise ExportError(f"{blocked[0]} cannot be exported to {fmt} with more than one image: {blocked[1]}.")
    fixed = limit(cfg, fmt, kind, FIXED_SIZE)
    if fixed and check_sizes:
        logger.warning(
            f"{fixed[0]} exports to {fmt} at the traced image size only ({fixed[1]}), so the file is checked "
            "at the sample's size only."
        )
        check_sizes = []
    model.eval()
    device = next(model.parameters()).device
    images = batch_images(image.to(device), batch)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, FILES[fmt])
    # eval(): torch.onnx.export puts the module back in the mode it found it in, and a new
    # TracingAdapter is in training mode, which would switch the model to training after export.
    adapter = TracingAdapter(model, [{"image": x} for x in images], inference_func(model)).eval()
    try:
        with torch.no_grad(), quiet_export():
            adapter(*images)  # sets adapter.outputs_schema
            names = output_names(adapter.outputs_schema)
            if fmt == "torchscript":
                _export_torchscript(adapter, images, path)
            else:
                _export_onnx(adapter, images, path, names)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the tracer or exporter raises becomes one sentence
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(f"{what} could not be exported to {fmt} ({type(e).__name__}: {first[:300]}).") from e
    h, w = int(image.shape[1]), int(image.shape[2])
    what_ran = "the sample" if batch == 1 else f"the sample and {batch - 1} rolled copies"
    batches = [(images, what_ran)] + [
        (tuple(resized(x, size) for x in images), f"{what_ran} resized from {h}x{w}") for size in (check_sizes or ())
    ]
    if batch > 1 and len(check_sizes or ()) > 1:  # one call with images of different sizes (padded together)
        mixed = [check_sizes[i % len(check_sizes)] for i in range(batch)]
        text = ", ".join(f"{a}x{b}" for a, b in mixed)
        batches.append((tuple(resized(x, s) for x, s in zip(images, mixed)), f"mixed sizes: {text}"))
    threshold, topk = cut_offs(model)
    with torch.no_grad(), quiet_export(), full_float32():
        checks = _check_sizes(adapter, exported_runner(fmt, path), names, batches, threshold, topk)
    result = ExportResult(
        format=fmt,
        path=path,
        sample=sample,
        input_size=(h, w),
        outputs=names,
        detections=checks[0].pytorch,
        sizes=checks,
        differences=worst_differences(checks),
        batch=batch,
    )
    info = {
        **result.to_dict(),
        "model": what,
        "inputs": input_names(batch),
        "input": f"each image: float32 (3, H, W), INPUT.FORMAT {cfg.INPUT.FORMAT}, resized, not normalised",
        "onnx_opset": ONNX_OPSET if fmt == "onnx" else None,
        "cut_offs": {"score_threshold": threshold, "topk": topk},
    }
    atomic_write_json(os.path.join(output_dir, "export.json"), info)
    return result


def build_detector(cfg) -> torch.nn.Module:
    """``build_model(cfg)`` with ``MODEL.WEIGHTS`` loaded (random weights when it is empty), in eval mode."""
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        AFICheckpointer(model).load(cfg.MODEL.WEIGHTS)
    else:
        logger.warning("MODEL.WEIGHTS is empty: exporting randomly initialised weights.")
    return model.eval()


def export_model(
    config_file: str,
    output_dir: str,
    fmt: str = "torchscript",
    sample: Optional[str] = None,
    opts: Sequence[str] = (),
    check_sizes: Optional[Sequence[Tuple[int, int]]] = None,
    batch: int = 1,
    method: str = "tracing",
) -> ExportResult:
    """``tools/export_model.py``: the config's detector (see :func:`build_detector`, on the CPU
    unless ``opts`` set ``MODEL.DEVICE``) exported by :func:`export_detector` on
    :func:`sample_image`, checked at the sample's size and at ``check_sizes`` (None:
    :func:`~afigan.analysis.export_check.default_check_sizes`; ``[]``: the sample only).
    ``method`` "scripting" stops with :data:`SCRIPTING_REFUSAL` before anything is built."""
    if method == "scripting":
        raise ExportError(SCRIPTING_REFUSAL)
    if method != "tracing":
        raise ExportError(f"--export-method must be tracing (or scripting, which is refused), got {method!r}.")
    cfg = load_config(config_file, opts, device="cpu")
    with quiet_inference():
        model = build_detector(cfg)
    image, description = sample_image(cfg, sample)
    sizes = default_check_sizes(cfg) if check_sizes is None else check_sizes
    return export_detector(cfg, model, image, fmt, output_dir, sample=description, check_sizes=sizes, batch=batch)
