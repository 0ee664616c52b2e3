"""The "Feature Enhancement" weight-space regulariser (README.md, Feature Enhancement), pure PyTorch.

The reference method adds two terms to the detector loss, both functions of backbone *weights*
only (no images, no feature maps, nothing at inference):

* smooth term on the late stage (torchvision ``layer4`` = Detectron2 ``res5``):
  ``+λ_s · Σ_W ‖W‖_F``  (unsquared Frobenius norm, plain sum over tensors);
* sharp term on the early stage (``layer2`` = ``res3``):
  ``−λ_e · Σ_W Var(W)``  (unbiased variance over all elements of the tensor, i.e. maximised).

Stages are looked up by name on a *root* module each time the terms are computed, so the
regulariser holds no module references and adds nothing to any state dict.
"""

import contextlib
import math
from typing import Dict, Iterable, List, Sequence, Tuple

import torch
from torch import nn

__all__ = [
    "FE_PARAM_KINDS",
    "FeatureEnhancementRegularizer",
    "stage_weights",
    "frobenius_term",
    "variance_term",
]

# Which tensors of a stage count: the reference's stages had FrozenBN and bias-free convs, so
# ``stage.parameters()`` there meant exactly the conv weights; "conv_weight" keeps that meaning
# under BN/GN too, "conv" adds conv biases, "all" is every trainable parameter of the stage.
FE_PARAM_KINDS = ("conv_weight", "conv", "all")
_SMOOTH_NORMS = ("fro", "fro_sq")
_REDUCTIONS = ("sum", "mean")


def stage_weights(stage: nn.Module, params: str = "conv_weight", trainable_only: bool = True) -> List[torch.Tensor]:
    """The tensors of ``stage`` that the regulariser acts on, in module order.

    ``params`` is one of :data:`FE_PARAM_KINDS`. With ``trainable_only`` (the default) tensors
    with ``requires_grad=False`` are left out: a frozen stage contributes nothing.
    """
    if params not in FE_PARAM_KINDS:
        raise ValueError(f"Unknown FE parameter kind {params!r}; choose one of {FE_PARAM_KINDS}.")
    if params == "all":
        out = list(stage.parameters())
    else:
        out = []
        for m in stage.modules():
            # Detectron2's Conv2d (and deformable convs built on nn.Conv2d) subclass these.
            if isinstance(m, nn.modules.conv._ConvNd):
                out.append(m.weight)
                if params == "conv" and m.bias is not None:
                    out.append(m.bias)
    return [p for p in out if p.requires_grad or not trainable_only]


@contextlib.contextmanager
def _float32(tensors: Sequence[torch.Tensor]):
    # Autocast would otherwise run the reductions in fp16/bf16, where a 1e-5-weighted term is lost.
    device = tensors[0].device.type if tensors else "cpu"
    if device in ("cuda", "cpu", "xpu", "mps"):
        with torch.autocast(device_type=device, enabled=False):
            yield
    else:  # pragma: no cover - exotic device types
        yield


def frobenius_term(
    weights: Sequence[torch.Tensor], squared: bool = False, reduction: str = "sum", device=None
) -> torch.Tensor:
    """``Σ_W ‖W‖_F`` (or ``Σ_W ‖W‖_F²`` when ``squared``), summed or averaged over tensors.

    Any tensor shapes; returns a float32 scalar (a constant 0 on ``device`` for an empty list).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"Unknown FE reduction {reduction!r}; choose one of {_REDUCTIONS}.")
    if not weights:
        return torch.zeros((), device=device)
    with _float32(weights):
        vals = [w.float().pow(2).sum() if squared else torch.linalg.vector_norm(w.float()) for w in weights]
        total = torch.stack(vals).sum()
    return total / len(vals) if reduction == "mean" else total


def variance_term(
    weights: Sequence[torch.Tensor], unbiased: bool = True, reduction: str = "sum", device=None
) -> torch.Tensor:
    """``Σ_W Var(W)`` over all elements of each tensor (denominator n − 1 when ``unbiased``).

    Tensors with fewer than two elements have no sample variance and are skipped. Returns a
    float32 scalar (a constant 0 on ``device`` when nothing is left).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"Unknown FE reduction {reduction!r}; choose one of {_REDUCTIONS}.")
    weights = [w for w in weights if w.numel() > 1]
    if not weights:
        return torch.zeros((), device=device)
    with _float32(weights):
        total = torch.stack([w.float().var(unbiased=unbiased) for w in weights]).sum()
    return total / len(weights) if reduction == "mean" else total


class FeatureEnhancementRegularizer:
    """Computes the two FE loss terms from the current weights of named stages of a root module.

    Args:
        sharp_stages: names (``root.get_submodule`` paths) of stages whose weight variance is
            maximised; reference: ``("res3",)``.
        smooth_stages: stages whose weight norm is penalised; reference: ``("res5",)``.
        sharp_weight: λ_e ≥ 0 (reference 1e-5 for RetinaNet, 1.0 for Faster R-CNN).
        smooth_weight: λ_s ≥ 0 (reference 1e-5).
        params: which tensors count, one of :data:`FE_PARAM_KINDS`.
        smooth_norm: "fro" (reference, unsquared) or "fro_sq" (squared: weight-decay-like).
        var_unbiased: n − 1 denominator (reference) or n.
        reduction: "sum" over tensors (reference) or "mean".

    Not an ``nn.Module`` on purpose: it owns no parameters or buffers and must not make the
    stages' parameters appear twice in a model.
    """

    SHARP_KEY = "loss_fe_sharp"
    SMOOTH_KEY = "loss_fe_smooth"

    def __init__(
        self,
        sharp_stages: Iterable[str] = ("res3",),
        smooth_stages: Iterable[str] = ("res5",),
        sharp_weight: float = 1e-5,
        smooth_weight: float = 1e-5,
        params: str = "conv_weight",
        smooth_norm: str = "fro",
        var_unbiased: bool = True,
        reduction: str = "sum",
    ):
        self.sharp_stages = tuple(sharp_stages)
        self.smooth_stages = tuple(smooth_stages)
        self.sharp_weight = float(sharp_weight)
        self.smooth_weight = float(smooth_weight)
        self.params = params
        self.smooth_norm = smooth_norm
        self.var_unbiased = bool(var_unbiased)
        self.reduction = reduction
        for name, value in (("sharp_weight", self.sharp_weight), ("smooth_weight", self.smooth_weight)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"FE {name} must be a finite number >= 0 (the sign is fixed by the term), got {value}."
                )
        if params not in FE_PARAM_KINDS:
            raise ValueError(f"Unknown FE parameter kind {params!r}; choose one of {FE_PARAM_KINDS}.")
        if smooth_norm not in _SMOOTH_NORMS:
            raise ValueError(f"Unknown FE smooth norm {smooth_norm!r}; choose one of {_SMOOTH_NORMS}.")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"Unknown FE reduction {reduction!r}; choose one of {_REDUCTIONS}.")

    # ---- which tensors ----
    @property
    def active(self) -> bool:
        """False when both λ are 0 (or no stage is named): the model is then exactly the baseline."""
        return bool((self.sharp_weight > 0 and self.sharp_stages) or (self.smooth_weight > 0 and self.smooth_stages))

    def _stage(self, root: nn.Module, name: str) -> nn.Module:
        try:
            return root.get_submodule(name)
        except AttributeError:
            children = [n for n, _ in root.named_children()]
            raise KeyError(
                f"FE stage {name!r} is not a sub-module of {type(root).__name__} (children: {children})."
            ) from None

    def weights(self, root: nn.Module, stages: Iterable[str], trainable_only: bool = True) -> List[torch.Tensor]:
        """Selected tensors of every named stage, deduplicated (a stage may be named twice)."""
        seen, out = set(), []
        for name in stages:
            for w in stage_weights(self._stage(root, name), self.params, trainable_only):
                if id(w) not in seen:
                    seen.add(id(w))
                    out.append(w)
        return out

    def frozen_stages(self, root: nn.Module) -> List[str]:
        """Named stages (with a non-zero λ) whose selected tensors are all frozen: their term is 0."""
        named = (list(self.sharp_stages) if self.sharp_weight > 0 else []) + (
            list(self.smooth_stages) if self.smooth_weight > 0 else []
        )
        return [n for n in named if stage_weights(self._stage(root, n), self.params, True) == []]

    # ---- the terms ----
    def compute(self, root: nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """``(losses, stats)``. ``losses`` holds ``loss_fe_smooth = λ_s·S`` and
        ``loss_fe_sharp = −λ_e·V`` (only terms with λ > 0), float32 scalars that carry gradient to
        the weights; ``stats`` the raw, detached ``S`` (``fe/smooth_norm``) and ``V``
        (``fe/sharp_var``) of those terms."""
        losses, stats = {}, {}
        # A frozen stage gives a constant 0 on the model's device, so the loss dict keeps its keys.
        first = next(iter(root.parameters()), None)  # (a default tensor would be made on every call)
        device = first.device if first is not None else torch.device("cpu")
        if self.smooth_weight > 0 and self.smooth_stages:
            s = frobenius_term(
                self.weights(root, self.smooth_stages), self.smooth_norm == "fro_sq", self.reduction, device
            )
            losses[self.SMOOTH_KEY] = self.smooth_weight * s
            stats["fe/smooth_norm"] = s.detach()
        if self.sharp_weight > 0 and self.sharp_stages:
            v = variance_term(self.weights(root, self.sharp_stages), self.var_unbiased, self.reduction, device)
            losses[self.SHARP_KEY] = -self.sharp_weight * v
            stats["fe/sharp_var"] = v.detach()
        return losses, stats

    def __call__(self, root: nn.Module) -> Dict[str, torch.Tensor]:
        """The loss terms only (see :meth:`compute`)."""
        return self.compute(root)[0]

    # ---- how strong is it? ----
    def strength(self, root: nn.Module, weight_decay: float) -> Dict[str, Tuple[float, float]]:
        """Per term, the (min, max) over tensors of |gradient of the term| / |gradient of weight decay|.

        smooth, "fro": λ_s / (wd·‖W‖); "fro_sq": 2λ_s / wd. sharp: 2λ_e / ((n − 1)·wd), acting on
        the mean-centred weights against the decay (with n instead of n − 1 when biased).
        With "mean" reduction λ is divided by the number of tensors. Empty when ``weight_decay``
        is 0 or no trainable tensor is selected.
        """
        out = {}
        if weight_decay <= 0:
            return out
        if self.smooth_weight > 0 and self.smooth_stages:
            ws = self.weights(root, self.smooth_stages)
            if ws:
                lam = self.smooth_weight / (len(ws) if self.reduction == "mean" else 1)
                if self.smooth_norm == "fro":
                    r = [
                        lam / (weight_decay * max(float(torch.linalg.vector_norm(w.detach().float())), 1e-12))
                        for w in ws
                    ]
                else:
                    r = [2 * lam / weight_decay] * len(ws)
                out[self.SMOOTH_KEY] = (min(r), max(r))
        if self.sharp_weight > 0 and self.sharp_stages:
            ws = [w for w in self.weights(root, self.sharp_stages) if w.numel() > 1]
            if ws:
                lam = self.sharp_weight / (len(ws) if self.reduction == "mean" else 1)
                r = [2 * lam / ((w.numel() - (1 if self.var_unbiased else 0)) * weight_decay) for w in ws]
                out[self.SHARP_KEY] = (min(r), max(r))
        return out

    def __repr__(self) -> str:
        return (
            f"FeatureEnhancementRegularizer(sharp={list(self.sharp_stages)} λ_e={self.sharp_weight:g}, "
            f"smooth={list(self.smooth_stages)} λ_s={self.smooth_weight:g}, params={self.params!r}, "
            f"smooth_norm={self.smooth_norm!r}, var_unbiased={self.var_unbiased}, reduction={self.reduction!r})"
        )
