"""Every command of README.md, datasets/README.md and docs/*.md runs as a user would paste it.

The ```bash blocks are executed in order, in one scratch working directory (``configs/`` and
``tools/`` linked from the repository, everything else made by the commands themselves), each in
its own process, so a renamed flag, a missing file, a wrong path or an output an earlier command
did not write fails here. Training commands get trailing ``KEY VALUE`` overrides that cut them to a
few iterations (the study gets its own budget flag, its budgets override trailing keys), benchmarks
run at their smallest settings; ``pip install`` lines and the test commands are skipped by name.
A command that cannot run on a CPU machine without COCO is listed in :data:`CANNOT_RUN` with the
reason; its config and overrides are still loaded and its flags checked against the tool. A
third-party warning on a command's console fails it too. Each ```python block runs as a script in
the same directory, and every Markdown table must render (a header separator row).
"""

import contextlib
import functools
import glob
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
from unittest import mock

import pytest
from d2_helpers import REPO

pytestmark = pytest.mark.slow

# Pages in the order a reader (and this test) goes through them: later pages use the outputs of
# earlier ones (the quick start's models, the toy data set).
PAGES = [
    "README.md",
    "datasets/README.md",
    "docs/training.md",
    "docs/deploy.md",
    "docs/upsamplers.md",
    "docs/detectors.md",
    "docs/self_training_tta.md",
    "docs/feature_enhancement.md",
    "docs/config_keys.md",
    "docs/results.md",
    "docs/performance.md",
    "docs/differences_from_reference.md",
]

# Commands not run, by what they start with: installing is the user's business, and the test
# commands would run this test again.
SKIPPED_BY_NAME = (("pip", "install"), ("python", "-m", "pytest"), ("make", "test"))

# Commands a CPU machine without COCO cannot run: (a distinctive part of the command, reason).
CANNOT_RUN = [
    ("--num-gpus 8", "needs 8 GPUs and COCO"),
    ("my_retinanet.yaml", "stands for the user's own config file"),
    ("datasets/coco/", "needs COCO"),
    ("weights/AFI-GAN_", "needs the authors' released weights"),
    ("output/fcos_R_50_FPN_afi/", "evaluates the 8-GPU COCO run above"),
    ("--device cuda", "needs a CUDA GPU"),
]

# Trailing overrides that cut a training run to a few iterations; they come last, so they win.
SHORT_TRAINING = [
    "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)", "SOLVER.WARMUP_ITERS", "0",
    "SOLVER.CHECKPOINT_PERIOD", "100", "TEST.EVAL_PERIOD", "0",
]  # fmt: skip
# After 2 iterations the stage-3 model scores nothing above the self-training threshold, and
# training on no pseudo-label stops (one sentence): keep every detection for the test.
EXTRA = {"pipeline.py": ["SELF_TRAINING.SCORE_THRESHOLD", "0.0"]}
TRAINING_TOOLS = ("pipeline.py", "stage1_train.py", "stage2_train.py", "stage3_train.py", "run_net.py")

# The smallest settings of the tools that measure or study: flag -> values replacing the command's.
SMALLEST = {
    # 128 px: stage 2 halves the teacher's P6, which a 64-px image makes 1 px high.
    "benchmark_necks.py": {"--size": ["128", "128"], "--repeats": ["1"], "--necks": ["FPN"], "--kinds": ["afi"]},
    "benchmark_training.py": {"--size": ["128"], "--iters": ["3"]},
    "benchmark_upsamplers.py": {"--repeats": ["1"], "--p2": ["16", "16"]},
    # The reference-size R-50 at 64 px, one kind: two exports and three runtimes, timed once.
    "benchmark_export.py": {"--size": ["64"], "--repeats": ["1"], "--kinds": ["afi"]},
    # --iters 5: Detectron2's timer skips 3 warm-up iterations; module rows are tests/benchmark's job.
    "benchmark_roofline.py": {
        "--sizes": ["128"],
        "--repeats": ["1"],
        "--iters": ["5"],
        "--stages": ["stage3"],
        "--parts": ["steps"],
    },
    # Its own budget flag (its budgets override trailing keys), one seed: the full study's other
    # seeds are the same runs again.
    "study.py": {
        "--max-iter": ["2", "2", "2", "2"],
        "--fidelity-images": ["4"],
        "--seeds": ["0"],
        "--curve-iters": ["4"],
        "--curve-period": ["2"],
        "--curve-kinds": ["afi"],
        "--adv-weights": [],
        "--second-seed": ["off"],
        "--probe-images": ["2"],
        "--resamples": ["20"],
    },
    "lazy_train_net.py": {},
}

# A warning printed by a library on a command's console: Python's warnings ("path:line: XWarning:")
# from outside afigan, and glog lines of torch's C++ core ("W1206 13:16:44.123 ...").
PY_WARNING = re.compile(r"(?P<path>/\S+\.py):\d+: \w*Warning: ")
GLOG_WARNING = re.compile(r"^[WE]\d{4} \d\d:\d\d:\d\d", re.M)


def _blocks(page):
    """``[(language, line number, body)]`` of the fenced blocks of ``page``."""
    out, lang, start, body = [], None, 0, []
    for i, line in enumerate(open(os.path.join(REPO, page), encoding="utf-8").read().split("\n"), 1):
        if lang is None and line.startswith("```"):
            lang, start, body = line[3:].strip(), i, []
        elif lang is not None and line.startswith("```"):
            out.append((lang, start, "\n".join(body)))
            lang = None
        elif lang is not None:
            body.append(line)
    return out


def _commands():
    """``(page:line, "bash" | "python", argv or source)`` of every command, in reading order."""
    out = []
    for page in PAGES:
        for lang, start, body in _blocks(page):
            if lang == "python":
                out.append((f"{page}:{start}", "python", body))
            elif lang == "bash":
                for offset, line in enumerate(body.replace("\\\n", " ").split("\n"), 1):
                    argv = shlex.split(line, comments=True)
                    if argv:
                        out.append((f"{page}:{start + offset}", "bash", argv))
    return out


COMMANDS = _commands()


def _cannot_run(argv):
    text = " ".join(argv)
    return next((reason for part, reason in CANNOT_RUN if part in text), None)


def _replace_flags(argv, values):
    """``argv`` without the flags of ``values`` (and their values), then those flags with ``values``."""
    out, skipping = [], False
    for tok in argv:
        if tok.startswith("-"):
            skipping = tok in values
        if not skipping:
            out.append(tok)
    for flag, vals in values.items():
        out += [flag, *vals]
    return out


def _as_run(argv):
    """The command line this test runs for the documented ``argv``."""
    if argv[:2] == ["make", "quickstart"]:
        return argv + ["PIPELINE_OPTS=" + shlex.join(SHORT_TRAINING + EXTRA["pipeline.py"])]
    if argv[0] != "python" or len(argv) < 2:
        return argv
    tool = os.path.basename(argv[1])
    if tool in SMALLEST:
        argv = _replace_flags(argv, SMALLEST[tool])
        if tool == "lazy_train_net.py":
            argv = argv + ["train.max_iter=2", "train.eval_period=0"]
    elif tool in TRAINING_TOOLS and "--eval-only" not in argv:
        argv = argv + SHORT_TRAINING + EXTRA.get(tool, [])
    return ["python" if argv[0] == "python" else argv[0], *argv[1:]]


def _third_party_warnings(console):
    found = [m.group(0) for m in GLOG_WARNING.finditer(console)]
    for m in PY_WARNING.finditer(console):
        path = m.group("path")
        if not (path.startswith(os.path.join(REPO, "afigan")) or "/afigan/" in path or path.startswith("tools/")):
            found.append(m.group(0))
    return found


# What a clone holds besides the commands' own outputs (output/, datasets/afigan_toy*, ...).
CLONE = ("afigan", "configs", "tools", "scripts", "Makefile", "setup.py", "pyproject.toml", "README.md", "docs")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A fresh working directory laid out like a clone of the repository (its files linked), with
    no outputs and no data sets yet."""
    pytest.importorskip("detectron2")
    root = tmp_path_factory.mktemp("docs_commands")
    for name in CLONE:
        os.symlink(os.path.join(REPO, name), root / name)
    (root / "datasets").mkdir()
    return root


def _env():
    env = dict(os.environ, MPLBACKEND="Agg")
    env.pop("PYTHONWARNINGS", None)  # Python's default filters, as on a user's console
    env.pop("DETECTRON2_DATASETS", None)  # data sets are found under ./datasets, as for a new user
    return env


@functools.lru_cache(maxsize=None)
def _tool_flags(tool):
    """The flags ``python tools/<tool> --help`` lists (run in this process: the imports are made)."""
    out = io.StringIO()
    argv = [os.path.join(REPO, "tools", tool), "--help"]
    with mock.patch.object(sys, "argv", argv), contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        runpy.run_path(os.path.join(REPO, "tools", tool), run_name="__main__")
    assert done.value.code in (0, None), f"tools/{tool} --help failed:\n{out.getvalue()}"
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", out.getvalue()))


def _check_without_running(argv):
    """What can be checked of a command that cannot run here: the tool's flags and its config."""
    from afigan.config import load_config

    tool = os.path.basename(argv[1])
    flags = {tok for tok in argv[2:] if tok.startswith("--")}
    unknown = flags - _tool_flags(tool)
    assert not unknown, f"tools/{tool} has no flag {sorted(unknown)}"
    if "--config-file" in argv and argv[argv.index("--config-file") + 1].startswith("configs/"):
        config = argv[argv.index("--config-file") + 1]  # (not a placeholder such as my_retinanet.yaml)
        assert os.path.isfile(os.path.join(REPO, config)), f"{config} does not exist"
        if config.endswith(".yaml"):
            # Overrides after the flags; values that are paths of files made by the run are fine.
            rest = argv[2:]
            opts = [
                tok
                for i, tok in enumerate(rest)
                if not tok.startswith("--") and (i == 0 or not rest[i - 1].startswith("--"))
            ]
            load_config(os.path.join(REPO, config), opts)


@pytest.mark.parametrize("where, kind, command", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_command_runs(where, kind, command, scratch):
    if kind == "python":
        script = scratch / "snippet.py"
        script.write_text(command)
        argv = [sys.executable, str(script)]
    else:
        if any(tuple(command[: len(p)]) == p for p in SKIPPED_BY_NAME):
            pytest.skip(f"{where}: `{' '.join(command)}` is skipped by name (installing, or the tests themselves)")
        reason = _cannot_run(command)
        if reason:
            _check_without_running(command)
            return
        argv = _as_run(command)
        if argv[0] == "python":
            argv = [sys.executable, *argv[1:]]
    run = subprocess.run(argv, cwd=scratch, env=_env(), capture_output=True, text=True, timeout=900)
    console = run.stdout + run.stderr
    assert run.returncode == 0, f"{where}: `{' '.join(argv)}` exited {run.returncode}:\n{console[-4000:]}"
    warnings = _third_party_warnings(console)
    assert not warnings, f"{where}: `{' '.join(argv)}` printed third-party warnings: {warnings}"


def test_every_page_with_commands_is_read():
    pages = {os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md"))}
    with_commands = {p for p in pages if any(lang in ("bash", "python") for lang, _, _ in _blocks(p))}
    assert with_commands <= set(PAGES), f"add {sorted(with_commands - set(PAGES))} to PAGES"


def test_cannot_run_lists_only_what_the_pages_have():
    texts = [" ".join(c) for _, kind, c in COMMANDS if kind == "bash"]
    unused = [part for part, _ in CANNOT_RUN if not any(part in t for t in texts)]
    assert not unused, f"CANNOT_RUN entries no command has: {unused}"


@pytest.mark.parametrize("page", PAGES)
def test_tables_render(page):
    """A Markdown table renders only with a separator row (|---|) right under its header."""
    lines = open(os.path.join(REPO, page), encoding="utf-8").read().split("\n")
    in_code = False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            in_code = not in_code
        starts_table = line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|"))
        if not in_code and starts_table:
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            assert re.match(r"^\|(\s*:?-{3,}:?\s*\|)+\s*$", nxt), f"{page}:{i + 2}: the table has no |---| row"


def test_a_command_that_cannot_run_is_still_checked():
    """A renamed flag, a config that does not exist or an unknown key fails the static check."""
    good = ["python", "tools/run_net.py", "--num-gpus", "8", "--config-file", "configs/toy/pipeline/stage3.yaml"]
    _check_without_running(good + ["SOLVER.MAX_ITER", "5"])
    with pytest.raises(AssertionError, match=r"tools/run_net.py has no flag \['--num-gpu'\]"):
        _check_without_running(["python", "tools/run_net.py", "--num-gpu", "8"])
    with pytest.raises(AssertionError, match="configs/toy/nothing.yaml does not exist"):
        _check_without_running(["python", "tools/run_net.py", "--config-file", "configs/toy/nothing.yaml"])
    with pytest.raises(KeyError, match="unknown config key SOLVER.MAX_ITERS; did you mean SOLVER.MAX_ITER"):
        _check_without_running(good + ["SOLVER.MAX_ITERS", "5"])
