"""Run a written TorchScript or ONNX file again (TorchScript in PyTorch, ONNX in onnxruntime) on the
sample image and on more image sizes, and compare each run with the PyTorch model's detections on
the same image (:func:`afigan.analysis.export_match.match_detections`)."""

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .export_match import SizeCheck, match_detections

__all__ = ["ExportError", "default_check_sizes", "resized", "cut_offs", "exported_runner", "check_sizes"]


class ExportError(ValueError):
    """A model that cannot be exported, or whose exported file could not be run; the message is one
    sentence."""


Runner = Callable[[torch.Tensor], List[torch.Tensor]]


def _odd(x: float) -> int:
    return int(round(x)) // 2 * 2 + 1


def default_check_sizes(cfg) -> List[Tuple[int, int]]:
    """Three (H, W) sizes besides the sample's (``S = INPUT.MIN_SIZE_TEST``), all odd so no side is a
    multiple of the backbone's strides: a smaller landscape (3/4 S x S), a portrait (5/4 S x 3/4 S)
    and a larger landscape (3/2 S x 2 S); 64 gives 49x65, 81x49, 97x129."""
    s = cfg.INPUT.MIN_SIZE_TEST
    return [(_odd(0.75 * s), _odd(s)), (_odd(1.25 * s), _odd(0.75 * s)), (_odd(1.5 * s), _odd(2 * s))]


def resized(image: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """The (3, H, W) ``image`` bilinearly resized to ``size`` (its content kept, so a trained model
    finds in it what it finds in the sample)."""
    return F.interpolate(image[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


def cut_offs(model: torch.nn.Module) -> Tuple[Optional[float], Optional[int]]:
    """``(score threshold, top-k)`` of the model's final detections, the threshold in the scale of
    the output ``scores`` (None where the threshold acts on another quantity): the last box
    predictor's for R-CNNs (Cascade included), RetinaNet's own, else the dense head's (FCOS, also as
    CenterMask's proposal generator: its threshold is on the class probability, in the output scale
    sqrt(threshold) only when it thresholds probability x centerness)."""
    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    if isinstance(predictor, torch.nn.ModuleList):
        predictor = predictor[-1]
    if hasattr(predictor, "test_score_thresh"):
        return float(predictor.test_score_thresh), int(predictor.test_topk_per_image)
    if hasattr(model, "test_score_thresh"):  # Detectron2's RetinaNet
        return float(model.test_score_thresh), int(model.max_detections_per_image)
    head = getattr(model, "proposal_generator", None)
    if hasattr(head, "post_nms_topk") and hasattr(head, "pre_nms_thresh"):
        thresh = float(head.pre_nms_thresh[1]) ** 0.5 if head.thresh_with_ctr else None
        return thresh, int(head.post_nms_topk[1])
    return None, None


def exported_runner(fmt: str, path: str) -> Runner:
    """A function image -> the written file's flattened outputs, loaded once."""
    if fmt == "torchscript":
        module = torch.jit.load(path)
        return lambda image: list(module(image))
    try:
        import onnxruntime
    except ImportError:
        raise ExportError("Checking an ONNX export needs onnxruntime: pip install -e '.[onnx]'.") from None
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda image: [torch.as_tensor(x) for x in session.run(None, {name: image.cpu().numpy()})]


def _detections(names: Sequence[str], outputs: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {n: o.detach().cpu() for n, o in zip(names, outputs) if not n.endswith("image_size")}


def check_sizes(
    pytorch: Runner,
    exported: Runner,
    names: Sequence[str],
    images: Sequence[Tuple[torch.Tensor, str]],
    score_threshold: Optional[float] = None,
    topk: Optional[int] = None,
) -> List[SizeCheck]:
    """One :class:`SizeCheck` per ``(image, description)``: ``pytorch(image)`` and
    ``exported(image)`` (flattened outputs named ``names``) matched as detections. An exported
    file that fails on an image, or returns other outputs, is a problem of that size, not an
    exception."""
    checks = []
    for image, description in images:
        size = (int(image.shape[-2]), int(image.shape[-1]))
        with torch.no_grad():
            expected = _detections(names, pytorch(image))
        try:
            outputs = exported(image)
        except Exception as e:  # noqa: BLE001 - a file that cannot run at this size is this size's verdict
            first = (str(e).strip().splitlines() or [""])[0][:200]
            check = SizeCheck(size=size, image=description, pytorch=len(expected.get("scores", ())))
            check.problems.append(f"the exported file fails on this size ({type(e).__name__}: {first})")
            checks.append(check)
            continue
        if len(outputs) != len(names):
            check = SizeCheck(size=size, image=description, pytorch=len(expected.get("scores", ())))
            check.problems.append(f"the exported file returns {len(outputs)} outputs, PyTorch {len(names)}")
            checks.append(check)
            continue
        actual = _detections(names, outputs)
        checks.append(
            match_detections(expected, actual, size=size, image=description, score_threshold=score_threshold, topk=topk)
        )
    return checks
