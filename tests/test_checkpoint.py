import os

import pytest
import torch

pytest.importorskip("detectron2")

from conftest import load_listing, random_state_dict  # noqa: E402
from d2_helpers import make_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from afigan.checkpoint import AFICheckpointer, PartialLoad, load_interpolator_weights  # noqa: E402

RELEASED = {
    "mask_rcnn_R_50_FPN_afi.json": "inference/AFI-GAN_maskrcnn_R_50_FPN.yaml",
    "mask_rcnn_R_50_PAFPN_afi.json": "inference/AFI-GAN_maskrcnn_R_50_PAFPN.yaml",
    "cascade_mask_rcnn_ResNeSt101_FPN_afi.json": "inference/AFI-GAN_cascade_mask_rcnn_ResNeSt101_FPN.yaml",
    "cascade_mask_rcnn_ResNeSt101_PAFPN_afi.json": "inference/AFI-GAN_cascade_mask_rcnn_ResNeSt101_PAFPN.yaml",
    "cascade_rcnn_swin_BiFPN_afi.json": "inference/AFI-GAN_cascade_rcnn_swint_BiFPN_ST.yaml",
}


@pytest.mark.parametrize("listing,config", sorted(RELEASED.items()))
def test_released_layout_loads_with_zero_missing_and_unexpected_keys(listing, config):
    torch.set_grad_enabled(False)
    try:
        model = build_model(make_cfg(config))
        sd = random_state_dict(load_listing(listing))
        ckpt = AFICheckpointer(model)
        incompatible = ckpt._load_model({"model": dict(sd)})
        assert incompatible.missing_keys == []
        assert incompatible.unexpected_keys == []
        assert incompatible.incorrect_shapes == []
        own = model.state_dict()
        assert set(own) == set(sd)
        for k in ("backbone.srf_module.Generators.0.3.0.weight", next(k for k in sd if "bottom_up" in k)):
            assert torch.equal(own[k], sd[k]), k
    finally:
        torch.set_grad_enabled(True)


@pytest.fixture(scope="module")
def toy_model():
    return build_model(make_cfg("toy/fpn_toy.yaml"))


def test_stage1_generator_file_as_model_weights_goes_into_srf_module(tmp_path, toy_model):
    g = {
        f"Generators.{k.split('Generators.', 1)[1]}": torch.randn_like(v)
        for k, v in toy_model.state_dict().items()
        if "srf_module" in k
    }
    path = str(tmp_path / "G.pth")
    torch.save({"model": g, "iteration": 3}, path)
    before = {k: v.clone() for k, v in toy_model.state_dict().items() if "srf_module" not in k}
    AFICheckpointer(toy_model).load(path)
    sd = toy_model.state_dict()
    for k, v in g.items():
        assert torch.equal(sd["backbone.srf_module." + k], v)
    for k, v in before.items():
        assert torch.equal(sd[k], v), k


def test_load_interpolator_weights_copies_only_interpolator(tmp_path, toy_model):
    other = build_model(make_cfg("toy/fpn_toy.yaml"))
    path = str(tmp_path / "stage2.pth")
    torch.save({"model": other.state_dict(), "iteration": 10}, path)
    before = {k: v.clone() for k, v in toy_model.state_dict().items()}
    loaded = load_interpolator_weights(toy_model, path)
    after = toy_model.state_dict()
    assert sorted(loaded) == sorted(k for k in after if k.startswith("backbone.srf_module."))
    for k in after:
        if k in loaded:
            assert torch.equal(after[k], other.state_dict()[k]), k
        else:
            assert torch.equal(after[k], before[k]), k


def test_missing_weights_file_is_one_sentence(tmp_path, toy_model):
    with pytest.raises(FileNotFoundError, match=r"MODEL.AF_EXTRACTOR_WEIGHTS: file '.*nope.pth' does not exist"):
        load_interpolator_weights(toy_model, str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match=r"Checkpoint file '.*nope.pth' does not exist"):
        AFICheckpointer(toy_model).load(str(tmp_path / "nope.pth"))


def test_wrong_shaped_interpolator_tensor_names_key_and_expected_shape(tmp_path, toy_model):
    sd = {k: v.clone() for k, v in toy_model.state_dict().items()}
    sd["backbone.srf_module.Generators.0.0.0.bias"] = torch.zeros(256)
    path = str(tmp_path / "bad.pth")
    torch.save({"model": sd}, path)
    c = toy_model.backbone.srf_module.channels
    with pytest.raises(ValueError, match=rf"'Generators.0.0.0.bias'.*shape \[256\].*expects \[{c}\]"):
        load_interpolator_weights(toy_model, path)
    with pytest.raises(
        ValueError, match=rf"'backbone.srf_module.Generators.0.0.0.bias' has shape \[256\].*expects \[{c}\]"
    ):
        AFICheckpointer(toy_model).load(path)


def test_file_without_interpolator_is_rejected(tmp_path, toy_model):
    path = str(tmp_path / "plain.pth")
    torch.save({"model": {"backbone.fpn_lateral2.weight": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match="contains no interpolator tensors"):
        load_interpolator_weights(toy_model, path)


class _KilledWhilePickled:
    """Pickling this object writes part of the file, then raises as a kill would."""

    def __reduce__(self):
        raise KeyboardInterrupt


class _Dies(torch.nn.Module):
    """A model whose state dict cannot be written once ``die`` is set."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.arange(6.0))
        self.die = False

    def get_extra_state(self):
        return _KilledWhilePickled() if self.die else {}

    def set_extra_state(self, state):
        pass


def test_checkpointer_saves_atomically(tmp_path):
    model = _Dies()
    ckpt = AFICheckpointer(model, save_dir=str(tmp_path))
    ckpt.save("model_0000001", iteration=1)
    assert open(tmp_path / "last_checkpoint").read() == "model_0000001.pth"
    good = (tmp_path / "model_0000001.pth").read_bytes()
    # A kill in the middle of writing the same file: the old file and last_checkpoint survive.
    model.die = True
    with torch.no_grad():
        model.weight.add_(1)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_0000001", iteration=2)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_0000002", iteration=2)
    assert (tmp_path / "model_0000001.pth").read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]  # no partial or temporary file
    assert open(tmp_path / "last_checkpoint").read() == "model_0000001.pth"
    # And what was written holds the weights of that time.
    saved = torch.load(tmp_path / "model_0000001.pth", weights_only=False)
    assert saved["iteration"] == 1 and torch.equal(saved["model"]["weight"], torch.arange(6.0))


# ---------------------------------------------------------------- the upsampler tag, partial loads


def test_every_save_of_a_model_with_an_upsampler_records_its_kind_and_layout(tmp_path, toy_model):
    AFICheckpointer(toy_model, save_dir=str(tmp_path / "det")).save("model_final", iteration=3)
    saved = torch.load(tmp_path / "det" / "model_final.pth", weights_only=False)
    assert saved["upsampler"] == {"kind": "afi", "shared": True} and saved["iteration"] == 3
    AFICheckpointer(_Dies(), save_dir=str(tmp_path / "plain")).save("model_final")
    assert "upsampler" not in torch.load(tmp_path / "plain" / "model_final.pth", weights_only=False)


@pytest.mark.parametrize(
    "tag, held",
    [({"kind": "carafe", "shared": True}, "shared 'carafe'"), ({"kind": "afi", "shared": False}, "per-level 'afi'")],
)
def test_a_file_tagged_with_another_kind_or_layout_stops_before_anything_loads(tmp_path, toy_model, tag, held):
    # The tensors fit the model key for key: only the tag tells that they are of another kind.
    path = str(tmp_path / "other.pth")
    torch.save({"model": {k: torch.zeros_like(v) for k, v in toy_model.state_dict().items()}, "upsampler": tag}, path)
    before = {k: v.clone() for k, v in toy_model.state_dict().items()}
    with pytest.raises(ValueError) as e:
        AFICheckpointer(toy_model).load(path)
    assert str(e.value) == (
        f"{path!r} holds a {held} upsampler but the config asks for a shared 'afi' one; use the MODEL.AFI.INTERP / "
        "MODEL.AFI.SHARED it was trained with (resuming: or start in a new OUTPUT_DIR)."
    )
    assert all(torch.equal(v, before[k]) for k, v in toy_model.state_dict().items())
    # The same file without a tag (written before checkpoints carried one) loads whole.
    torch.save({"model": torch.load(path, weights_only=False)["model"]}, path)
    ckpt = AFICheckpointer(toy_model)
    ckpt.load(path)
    assert ckpt.last_incompatible.missing_keys == [] and ckpt.last_incompatible.unexpected_keys == []
    assert all(not v.any() for k, v in toy_model.state_dict().items() if v.is_floating_point())
    with torch.no_grad():  # the module-scoped model back as it was
        for k, v in toy_model.state_dict().items():
            v.copy_(before[k])


def _records(caplog, level):
    return [r for r in caplog.records if r.levelno == level]


def test_a_partial_load_is_one_line_and_the_next_load_expects_nothing(tmp_path, toy_model, caplog):
    import logging

    sd = {k: v.clone() for k, v in toy_model.state_dict().items() if "srf_module" not in k}
    sd["roi_heads.extra_head.weight"] = torch.zeros(2)
    path = str(tmp_path / "teacher_like.pth")
    torch.save({"model": sd}, path)
    partial = PartialLoad("the test detector", missing_ok=("backbone.srf_module",), unused_ok=("roi_heads.extra",))
    with caplog.at_level(logging.INFO):
        AFICheckpointer(toy_model).load(path, partial=partial)
    lines = [r.getMessage() for r in _records(caplog, logging.INFO) if r.name == "afigan.checkpoint"]
    srf = sum(1 for k in toy_model.state_dict() if "srf_module" in k)
    total = len(toy_model.state_dict())
    assert lines == [
        f"Loaded {total - srf} of {total} tensors of the test detector from {path}; left at their initialisation: "
        f"backbone.srf_module.* ({srf}); not used from the file: roi_heads.* (1)."
    ]
    assert _records(caplog, logging.WARNING) == []
    # The same checkpointer, the same file, no declaration: fvcore's lists, nothing left of the last call.
    caplog.clear()
    ckpt = AFICheckpointer(toy_model)
    for declared in (partial, None):
        with caplog.at_level(logging.INFO):
            ckpt.load(path, partial=declared)
    warned = " ".join(r.getMessage() for r in _records(caplog, logging.WARNING))
    assert "backbone.srf_module" in warned and "roi_heads.extra_head.weight" in warned
    # A declaration that does not cover what is missing is partial by accident: loud as well.
    caplog.clear()
    with caplog.at_level(logging.INFO):
        ckpt.load(path, partial=PartialLoad("the test detector", unused_ok=("roi_heads.extra",)))
    assert "backbone.srf_module" in " ".join(r.getMessage() for r in _records(caplog, logging.WARNING))
