import pickle

import pytest
import torch

pytest.importorskip("detectron2")

from d2_helpers import make_cfg  # noqa: E402

from afigan.modeling.meta_arch.teacher import build_guide_model  # noqa: E402

CFG = "toy/pipeline/stage1.yaml"


@pytest.fixture(scope="module")
def reference_state():
    torch.manual_seed(5)
    return build_guide_model(make_cfg(CFG), load_weights=False).state_dict()


def _check_loaded(teacher, state):
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())


def test_teacher_loads_detectron2_zoo_pkl_and_pth(tmp_path, reference_state):
    pkl = tmp_path / "zoo.pkl"
    with open(pkl, "wb") as f:  # Detectron2 model-zoo layout: numpy arrays, "__author__", head tensors too
        model = {k: v.numpy() for k, v in reference_state.items()}
        model["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(4, 8).numpy()
        pickle.dump({"model": model, "__author__": "Detectron2 Model Zoo"}, f)
    _check_loaded(build_guide_model(make_cfg(CFG, "MODEL.GUIDE_WEIGHTS", str(pkl))), reference_state)
    pth = tmp_path / "teacher.pth"
    torch.save({"model": reference_state}, pth)
    teacher = build_guide_model(make_cfg(CFG, "MODEL.GUIDE_WEIGHTS", str(pth)))
    _check_loaded(teacher, reference_state)
    teacher.train()  # a trainer calling .train() must not unfreeze the teacher's BN statistics
    assert not teacher.training


def test_teacher_checkpoint_that_does_not_fit_is_one_sentence(tmp_path, reference_state):
    pth = tmp_path / "other.pth"
    torch.save({"model": {k: v for k, v in reference_state.items() if "fpn_output" not in k}}, pth)
    with pytest.raises(ValueError, match=r"MODEL.GUIDE_WEIGHTS .* does not fit the teacher.*'backbone.fpn_output"):
        build_guide_model(make_cfg(CFG, "MODEL.GUIDE_WEIGHTS", str(pth)))


def test_teacher_returns_pyramid_for_a_named_image_key(reference_state):
    teacher = build_guide_model(make_cfg(CFG), load_weights=False)
    batch = [
        {
            "image": torch.randint(0, 255, (3, 100, 130), dtype=torch.uint8),
            "image_x0.5": torch.randint(0, 255, (3, 50, 65), dtype=torch.uint8),
        }
    ]
    hr, lr = teacher(batch, "image"), teacher(batch, "image_x0.5")
    assert list(hr) == ["p2", "p3", "p4", "p5", "p6"]
    assert hr["p2"].shape[-2:] == (32, 40) and lr["p2"].shape[-2:] == (16, 24)  # padded to /32
    assert not hr["p2"].requires_grad
