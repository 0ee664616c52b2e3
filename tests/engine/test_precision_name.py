"""What a run computes in, as the pipeline's console line names it (SOLVER.AMP on CPU and CUDA)."""

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from d2_helpers import make_cfg  # noqa: E402

from afigan.engine import amp  # noqa: E402


@pytest.mark.parametrize(
    "enabled, precision, device, bf16_kernels, expected",
    [
        (False, "float16", "cpu", True, "float32"),
        (True, "float16", "cpu", True, "bfloat16 autocast"),  # float16 on a CPU means bfloat16
        (True, "bfloat16", "cpu", False, "float32"),  # no bfloat16 kernels: float32, with a warning
        (True, "float16", "cuda", False, "float16 autocast with gradient scaling"),
        (True, "bfloat16", "cuda", False, "bfloat16 autocast"),
        (False, "bfloat16", "cuda", True, "float32"),
    ],
)
def test_precision_name(monkeypatch, enabled, precision, device, bf16_kernels, expected):
    monkeypatch.setattr(amp, "cpu_supports_bfloat16", lambda: bf16_kernels)
    cfg = make_cfg(None, "SOLVER.AMP.ENABLED", enabled, "SOLVER.AMP.PRECISION", precision)
    assert amp.precision_name(cfg, torch.device(device)) == expected
    # The policy the trainers use computes in the dtype the name says.
    if device == "cpu":
        policy = amp.AMPPolicy(cfg, torch.device(device))
        assert policy.enabled == (expected != "float32")


def test_unknown_precision_is_one_sentence():
    cfg = make_cfg(None, "SOLVER.AMP.ENABLED", True, "SOLVER.AMP.PRECISION", "float8")
    with pytest.raises(ValueError, match=r"^SOLVER.AMP.PRECISION must be 'float16' or 'bfloat16', got 'float8'\.$"):
        amp.precision_name(cfg, torch.device("cpu"))
