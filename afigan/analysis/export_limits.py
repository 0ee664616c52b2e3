"""What the exporter cannot do, stated before it tries: tables keyed by ``(format, value)``, where
the value is an upsampler kind (``MODEL.AFI.INTERP``) or a config name of the detector family
(``MODEL.META_ARCHITECTURE``, ``MODEL.BACKBONE.NAME``, ``MODEL.ROI_HEADS.NAME``,
``MODEL.PROPOSAL_GENERATOR.NAME``), and the one-sentence refusal of Detectron2's scripting path."""

from typing import Dict, Optional, Tuple

__all__ = ["NOT_EXPORTABLE", "FIXED_SIZE", "NOT_BATCHABLE", "SCRIPTING_REFUSAL", "limit"]

# (format, kind or family name) -> why it cannot be exported at all. Every kind of the upsampler
# registry and every toy detector family not listed is exported and checked by
# tests/analysis/test_export.py and tests/analysis/test_export_sizes.py.
NOT_EXPORTABLE: Dict[Tuple[str, str], str] = {}
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

_KEYS = (
    "MODEL.META_ARCHITECTURE",
    "MODEL.BACKBONE.NAME",
    "MODEL.ROI_HEADS.NAME",
    "MODEL.PROPOSAL_GENERATOR.NAME",
)


def limit(cfg, fmt: str, kind: Optional[str], table: Dict[Tuple[str, str], str]) -> Optional[Tuple[str, str]]:
    """``(what, why)`` of the first entry of ``table`` that applies to this config in ``fmt``: the
    upsampler ``kind`` (``MODEL.AFI.INTERP 'x'``) first, then the family's config names; None when
    none applies."""
    candidates = [("MODEL.AFI.INTERP", kind)] if kind else []
    for key in _KEYS:
        node = cfg
        for part in key.split("."):
            node = getattr(node, part, None)
        candidates.append((key, node))
    for key, value in candidates:
        if value and (fmt, value) in table:
            return f"{key} {value!r}", table[fmt, value]
    return None
