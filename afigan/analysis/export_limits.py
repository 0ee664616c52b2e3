"""What the exporter cannot do, stated before it tries: tables keyed by ``(format, value)``, where
the value is an upsampler kind (``MODEL.AFI.INTERP``) or a config name of the detector family
(``MODEL.META_ARCHITECTURE``, ``MODEL.BACKBONE.NAME``, ``MODEL.ROI_HEADS.NAME``,
``MODEL.PROPOSAL_GENERATOR.NAME``), and the one-sentence refusal of Detectron2's scripting path."""

from typing import Dict, Optional, Tuple

from afigan.config import cfg_get

__all__ = ["NOT_EXPORTABLE", "FIXED_SIZE", "NOT_BATCHABLE", "SCRIPTING_REFUSAL", "limit"]

# (format, kind or family name) -> why it cannot be exported at all. Every kind of the upsampler
# registry and every toy detector family not listed is exported and checked by
# tests/analysis/test_export.py and tests/analysis/test_export_sizes.py.
NOT_EXPORTABLE: Dict[Tuple[str, str], str] = {
    ("onnx", "deformable convolution"): (
        "torchvision's deform_conv2d has no ONNX form (the exporter stops at torchvision::deform_conv2d, "
        "opset 17); export it to TorchScript, which runs at any image size"
    ),
}
# (format, kind or family name) -> why its exported file runs at the traced image size only (an op
# without a dynamic form); the tool then checks the sample's size only and says so.
FIXED_SIZE: Dict[Tuple[str, str], str] = {}
# (format, kind or family name) -> why it cannot be traced with more than one image.
NOT_BATCHABLE: Dict[Tuple[str, str], str] = {}

# Detectron2's scripting path (detectron2.export.scripting_with_instances) needs every submodule
# to pass torch.jit.script; afigan's are written for tracing.
SCRIPTING_REFUSAL = (
    "--export-method scripting is not offered: torch.jit.script stops at afigan's upsamplers and necks "
    "(the first at afigan/layers/upsample.py, F.interpolate(..., **kwargs)), which are written for tracing; "
    "export with tracing, which takes a fixed number of images (--batch N) of any size."
)

# Switches that put an op into every family they appear in: config key -> (what the table calls it,
# whether the key's value turns it on). Detectron2's ResNet and afigan's ResNeSt read
# DEFORM_ON_PER_STAGE; FCOS (and CenterMask's FCOS) reads USE_DEFORMABLE.
_SWITCHES = {
    "MODEL.RESNETS.DEFORM_ON_PER_STAGE": ("deformable convolution", lambda v: any(v)),
    "MODEL.FCOS.USE_DEFORMABLE": ("deformable convolution", bool),
}

_KEYS = (
    "MODEL.META_ARCHITECTURE",
    "MODEL.BACKBONE.NAME",
    "MODEL.ROI_HEADS.NAME",
    "MODEL.PROPOSAL_GENERATOR.NAME",
)


def limit(cfg, fmt: str, kind: Optional[str], table: Dict[Tuple[str, str], str]) -> Optional[Tuple[str, str]]:
    """``(what, why)`` of the first entry of ``table`` that applies to this config in ``fmt``: the
    upsampler ``kind`` (``MODEL.AFI.INTERP 'x'``) first, then the family's config names, then the
    switches of :data:`_SWITCHES` that are on; None when none applies."""
    candidates = [("MODEL.AFI.INTERP", kind)] if kind else []
    for key in _KEYS:
        node = cfg
        for part in key.split("."):
            node = getattr(node, part, None)
        candidates.append((key, node))
    for key, value in candidates:
        if value and (fmt, value) in table:
            return f"{key} {value!r}", table[fmt, value]
    for key, (name, is_on) in _SWITCHES.items():
        value = cfg_get(cfg, key, None)
        if value is not None and is_on(value) and (fmt, name) in table:
            return f"{name} ({key} {value!r})", table[fmt, name]
    return None
