"""Run a written TorchScript or ONNX file again (TorchScript in PyTorch, ONNX in onnxruntime) on the
sample image and on more image sizes, and compare each run with the PyTorch model's detections on
the same image (:func:`afigan.analysis.export_match.match_detections`)."""

import contextlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import detectron2.data.transforms as T
import numpy as np
import torch
import torch.nn.functional as F

from afigan.data.image_io import read_image_or_raise

from .export_match import SizeCheck, match_detections, merge_checks

__all__ = [
    "full_float32",
    "sample_image",
    "batch_images",
    "ExportError",
    "default_check_sizes",
    "resized",
    "cut_offs",
    "exported_runner",
    "per_image",
    "check_sizes",
]


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


def batch_images(image: torch.Tensor, batch: int) -> Tuple[torch.Tensor, ...]:
    """``image`` and ``batch - 1`` more of its size: it rolled sideways by i/batch of its width
    (other content at the same size, so the images of a batch give different detections)."""
    w = image.shape[-1]
    return tuple(torch.roll(image, shifts=i * w // batch, dims=-1) for i in range(batch))


@contextlib.contextmanager
def full_float32():
    """TF32 off for convolutions and matrix products while inside (PyTorch's cuDNN default is on):
    on an Ampere-or-newer GPU it rounds eager and TorchScript runs to 10-bit mantissas, which moves
    boxes by more than the check's tolerance against onnxruntime's float32 on the CPU."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


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
    """A function images -> the written file's flattened outputs, loaded once."""
    if fmt == "torchscript":
        module = torch.jit.load(path)
        return lambda *images: list(module(*images))
    try:
        import onnxruntime
    except ImportError:
        raise ExportError("Checking an ONNX export needs onnxruntime: pip install -e '.[onnx]'.") from None
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    return lambda *images: [
        torch.as_tensor(x) for x in session.run(None, {n: im.cpu().numpy() for n, im in zip(inputs, images)})
    ]


def per_image(names: Sequence[str], outputs: Sequence[torch.Tensor], n: int) -> List[Dict[str, torch.Tensor]]:
    """Flattened outputs of ``n`` images (names ``pred_boxes``, ... for one image; ``0.pred_boxes``,
    ..., ``1.pred_boxes``, ... for several) -> one ``{name: tensor}`` per image, ``image_size`` left out."""
    named = {k: o.detach().cpu() for k, o in zip(names, outputs) if not k.endswith("image_size")}
    if n == 1:
        return [named]
    return [{k[len(f"{i}.") :]: v for k, v in named.items() if k.startswith(f"{i}.")} for i in range(n)]


def _failed(size, description, n_pytorch, problem) -> SizeCheck:
    check = SizeCheck(size=size, image=description, pytorch=n_pytorch)
    check.problems.append(problem)
    return check


def check_sizes(
    pytorch: Runner,
    exported: Runner,
    names: Sequence[str],
    batches: Sequence[Tuple[Sequence[torch.Tensor], str]],
    score_threshold: Optional[float] = None,
    topk: Optional[int] = None,
) -> List[SizeCheck]:
    """One :class:`SizeCheck` per ``(images, description)`` (the images of one call, all of one
    size): ``pytorch(*images)`` and ``exported(*images)`` (flattened outputs named ``names``)
    matched as detections image by image, the counts summed and the differences maximised over the
    images. An exported file that fails on the images, or returns other outputs, is a problem of
    that size, not an exception."""
    checks = []
    for images, description in batches:
        size = (int(images[0].shape[-2]), int(images[0].shape[-1]))
        with torch.no_grad():
            expected = per_image(names, pytorch(*images), len(images))
        count = sum(len(e.get("scores", ())) for e in expected)
        try:
            outputs = exported(*images)
        except Exception as e:  # noqa: BLE001 - a file that cannot run at this size is this size's verdict
            first = (str(e).strip().splitlines() or [""])[0][:200]
            problem = f"the exported file fails on this size ({type(e).__name__}: {first})"
            checks.append(_failed(size, description, count, problem))
            continue
        if len(outputs) != len(names):
            problem = f"the exported file returns {len(outputs)} outputs, PyTorch {len(names)}"
            checks.append(_failed(size, description, count, problem))
            continue
        actual = per_image(names, outputs, len(images))
        per = [
            match_detections(e, a, size=size, image=description, score_threshold=score_threshold, topk=topk)
            for e, a in zip(expected, actual)
        ]
        checks.append(merge_checks(per))
    return checks
