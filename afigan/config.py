"""``add_afigan_config(cfg)``: every config key afigan adds, with a one-line comment each.

Keys of the reference implementation keep their names (``MODEL.GUIDE_WEIGHTS``,
``MODEL.AFI_FREEZE``, ``MODEL.BIFPN.*``, ``MODEL.SWINT.*``, the ResNeSt keys under
``MODEL.RESNETS``), so configs written for it load. Everything the reference hard-coded lives
under one new node, ``MODEL.AFI``. The function only touches the cfg it is given, never
Detectron2's global defaults, and calling it twice is harmless.
"""
import logging
import warnings

from detectron2.config import CfgNode as CN

from .config_utils import node as _node
from .config_utils import set_default as _set_default
from .fe_config import add_fe_config

__all__ = ["add_afigan_config", "afi_freeze", "fallback_syncbn"]


def add_afigan_config(cfg: CN) -> CN:
    """Add afigan's keys to ``cfg`` in place (idempotent) and return it."""
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    m = cfg.MODEL

    # ---- reference keys (spec §14) ----
    _set_default(m, "GUIDE_ARCHITECTURE", "")  # teacher meta-arch in GUIDE_ARCH_REGISTRY ("RCNN_FPN_only")
    _set_default(m, "GUIDE_WEIGHTS", "")  # teacher weights (.pkl from the d2 zoo or .pth)
    _set_default(m, "AFI_GEN_WEIGHTS", "")  # stage 1: G init/resume file; stage 2: stage-1 G
    _set_default(m, "AFI_DIS_WEIGHTS", "")  # stage 1: D init/resume file; stage 2: stage-1 D
    _set_default(m, "AF_EXTRACTOR_WEIGHTS", "")  # stage 3: file whose srf_module tensors init G
    _set_default(m, "AFI_FREEZE", False)  # freeze the interpolator inside the neck
    # Deprecated spelling used by the reference's Swin config (bug B11); None = not given.
    _set_default(m, "SRF_FREEZE", None)
    gb = _node(m, "GUIDE_BACKBONE")
    _set_default(gb, "NAME", "build_resnet_fpn_backbone")  # teacher backbone builder
    _set_default(gb, "FREEZE_AT", 2)  # kept for config compatibility; unused (as in the reference)

    r = m.RESNETS  # ResNeSt (spec §12.1)
    _set_default(r, "RADIX", 1)  # split-attention radix; 1 = plain ResNet(-D) blocks
    _set_default(r, "BOTTLENECK_WIDTH", 64)  # group-width scaling
    _set_default(r, "DEEP_STEM", False)  # three 3x3 stem convs (forced on when RADIX > 1)
    _set_default(r, "AVD", False)  # average-pool downsampling inside blocks (forced on when RADIX > 1)
    _set_default(r, "AVG_DOWN", False)  # average-pool shortcut (forced on when RADIX > 1)

    b = _node(m, "BIFPN")
    _set_default(b, "IN_FEATURES", [])  # bottom-up features feeding the BiFPN
    _set_default(b, "OUT_CHANNELS", 256)  # BiFPN width
    _set_default(b, "FPN_REPEAT", 3)  # layers; honoured only in "corrected" mode (faithful: 7)
    _set_default(b, "NORM", "SyncBN")  # norm of separable convs and P6 block (BN when not distributed)
    _set_default(b, "FUSE_TYPE", "sum")  # accepted, ignored (as in the reference)
    _set_default(b, "MODE", "faithful")  # "faithful" (reference, O6) | "corrected" (normalised fusion, per-layer skips)

    s = _node(m, "SWINT")
    _set_default(s, "EMBED_DIM", 96)  # Swin embedding width
    _set_default(s, "OUT_FEATURES", ["stage2", "stage3", "stage4", "stage5"])  # Swin outputs
    _set_default(s, "DEPTHS", [2, 2, 6, 2])  # blocks per stage
    _set_default(s, "NUM_HEADS", [3, 6, 12, 24])  # attention heads per stage
    _set_default(s, "WINDOW_SIZE", 7)  # attention window
    _set_default(s, "MLP_RATIO", 4.0)  # MLP expansion
    _set_default(s, "DROP_PATH_RATE", 0.2)  # stochastic depth (linear from 0)
    _set_default(s, "APE", False)  # absolute position embedding

    _set_default(cfg.SOLVER, "OPTIMIZER", "SGD")  # kept for config compatibility; SGD is used

    # ---- new keys: everything the reference hard-coded ----
    a = _node(m, "AFI")
    _set_default(a, "INTERP", "afi")  # upsampler inside the neck: "afi" | "nearest" | "bilinear"
    _set_default(a, "NUM_BLOCKS", 3)  # dense blocks in the interpolator's RRDB
    _set_default(a, "GROWTH", 32)  # dense-block growth rate
    _set_default(a, "RES_SCALE", 0.2)  # residual scale beta
    _set_default(a, "SKIP", "bilinear")  # interpolator's parallel x2 path: bilinear | nearest | none
    _set_default(a, "ADV_WEIGHT", 1e-3)  # lambda_adv of the generator loss
    _set_default(a, "CONTENT_WEIGHT", 1.0)  # lambda_content (L1) of the generator loss
    _set_default(a, "LEVELS", ["p2", "p3", "p4", "p5", "p6"])  # pyramid levels in the feature losses
    _set_default(a, "SCALE_RATIO", 0.5)  # low-resolution image size / high-resolution size
    _set_default(a, "ADV_GRAD_TO_G", True)  # False reproduces bug B1 (adversarial term detached)
    _set_default(a, "TARGET_DOWNSAMPLE", "nearest")  # stage-2 target: teacher HR features x0.5 ("nearest" | "avg")
    d = _node(a, "DIS")
    _set_default(d, "NORM", "BN")  # discriminator norm: "BN" (reference) | "SyncBN" | ""
    _set_default(d, "SPECTRAL_NORM", False)  # spectral norm on D's convs (changes checkpoint keys)
    _set_default(d, "BASE_WIDTH", 0)  # D's blocks have min(2^n, 4) * BASE_WIDTH channels; 0 = FPN width (reference)
    _set_default(d, "BASE_LR", -1.0)  # D learning rate; <= 0 means SOLVER.BASE_LR (reference)
    lg = _node(a, "LEGACY")
    _set_default(lg, "INDEPENDENT_FLIP", False)  # B2: flip HR and LR images independently
    _set_default(lg, "FROZEN_DIS_LR", False)  # O3: stage-2 D scheduler never stepped
    _set_default(lg, "RUN_D_ON_REAL_IN_G_STEP", False)  # O8: wasted D pass on real features in the G step
    _set_default(a, "STAGE", "")  # set by the stage trainers; informational
    add_fe_config(cfg)  # MODEL.FE.*: the feature-enhancement regulariser (afigan/fe_config.py)
    from afigan.modeling.meta_arch.detector_config import add_detector_config  # here: afigan.modeling imports this module
    add_detector_config(cfg)  # MODEL.FCOS.*, MASKIOU and RoI level keys (FCOS / CenterMask)
    if was_frozen:
        cfg.freeze()
    return cfg


def afi_freeze(cfg: CN) -> bool:
    """``MODEL.AFI_FREEZE``, honouring the reference's deprecated ``MODEL.SRF_FREEZE`` spelling."""
    srf = cfg.MODEL.get("SRF_FREEZE", None)
    if srf is not None:
        msg = "MODEL.SRF_FREEZE is deprecated; use MODEL.AFI_FREEZE (taking SRF_FREEZE=%s)." % srf
        warnings.warn(msg, DeprecationWarning, stacklevel=2)
        logging.getLogger(__name__).warning(msg)
        return bool(srf)
    return bool(cfg.MODEL.AFI_FREEZE)


def _walk_norm_keys(node: CN, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, CN):
            yield from _walk_norm_keys(value, f"{prefix}{key}.")
        elif key == "NORM" or key.endswith("_NORM"):
            yield node, key, f"{prefix}{key}"


def fallback_syncbn(cfg: CN) -> CN:
    """Replace every ``*.NORM == "SyncBN"`` by "BN" where synchronisation cannot work or is moot.

    SyncBN needs CUDA tensors and a process group of more than one process. A single-process run
    (one GPU or CPU) and every CPU run get plain BN instead, with a log line, so a config written
    for an 8-GPU job runs unchanged on a laptop. Returns ``cfg`` (modified in place).
    """
    from detectron2.utils import comm

    if comm.get_world_size() > 1 and cfg.MODEL.DEVICE != "cpu":
        return cfg
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    changed = []
    for node, key, full in _walk_norm_keys(cfg):
        if node[key] in ("SyncBN", "nnSyncBN", "naiveSyncBN"):
            node[key] = "BN"
            changed.append(full)
    if changed:
        logging.getLogger(__name__).info("Not running distributed on GPUs: SyncBN -> BN for %s.", ", ".join(changed))
    if was_frozen:
        cfg.freeze()
    return cfg
