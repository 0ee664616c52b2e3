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

import detectron2.data.transforms as T
import numpy as np
import torch
from detectron2.export import TracingAdapter
from detectron2.export.flatten import DictSchema, InstancesSchema, ListSchema, TensorWrapSchema
from detectron2.modeling import GeneralizedRCNN, build_model

from afigan.checkpoint import AFICheckpointer
from afigan.config import load_config
from afigan.data.image_io import read_image_or_raise
from afigan.io import atomic_write_json

from .export_check import ExportError, cut_offs, default_check_sizes, exported_runner, resized
from .export_check import check_sizes as _check_sizes
from .export_match import TOLERANCES, SizeCheck
from .gradcam import quiet_inference

__all__ = [
    "FORMATS",
    "ONNX_OPSET",
    "NOT_EXPORTABLE",
    "ExportError",
    "ExportResult",
    "dynamic_axes",
    "sample_image",
    "upsampler_kind",
    "export_model",
    "export_detector",
    "quiet_export",
]

logger = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
# Not Detectron2's STABLE_ONNX_OPSET_VERSION (11): torchvision lowers Detectron2's ROIAlign
# (aligned=True) to ONNX RoiAlign correctly only from opset 16 on (at 11 it warns and drops the
# alignment); 17 is the oldest opset this project checks.
ONNX_OPSET = 17
FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}

# (format, MODEL.AFI.INTERP kind) -> why it cannot be exported. Every kind of the upsampler
# registry that is not listed here is exported and checked by tests/test_export.py.
NOT_EXPORTABLE: Dict[Tuple[str, str], str] = {}


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

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.sizes)

    def summary(self) -> str:
        """One line: sizes checked, largest matched differences, unmatched count, verdict."""
        sizes = ", ".join(f"{c.size[0]}x{c.size[1]}" for c in self.sizes)
        diffs = ", ".join(f"{k} {v:.3g}" for k, v in self.differences.items()) or "none"
        unmatched = sum(len(c.unmatched) for c in self.sizes)
        near = sum(u["near_cut"] for c in self.sizes for u in c.unmatched)
        bad = [c for c in self.sizes if not c.ok]
        verdict = (
            "all within tolerance"
            if not bad
            else "DIFFERENT at " + "; ".join(f"{c.size[0]}x{c.size[1]}: {c.problems[0]}" for c in bad)
        )
        return (
            f"{self.format}: checked at {len(self.sizes)} sizes ({sizes}); {self.detections} detections at the "
            f"sample; largest matched difference to PyTorch: {diffs}; unmatched {unmatched} "
            f"({near} near a cut); {verdict}"
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


def sample_image(cfg, path: Optional[str] = None, seed: int = 0) -> Tuple[torch.Tensor, str]:
    """``(image, description)``: the float32 (3, H, W) input the graph is traced on.

    With ``path``: the file read in ``INPUT.FORMAT`` and resized like Detectron2's
    ``DefaultPredictor`` (shortest edge ``INPUT.MIN_SIZE_TEST``, longest at most
    ``INPUT.MAX_SIZE_TEST``). Without: a random uint8 image (``seed``) of ``MIN_SIZE_TEST`` x
    ``round(4/3 MIN_SIZE_TEST)`` (the long side capped at ``MAX_SIZE_TEST``)."""
    short, long_max = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
    if path:
        img = read_image_or_raise(path, cfg.INPUT.FORMAT)
        img = T.ResizeShortestEdge([short, short], long_max).get_transform(img).apply_image(img)
        image = torch.as_tensor(np.ascontiguousarray(img.astype("float32").transpose(2, 0, 1)))
        return image, f"{path} resized to {image.shape[1]}x{image.shape[2]}"
    h, w = short, min(int(round(short * 4 / 3)), long_max)
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8).float()
    return image, f"a random {h}x{w} image (seed {seed}; INPUT.MIN_SIZE_TEST {short}; no --sample-image given)"


def upsampler_kind(cfg, model: torch.nn.Module) -> Optional[str]:
    """``MODEL.AFI.INTERP`` when the model's neck has an afigan upsampler (``srf_module`` or
    ``srf_modules``), else None (e.g. Detectron2's own FPN)."""
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    return cfg.MODEL.AFI.INTERP if names & {"srf_module", "srf_modules"} else None


def describe(cfg, kind: Optional[str]) -> str:
    """E.g. ``"GeneralizedRCNN (build_resnet_fpn_sr_backbone, MODEL.AFI.INTERP 'afi')"``."""
    up = f", MODEL.AFI.INTERP {kind!r}" if kind else ""
    return f"{cfg.MODEL.META_ARCHITECTURE} ({cfg.MODEL.BACKBONE.NAME}{up})"


def _inference_func(model):
    if isinstance(model, GeneralizedRCNN):
        # As Detectron2's export_model.py: do_postprocess=False keeps the per-box mask
        # probabilities (pasting them into the image is data-dependent Python).
        def inference(model, inputs):
            return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]

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


def _export_torchscript(adapter, image: torch.Tensor, path: str):
    traced = torch.jit.trace(adapter, (image,))
    torch.jit.save(traced, path)


def dynamic_axes(names: Sequence[str]) -> Dict[str, Dict[int, str]]:
    """The ONNX graph's dynamic axes: the image's height and width, and the detection count (the
    first axis) of every output but ``image_size``."""
    axes = {"image": {1: "height", 2: "width"}}
    axes.update({n: {0: "detections"} for n in names if not n.endswith("image_size")})
    return axes


def _export_onnx(adapter, image: torch.Tensor, path: str, names: List[str]):
    # dynamo=False: torch 2.14's default torch.export-based exporter stops at data-dependent
    # sizes (GuardOnDataDependentSymNode, first at the x2 map's crop/pad in afigan/layers/shape.py
    # for a Mask R-CNN); the TorchScript-based exporter traces TracingAdapter as torch.jit.trace does.
    torch.onnx.export(
        adapter,
        (image,),
        path,
        opset_version=ONNX_OPSET,
        dynamo=False,
        input_names=["image"],
        output_names=names,
        dynamic_axes=dynamic_axes(names),
    )


def export_detector(
    cfg,
    model: torch.nn.Module,
    image: torch.Tensor,
    fmt: str,
    output_dir: str,
    sample: str = "",
    check_sizes: Optional[Sequence[Tuple[int, int]]] = None,
) -> ExportResult:
    """Trace ``model`` (eval mode) on ``image``, write ``output_dir/model.ts`` or ``model.onnx``,
    run the written file on ``image`` and on ``image`` resized to each (H, W) of ``check_sizes``,
    match its detections with the PyTorch model's on the same image, and write
    ``output_dir/export.json``. Raises :class:`ExportError` (one sentence) when the model cannot be
    exported in ``fmt``; a difference, or a size the file fails on, makes ``ok`` false."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {list(FORMATS)}, got {fmt!r}.")
    kind = upsampler_kind(cfg, model)
    what = describe(cfg, kind)
    if (fmt, kind) in NOT_EXPORTABLE:
        raise ExportError(f"MODEL.AFI.INTERP {kind!r} cannot be exported to {fmt}: {NOT_EXPORTABLE[fmt, kind]}.")
    model.eval()
    device = next(model.parameters()).device
    image = image.to(device)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, FILES[fmt])
    # eval(): torch.onnx.export puts the module back in the mode it found it in, and a new
    # TracingAdapter is in training mode, which would switch the model to training after export.
    adapter = TracingAdapter(model, [{"image": image}], _inference_func(model)).eval()
    try:
        with torch.no_grad(), quiet_export():
            adapter(image)  # sets adapter.outputs_schema
            names = output_names(adapter.outputs_schema)
            if fmt == "torchscript":
                _export_torchscript(adapter, image, path)
            else:
                _export_onnx(adapter, image, path, names)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the tracer or exporter raises becomes one sentence
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(f"{what} could not be exported to {fmt} ({type(e).__name__}: {first[:300]}).") from e
    h, w = int(image.shape[1]), int(image.shape[2])
    images = [(image, "the sample")] + [
        (resized(image, size), f"the sample resized from {h}x{w}") for size in (check_sizes or ())
    ]
    threshold, topk = cut_offs(model)
    with torch.no_grad(), quiet_export():
        checks = _check_sizes(adapter, exported_runner(fmt, path), names, images, threshold, topk)
    result = ExportResult(
        format=fmt,
        path=path,
        sample=sample,
        input_size=(h, w),
        outputs=names,
        detections=checks[0].pytorch,
        sizes=checks,
        differences=worst_differences(checks),
    )
    info = {
        **result.to_dict(),
        "model": what,
        "input": f"image: float32 (3, H, W), any H and W, INPUT.FORMAT {cfg.INPUT.FORMAT}, resized, not normalised",
        "onnx_opset": ONNX_OPSET if fmt == "onnx" else None,
        "cut_offs": {"score_threshold": threshold, "topk": topk},
    }
    atomic_write_json(os.path.join(output_dir, "export.json"), info)
    return result


def worst_differences(checks: Sequence[SizeCheck]) -> Dict[str, float]:
    """The largest matched box (px), score and mask differences over ``checks`` (a key only where
    something was compared)."""
    out = {}
    for key in ("box_px", "score", "mask"):
        values = [getattr(c, key) for c in checks if getattr(c, key) is not None]
        if values:
            out[key] = max(values)
    return out


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
) -> ExportResult:
    """``tools/export_model.py``: the config's detector (see :func:`build_detector`, on the CPU
    unless ``opts`` set ``MODEL.DEVICE``) exported by :func:`export_detector` on
    :func:`sample_image`, checked at the sample's size and at ``check_sizes`` (None:
    :func:`~afigan.analysis.export_check.default_check_sizes`; ``[]``: the sample only)."""
    cfg = load_config(config_file, opts, device="cpu")
    with quiet_inference():
        model = build_detector(cfg)
    image, description = sample_image(cfg, sample)
    sizes = default_check_sizes(cfg) if check_sizes is None else check_sizes
    return export_detector(cfg, model, image, fmt, output_dir, sample=description, check_sizes=sizes)
