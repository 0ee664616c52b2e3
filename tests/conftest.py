import json
import os
import sys

import pytest
import torch

# Warnings raised inside third-party code (torch, numpy 2 via pycocotools and Detectron2's COCO
# evaluator, timm, Detectron2's logger) that afigan cannot fix; everything else stays visible.
THIRD_PARTY_WARNINGS = (
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning",
    "ignore:The 'warn' method is deprecated, use 'warning' instead:DeprecationWarning",
    "ignore:`torch.jit.script` is deprecated:FutureWarning",
    "ignore:Importing from timm.models.layers is deprecated:FutureWarning",
    "ignore:torch.meshgrid.* indexing argument:UserWarning",
)


# The shared helpers (d2_helpers, stage_helpers, ...) live beside this file; the tests sit in
# folders that mirror the package (tests/layers, tests/engine, ...) and import them by name.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    for line in THIRD_PARTY_WARNINGS:
        config.addinivalue_line("filterwarnings", line)


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
LISTINGS = os.path.join(FIXTURES, "official_state_dicts")


def load_listing(name: str) -> dict:
    """Key -> shape listing of a reference-implementation state dict (copied from shared/reference)."""
    with open(os.path.join(LISTINGS, name)) as f:
        return json.load(f)


def random_state_dict(listing: dict, seed: int = 0) -> dict:
    """Random tensors with the listed shapes (integer zero for num_batches_tracked)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in listing["state_dict_shapes"].items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(0, dtype=torch.long)
        else:
            out[key] = torch.randn(*shape, generator=g) if shape else torch.randn((), generator=g)
    return out


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _loggers_propagate():
    """Every test sees afigan's and Detectron2's log records in caplog: a run through the tools'
    set-up (Detectron2's setup_logger, in an earlier test or a module fixture) stops those loggers
    propagating to the root logger, where caplog listens."""
    import logging

    for name in ("afigan", "detectron2", "fvcore"):
        logging.getLogger(name).propagate = True
    yield


def clear_run_loggers():
    """Drop the logging handlers a tool run adds: Detectron2's setup_logger binds them to the
    streams of the test that ran it, which later tests do not capture. "afigan_pipeline": the
    pipeline's status lines (afigan/engine/pipeline.py), handler made once."""
    import logging

    from detectron2.utils import logger as d2_logger

    for name in ("detectron2", "d2", "fvcore", "afigan", "afigan_pipeline"):
        logging.getLogger(name).handlers.clear()
    d2_logger.setup_logger.cache_clear()


@pytest.fixture
def study():
    """Run tools/study.py in this process: ``study(*argv)`` calls its ``main``; the run's logging
    handlers are removed before and after."""
    import runpy

    clear_run_loggers()
    main = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "tools", "study.py"))["main"]
    yield lambda *argv: main([str(a) for a in argv])
    clear_run_loggers()


@pytest.fixture
def tool(capsys):
    """Run an entry point in this process as its ``__main__`` would: ``tool(main, *argv)`` with
    ``main`` one of ``stage1``..``stage3`` (tools/stage{N}_train.py), ``run_net`` or ``pipeline``;
    returns (exit status, stderr, stdout + stderr). Logging handlers the run adds (Detectron2's
    setup_logger binds them to this test's captured streams) are removed afterwards."""

    def run(main, *argv):
        from afigan.engine.cli import launch_stage

        clear_run_loggers()  # handlers of earlier tests write to streams this test does not capture

        argv = [str(a) for a in argv]
        try:
            if main == "pipeline":
                import runpy

                runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "tools", "pipeline.py"))["main"](argv)
            else:
                launch_stage({"run_net": "stage3"}.get(main, main), "", argv)
            code = 0
        except SystemExit as e:
            code = e.code
        except BaseException:  # a test's injected interruption: drop this run's output with it
            capsys.readouterr()
            raise
        out, err = capsys.readouterr()
        return code, err, out + err

    yield run
    clear_run_loggers()


def one_sentence_error(err: str) -> str:
    """The single ``Error: ...`` line an entry point prints for an input error (asserted to be
    exactly one line, one sentence, on stderr, with no traceback anywhere)."""
    lines = [l for l in err.splitlines() if l.startswith("Error: ")]
    assert len(lines) == 1, err[-2000:]
    sentence = lines[0][len("Error: ") :]
    assert sentence.endswith((".", "?")), sentence
    # One sentence: no full stop followed by a capitalised word inside it (paths and numbers aside).
    import re

    assert not re.search(r"[.?!] [A-Z][a-z]", sentence), sentence
    return sentence
