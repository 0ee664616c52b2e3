"""``add_afigan_config(cfg)``: every config key afigan adds, with a one-line comment each.

Keys of the reference implementation keep their names (``MODEL.GUIDE_WEIGHTS``,
``MODEL.AFI_FREEZE``, ``MODEL.BIFPN.*``, ``MODEL.SWINT.*``, the ResNeSt keys under
``MODEL.RESNETS``), so configs written for it load. Everything the reference hard-coded lives
under one new node, ``MODEL.AFI``. The function only touches the cfg it is given, never
Detectron2's global defaults, and calling it twice is harmless. IDs such as B1 or O6 in the
comments name entries of docs/differences_from_reference.md.
"""

import difflib
import logging
import os
import re
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.utils import comm

from afigan.layers import upsampler_config_node, upsampler_kinds, upsampler_kwargs

__all__ = [
    "add_afigan_config",
    "add_upsampler_config",
    "add_fe_config",
    "add_fcos_config",
    "add_centermask_config",
    "afi_freeze",
    "fallback_syncbn",
    "lr_key",
    "load_config",
    "merge_readably",
    "device_fallback",
    "cuda_missing",
    "cfg_get",
    "flatten",
    "changed_keys",
    "config_changes",
]


def _set_default(parent: CN, key: str, value) -> None:
    """Add ``key`` unless present, so a second call keeps values already merged into the cfg."""
    if key not in parent:
        parent[key] = value


def _node(parent: CN, key: str) -> CN:
    """The child node ``key`` of ``parent``, created empty if missing."""
    if key not in parent:
        parent[key] = CN()
    return parent[key]


def add_afigan_config(cfg: CN) -> CN:
    """Add afigan's keys to ``cfg`` in place (idempotent) and return it."""
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    m = cfg.MODEL

    # ---- reference keys ----
    _set_default(m, "GUIDE_ARCHITECTURE", "")  # teacher meta-arch in GUIDE_ARCH_REGISTRY ("RCNN_FPN_only")
    _set_default(m, "GUIDE_WEIGHTS", "")  # teacher weights (.pkl from the d2 zoo or .pth)
    _set_default(m, "AFI_GEN_WEIGHTS", "")  # stage 1: G init/resume file; stage 2: stage-1 G
    _set_default(m, "AFI_DIS_WEIGHTS", "")  # stage 1: D init/resume file; stage 2: stage-1 D
    _set_default(m, "AF_EXTRACTOR_WEIGHTS", "")  # stage 3: file whose srf_module tensors init G
    _set_default(m, "AFI_FREEZE", False)  # freeze the interpolator inside the neck
    # Deprecated spelling used by the reference's Swin config (B11 of docs/differences_from_reference.md); None = not
    # given.
    _set_default(m, "SRF_FREEZE", None)
    gb = _node(m, "GUIDE_BACKBONE")
    _set_default(gb, "NAME", "build_resnet_fpn_backbone")  # teacher backbone builder
    _set_default(gb, "FREEZE_AT", 2)  # kept for config compatibility; unused (as in the reference)

    r = m.RESNETS  # ResNeSt
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
    _set_default(cfg.SOLVER, "CHECKPOINT_KEEP", 3)  # periodic checkpoints kept (the newest); <= 0 keeps all
    # SOLVER.AMP.ENABLED's autocast dtype: "float16" (with gradient scaling) or "bfloat16" on CUDA;
    # on a CPU AMP always runs in bfloat16 (afigan/engine/amp.py, AMPPolicy).
    _set_default(cfg.SOLVER.AMP, "PRECISION", "float16")
    # Read by Detectron2 (and afigan's loader) for SAMPLER_TRAIN RandomSubsetTrainingSampler, but
    # missing from Detectron2's defaults: the share of the training set kept.
    _set_default(cfg.DATALOADER, "RANDOM_SUBSET_RATIO", 1.0)
    # One repeat factor per DATASETS.TRAIN entry (e.g. labeled, pseudo-labeled): an image of a
    # source with factor f is drawn f times per pass on average (afigan/data/loader.py); () = all 1.
    _set_default(cfg.DATALOADER, "SOURCE_REPEAT_FACTORS", [])
    st = _node(cfg, "SELF_TRAINING")  # the pipeline's stage3_pseudo.yaml (afigan/engine/pipeline.py)
    _set_default(
        st, "IMAGES", []
    )  # unlabeled images the stage-3 model pseudo-labels: files, folders, globs or data sets
    _set_default(st, "SCORE_THRESHOLD", 0.5)  # detections kept as pseudo-labels: score >= this

    # ---- new keys: everything the reference hard-coded ----
    a = _node(m, "AFI")
    # upsampler inside the neck, any kind of afigan.layers.upsampler_kinds(): "afi" | "nearest" |
    # "bilinear" | "dysample" | "carafe" | "fade" | "deconv" | "pixelshuffle"
    _set_default(a, "INTERP", "afi")
    _set_default(
        a, "SHARED", True
    )  # one upsampler srf_module for every top-down step (AFI-GAN); False: one per step (srf_modules.<level>)
    add_upsampler_config(a)  # every kind's options, from its factory (NUM_BLOCKS, ..., DYSAMPLE.*, CARAFE.*, FADE.*)
    _set_default(a, "ADV_WEIGHT", 1e-3)  # lambda_adv of the generator loss
    _set_default(a, "CONTENT_WEIGHT", 1.0)  # lambda_content (L1) of the generator loss
    _set_default(a, "LEVELS", ["p2", "p3", "p4", "p5", "p6"])  # pyramid levels in the feature losses
    _set_default(a, "SCALE_RATIO", 0.5)  # low-resolution image size / high-resolution size
    _set_default(
        a, "ADV_GRAD_TO_G", True
    )  # False reproduces B1 of docs/differences_from_reference.md (adversarial term detached)
    _set_default(a, "TARGET_DOWNSAMPLE", "nearest")  # stage-2 target: teacher HR features x0.5 ("nearest" | "avg")
    _set_default(a, "CHANNELS_LAST", False)  # G, D, the teacher and the trained network in channels_last memory format
    _set_default(a, "COMPILE", False)  # torch.compile G and D (stages 1-2) and the neck's upsampler (stages 2-3)
    _set_default(a, "COMPILE_BACKEND", "inductor")  # torch.compile backend of MODEL.AFI.COMPILE
    d = _node(a, "DIS")
    _set_default(d, "NORM", "BN")  # discriminator norm: "BN" (reference) | "SyncBN" | ""
    _set_default(d, "SPECTRAL_NORM", False)  # spectral norm on D's convs (changes checkpoint keys)
    _set_default(d, "BASE_WIDTH", 0)  # D's blocks have min(2^n, 4) * BASE_WIDTH channels; 0 = FPN width (reference)
    _set_default(d, "BASE_LR", -1.0)  # D learning rate; <= 0 means SOLVER.BASE_LR (reference)
    # > 0: D judges one random PATCH_SIZE x PATCH_SIZE window per level (the same for real and fake)
    # instead of the whole map; 0 = the whole map (reference). The content loss keeps the whole map.
    _set_default(d, "PATCH_SIZE", 0)
    lg = _node(a, "LEGACY")
    _set_default(lg, "INDEPENDENT_FLIP", False)  # B2: flip HR and LR images independently
    _set_default(lg, "FROZEN_DIS_LR", False)  # O3: stage-2 D scheduler never stepped
    _set_default(lg, "RUN_D_ON_REAL_IN_G_STEP", False)  # O8: wasted D pass on real features in the G step
    _set_default(a, "STAGE", "")  # set by the stage trainers; informational
    add_fe_config(cfg)  # MODEL.FE.*: the feature-enhancement regulariser
    add_fcos_config(cfg)  # MODEL.FCOS.*: CenterMask2 / AdelaiDet names and defaults
    add_centermask_config(cfg)  # MODEL.MASKIOU_ON, MODEL.ROI_MASKIOU_HEAD.*, RoI level assignment
    if was_frozen:
        cfg.freeze()
    return cfg


def add_upsampler_config(afi: CN) -> CN:
    """Add the options of every registered upsampler kind under ``afi`` (``MODEL.AFI``), read from
    the kind's factory signature (``afigan.layers.upsample``): keyword ``groups=4`` of "dysample"
    becomes ``MODEL.AFI.DYSAMPLE.GROUPS: 4``; the AF interpolator's sit directly under ``MODEL.AFI``
    (``NUM_BLOCKS``, ``GROWTH``, ``RES_SCALE``, ``SKIP``, ``INIT_SCALE``: the reference's names).
    What each option means is said beside it in its factory. A kind registered later (a user's
    own) gets its keys from the next call; until then it is built with its factory's defaults."""
    for kind in upsampler_kinds():
        options = upsampler_kwargs(kind)
        if not options:
            continue
        name = upsampler_config_node(kind)
        node = _node(afi, name) if name else afi
        for option, default in options.items():
            _set_default(node, option.upper(), default)
    return afi


def add_fe_config(cfg: CN) -> CN:
    """Add ``MODEL.FE.*`` (Feature Enhancement; read only by its components, so no other model changes)."""
    fe = _node(cfg.MODEL, "FE")
    _set_default(fe, "ENABLED", True)  # master switch of the FE components; False = exact baseline
    _set_default(fe, "META_ARCHITECTURE", "GeneralizedRCNN")  # detector wrapped by META_ARCHITECTURE "FeatureEnhanced"
    _set_default(fe, "BASE_BACKBONE", "build_resnet_fpn_backbone")  # plain builder wrapped by "build_fe_backbone"
    _set_default(fe, "SHARP_STAGES", ["res3"])  # stages whose weight variance is maximised (torchvision layer2)
    _set_default(fe, "SMOOTH_STAGES", ["res5"])  # stages whose weight Frobenius norm is penalised (layer4)
    _set_default(fe, "SHARP_WEIGHT", 1e-5)  # lambda_e; reference: 1e-5 RetinaNet, 1.0 Faster R-CNN
    _set_default(fe, "SMOOTH_WEIGHT", 1e-5)  # lambda_s; reference: 1e-5
    _set_default(fe, "PARAMS", "conv_weight")  # tensors that count: "conv_weight" | "conv" (+ biases) | "all"
    _set_default(fe, "SMOOTH_NORM", "fro")  # "fro" (reference, unsquared) | "fro_sq" (weight-decay-like)
    _set_default(fe, "VAR_UNBIASED", True)  # n - 1 denominator of the variance (reference)
    _set_default(fe, "REDUCTION", "sum")  # over tensors: "sum" (reference) | "mean"
    return cfg


def add_fcos_config(cfg: CN) -> CN:
    """Add ``MODEL.FCOS.*`` (CenterMask2 names and defaults, plus AdelaiDet's loss keys)."""
    f = _node(cfg.MODEL, "FCOS")
    _set_default(f, "NUM_CLASSES", 80)  # foreground classes (no background); must equal the data set's
    _set_default(f, "IN_FEATURES", ["p3", "p4", "p5", "p6", "p7"])  # pyramid levels the head runs on
    _set_default(f, "FPN_STRIDES", [8, 16, 32, 64, 128])  # their strides (checked against the backbone)
    _set_default(f, "PRIOR_PROB", 0.01)  # initial foreground probability of the classifier
    _set_default(f, "INFERENCE_TH_TRAIN", 0.05)  # score threshold of the training-time proposals
    _set_default(f, "INFERENCE_TH_TEST", 0.05)  # score threshold at test time
    _set_default(f, "NMS_TH", 0.6)  # class-aware NMS IoU threshold
    _set_default(f, "PRE_NMS_TOPK_TRAIN", 1000)  # candidates kept per level before NMS (training)
    _set_default(f, "PRE_NMS_TOPK_TEST", 1000)  # candidates kept per level before NMS (test)
    _set_default(f, "POST_NMS_TOPK_TRAIN", 100)  # boxes kept per image after NMS (training proposals)
    _set_default(f, "POST_NMS_TOPK_TEST", 100)  # boxes kept per image after NMS (CenterMask: 50)
    _set_default(f, "TOP_LEVELS", 2)  # extra levels above P5 made from P5 (2: P6, P7)
    _set_default(f, "NORM", "GN")  # norm in the towers: "GN" | "BN" | "SyncBN" | "none"
    _set_default(f, "USE_SCALE", True)  # learnable scalar per level on the box regression
    _set_default(f, "THRESH_WITH_CTR", False)  # threshold cls*centerness instead of cls alone
    _set_default(f, "LOSS_ALPHA", 0.25)  # focal-loss alpha
    _set_default(f, "LOSS_GAMMA", 2.0)  # focal-loss gamma
    _set_default(f, "SIZES_OF_INTEREST", [64, 128, 256, 512])  # level boundaries of max(l, t, r, b)
    _set_default(f, "USE_RELU", True)  # ReLU on the distances (improved FCOS); False: exp (original)
    _set_default(f, "USE_DEFORMABLE", False)  # deformable 3x3 convs in the box and shared towers
    _set_default(f, "NUM_CLS_CONVS", 4)  # convs in the classification tower
    _set_default(f, "NUM_BOX_CONVS", 4)  # convs in the box tower
    _set_default(f, "NUM_SHARE_CONVS", 0)  # convs shared by both towers, before them
    _set_default(f, "CENTER_SAMPLE", True)  # positives only within POS_RADIUS strides of the box centre
    _set_default(f, "POS_RADIUS", 1.5)  # centre-sampling radius in strides
    _set_default(f, "LOC_LOSS_TYPE", "giou")  # box loss: "giou" | "iou" | "linear_iou" | "diou" | "ciou"
    _set_default(f, "LOSS_NORMALIZER_CLS", "fg")  # cls-loss divisor: "fg" | "moving_fg" | "all" (AdelaiDet)
    _set_default(f, "LOSS_WEIGHT_CLS", 1.0)  # weight of the classification loss (AdelaiDet)
    _set_default(f, "YIELD_PROPOSAL", False)  # emit proposals while training (always on under R-CNN meta-archs)
    return cfg


def add_centermask_config(cfg: CN) -> CN:
    """Add CenterMask's keys: MaskIoU head and the ratio-based RoI level assignment."""
    m = cfg.MODEL
    _set_default(m, "MASKIOU_ON", False)  # MaskIoU head that rescales mask scores (CenterMask)
    _set_default(m, "MASKIOU_LOSS_WEIGHT", 1.0)  # weight of its L2 loss
    h = _node(m, "ROI_MASKIOU_HEAD")
    _set_default(h, "NAME", "MaskIoUHead")  # name in afigan's ROI_MASKIOU_HEAD_REGISTRY
    _set_default(h, "CONV_DIM", 256)  # width of its convs
    _set_default(h, "NUM_CONV", 4)  # convs (the last has stride 2)
    _set_default(h, "FC_DIM", 1024)  # width of its two fully-connected layers
    # "area": FPN's canonical-size rule; "ratio": box area / image area (CenterMask eq. 2).
    _set_default(m.ROI_MASK_HEAD, "ASSIGN_CRITERION", "area")
    return cfg


def lr_key(base: str, ratio: float) -> str:
    """Name of the low-resolution twin of an input field (``MODEL.AFI.SCALE_RATIO``):
    ``lr_key("image", 0.5) == "image_x0.5"``; the HR/LR mapper writes it, the models read it."""
    return f"{base}_x{ratio:g}"


def afi_freeze(cfg: CN) -> bool:
    """``MODEL.AFI_FREEZE``, honouring the reference's deprecated ``MODEL.SRF_FREEZE`` spelling."""
    srf = cfg.MODEL.get("SRF_FREEZE", None)
    if srf is not None:
        msg = "MODEL.SRF_FREEZE is deprecated; use MODEL.AFI_FREEZE (taking SRF_FREEZE=%s)." % srf
        warnings.warn(msg, DeprecationWarning, stacklevel=2)
        logging.getLogger(__name__).warning(msg)
        return bool(srf)
    return bool(cfg.MODEL.AFI_FREEZE)


def fallback_syncbn(cfg: CN) -> CN:
    """Replace every ``*.NORM == "SyncBN"`` by "BN" where synchronisation cannot work or is moot.

    SyncBN needs CUDA tensors and a process group of more than one process. A single-process run
    (one GPU or CPU) and every CPU run get plain BN instead, with a log line, so a config written
    for an 8-GPU job runs unchanged on a laptop. Returns ``cfg`` (modified in place).
    """
    if comm.get_world_size() > 1 and cfg.MODEL.DEVICE != "cpu":
        return cfg
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    changed = []
    for full, value in flatten(cfg).items():
        parent, _, key = full.rpartition(".")
        if (key == "NORM" or key.endswith("_NORM")) and value in ("SyncBN", "nnSyncBN", "naiveSyncBN"):
            cfg_get(cfg, parent)[key] = "BN"
            changed.append(full)
    if changed:
        logging.getLogger(__name__).info("Not running distributed on GPUs: SyncBN -> BN for %s.", ", ".join(changed))
    if was_frozen:
        cfg.freeze()
    return cfg


# ---- the one config loader (every tool, the pipeline, the analysis and the benchmarks) ----


def flatten(node, prefix: str = "") -> Dict[str, Any]:
    """``{"A.B.C": value}`` of every leaf of a (nested) CfgNode or dict."""
    out: Dict[str, Any] = {}
    for key, value in node.items():
        if hasattr(value, "items"):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def cfg_get(cfg, key: str, default: Any = KeyError):
    """The value of the dotted ``key`` ("MODEL.AFI.INTERP") in ``cfg``; ``default`` when a part is
    missing (a KeyError naming the key when no default is given)."""
    node = cfg
    for part in key.split("."):
        if not hasattr(node, "items") or part not in node:
            if default is KeyError:
                raise KeyError(f"unknown config key {key}")
            return default
        node = node[part]
    return node


_MISSING = object()


def changed_keys(old, new) -> List[Tuple[str, Any, Any]]:
    """``[(KEY, old value, new value)]`` of every leaf that differs between two configs (CfgNodes
    or flat/nested dicts), in ``new``'s key order, then keys only ``old`` has. A key missing on one
    side has the value ``None`` there."""
    a = old if _is_flat(old) else flatten(old)
    b = new if _is_flat(new) else flatten(new)
    out = [(k, a.get(k), v) for k, v in b.items() if a.get(k, _MISSING) != v]
    out += [(k, v, None) for k, v in a.items() if k not in b]
    return out


def _is_flat(d) -> bool:
    return isinstance(d, dict) and not isinstance(d, CN) and not any(hasattr(v, "items") for v in d.values())


def config_changes(cfg) -> List[Tuple[str, Any]]:
    """``[(KEY, value)]`` of every key whose value differs from get_cfg() + add_afigan_config."""
    return [(k, v) for k, _, v in changed_keys(add_afigan_config(get_cfg()), cfg) if k in flatten(cfg)]


def _unknown_key(cfg, key: str, where: str) -> KeyError:
    close = difflib.get_close_matches(key, list(flatten(cfg)), n=1, cutoff=0.6)
    hint = (
        f"did you mean {close[0]}?" if close else "see afigan/config.py and Detectron2's defaults for the valid keys."
    )
    return KeyError(f"{where}: unknown config key {key}; {hint}")


def merge_readably(cfg: CN, where: str, merge: Callable[[], Any]) -> None:
    """Run ``merge`` (a merge_from_file / merge_from_list call) and turn yacs' and PyYAML's errors
    into one sentence naming ``where`` (the file or "the command line"), the key and the value."""
    import yaml

    try:
        merge()
    except FileNotFoundError as e:  # a _BASE_ file
        raise FileNotFoundError(
            f"{where}: its _BASE_ file {e.filename!r} does not exist; fix the _BASE_ path "
            f"(relative to the file that names it)."
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else where
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(
            f"YAML syntax error in {at}: {problem}; fix the file (check indentation and colons)."
        ) from None
    except KeyError as e:
        text = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
        m = re.search(r"Non-existent config key: (\S+)", text)
        if not m:
            raise
        raise _unknown_key(cfg, m.group(1), where) from None
    except AssertionError as e:  # merge_from_list checks keys and pairs with asserts
        m = re.search(r"Non-existent key: (\S+)", str(e))
        if m:
            raise _unknown_key(cfg, m.group(1), where) from None
        if "odd length" in str(e):
            raise ValueError(
                f"{where}: the trailing overrides must be KEY VALUE pairs, got an odd number of words."
            ) from None
        raise
    except ValueError as e:
        m = re.search(
            r"Type mismatch \((.*) vs\. (.*)\) with values \((.*) vs\. (.*)\) for config key: (\S+)", str(e), re.S
        )
        if not m:
            raise
        want, got, default, value, key = m.groups()
        name = lambda t: re.sub(r"<class '(\w+)'>", r"\1", t)  # noqa: E731
        raise ValueError(
            f"{where}: {key} takes a value of type {name(want)} (it was {default}), not the {name(got)} "
            f"{value}; give a value of that type."
        ) from None


def cuda_missing(device) -> bool:
    """Whether ``device`` ("cuda", "cuda:1", "cpu", a torch.device) asks for CUDA on a machine without it."""
    return str(device).startswith("cuda") and not torch.cuda.is_available()


def device_fallback(cfg, what: str = "running", key: str = "MODEL.DEVICE"):
    """The device ``key`` set to "cpu" (with one warning) when the config asks for CUDA on a machine
    without it. ``cfg``: a CfgNode, or a LazyConfig with ``key="train.device"``. Returns ``cfg``."""
    if cuda_missing(cfg_get(cfg, key)):
        logging.getLogger(__name__).warning("CUDA is not available: %s on CPU (%s cpu).", what, key)
        parent, _, leaf = key.rpartition(".")
        setattr(cfg_get(cfg, parent) if parent else cfg, leaf, "cpu")
    return cfg


def load_config(
    config_file: Optional[str] = None,
    opts: Sequence[Any] = (),
    *,
    option: str = "--config-file",
    fallback: Optional[str] = None,
    device: Optional[str] = None,
) -> CN:
    """get_cfg() + add_afigan_config + ``config_file`` + ``KEY VALUE`` ``opts``, with one sentence
    for a missing file, a YAML syntax error, an unknown key (and the closest valid one) or a value
    of the wrong type. ``fallback`` (e.g. "training") moves a CUDA config to the CPU on a machine
    without CUDA, saying so. ``device`` (e.g. "cpu", for the analysis tools) is the
    ``MODEL.DEVICE`` that replaces the file's, before ``opts`` (which may set another). ``option``
    names where the file came from in the missing-file sentence. Not frozen."""
    cfg = add_afigan_config(get_cfg())
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(
                f"{option} {config_file!r} does not exist; give the path of a YAML config, e.g. "
                "configs/toy/pipeline/stage3.yaml."
            )
        merge_readably(cfg, config_file, lambda: cfg.merge_from_file(config_file))
    if device:
        cfg.MODEL.DEVICE = device
    merge_readably(cfg, "the command line", lambda: cfg.merge_from_list(list(opts)))
    if fallback:
        device_fallback(cfg, fallback)
    return cfg
