"""Every YAML under configs/ loads with get_cfg() + add_afigan_config and builds its model, with
the exact parameter count recorded in tests/fixtures/config_parameter_counts.json, the
meta-architecture it names, an interpolator exactly where its backbone builder puts one, and no
absolute path anywhere in its values."""

import glob
import json
import os
import re

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from d2_helpers import CONFIGS, REPO, make_cfg  # noqa: E402
from detectron2.config import CfgNode  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from afigan.layers import AFInterpolator, build_upsampler  # noqa: E402
from afigan.modeling.necks import upsampler_options  # noqa: E402

YAMLS = sorted(os.path.relpath(p, CONFIGS) for p in glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True))
COUNTS = json.load(open(os.path.join(REPO, "tests", "fixtures", "config_parameter_counts.json")))
ABSOLUTE = re.compile(r"^(/|~|[A-Za-z]:[\\/])")


def strings(node, prefix=""):
    """(key, value) of every string in a config, lists and tuples included."""
    for key, value in node.items():
        if isinstance(value, CfgNode):
            yield from strings(value, f"{prefix}{key}.")
        elif isinstance(value, str):
            yield f"{prefix}{key}", value
        elif isinstance(value, (list, tuple)):
            yield from ((f"{prefix}{key}", v) for v in value if isinstance(v, str))


def test_configs_are_found_and_all_counted():
    assert len(YAMLS) >= 40
    assert sorted(COUNTS) == YAMLS


def test_absolute_path_check_can_fail():
    bad = make_cfg(None, "MODEL.WEIGHTS", "/home/user/AFI-GAN/model.pkl", "DATASETS.TRAIN", ("C:\\data\\x",))
    assert {k for k, v in strings(bad) if ABSOLUTE.match(v)} == {"MODEL.WEIGHTS", "DATASETS.TRAIN"}


@pytest.mark.parametrize("config", YAMLS)
def test_config_loads_and_builds(config):
    cfg = make_cfg(config)
    # No absolute paths (B10 of docs/differences_from_reference.md): every string value, whatever its key.
    assert [(k, v) for k, v in strings(cfg) if ABSOLUTE.match(v)] == []
    with torch.no_grad():
        model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == COUNTS[config]
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "FeatureEnhanced":
        assert type(model).__name__ == "FE" + cfg.MODEL.FE.META_ARCHITECTURE
    else:
        assert type(model).__name__ == arch
    builder = cfg.MODEL.FE.BASE_BACKBONE if cfg.MODEL.BACKBONE.NAME == "build_fe_backbone" else cfg.MODEL.BACKBONE.NAME
    ups = getattr(model.backbone, "srf_module", None) or getattr(model.backbone, "srf_modules", None)
    assert (ups is not None) == ("_sr_backbone" in builder), builder
    if ups is not None:
        a = cfg.MODEL.AFI
        # One upsampler, or one per top-down step, of exactly the configured kind and options.
        assert isinstance(ups, torch.nn.ModuleDict) == (not a.SHARED)
        channels = cfg.MODEL.BIFPN.OUT_CHANNELS if "bifpn" in builder else cfg.MODEL.FPN.OUT_CHANNELS
        node, kwargs = upsampler_options(cfg, a.INTERP)
        one = sum(p.numel() for p in build_upsampler(a.INTERP, channels, **kwargs).parameters())
        if a.INTERP == "afi":
            assert one == sum(p.numel() for p in AFInterpolator(channels, a.NUM_BLOCKS, a.GROWTH).parameters())
        steps = 1 if a.SHARED else len(ups)
        assert sum(p.numel() for p in ups.parameters()) == one * steps


def test_every_runnable_config_writes_to_its_own_folder_and_toy_configs_fix_the_seed():
    runnable = [c for c in YAMLS if not os.path.basename(c).startswith("Base-")]
    dirs = {c: make_cfg(c).OUTPUT_DIR for c in runnable}
    assert all(d.startswith("output/") for d in dirs.values()), dirs
    assert len(set(dirs.values())) == len(dirs)  # no two configs share a folder
    assert [c for c in YAMLS if c.startswith("toy/") and make_cfg(c).SEED < 0] == []
