"""scripts/setup_env.py (what `make setup`, `make quickstart` and `make test` run first; issue 25, item 0).

Nothing is installed: the script runs with ``python -S`` over a fake site folder (distribution metadata
and empty top-level packages), so what counts as installed is exactly what a test puts there, and
``PIP`` is a fake pip that records its arguments and exits with the status a test asks for.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "setup_env.py")
D2_GIT = "git+https://github.com/facebookresearch/detectron2.git"

FAKE_PIP = """
import json, os, sys
with open(os.environ["FAKE_PIP_LOG"], "a") as f:
    f.write(json.dumps({"args": sys.argv[1:], "cwd": os.getcwd()}) + "\\n")
print("ERROR: fake pip says no")
sys.exit(int(os.environ.get("FAKE_PIP_STATUS", "0")))
"""


def _declared():
    """install_requires + the test and vis extras, read from setup.py by the script's own reader."""
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        from check_dependencies import requirement_name, setup_requirements
    finally:
        sys.path.pop(0)
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        requires, extras = setup_requirements(f.read())
    return sorted({requirement_name(r) for r in requires + extras["test"] + extras["vis"]} - {None})


def add_dist(site, name, module=None, url=None):
    """A fake installed distribution: its metadata, and an empty package ``module`` for find_spec."""
    info = site / f"{name.replace('-', '_')}-99.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 99.0\n")
    if url:
        (info / "direct_url.json").write_text(json.dumps({"dir_info": {"editable": True}, "url": url}))
    if module:
        (site / module).mkdir(exist_ok=True)
        (site / module / "__init__.py").write_text("")


@pytest.fixture
def env(tmp_path):
    """(site folder with everything installed, environment for the script, pip log). Tests remove
    what they want missing."""
    site = tmp_path / "site"
    site.mkdir()
    for name in set(_declared()) - {"torch", "torchvision"}:
        add_dist(site, name)
    add_dist(site, "torch", "torch")
    add_dist(site, "torchvision", "torchvision")
    add_dist(site, "detectron2", "detectron2")
    add_dist(site, "afigan", "afigan", url="file://" + REPO)
    (tmp_path / "fake_pip.py").write_text(FAKE_PIP)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("git", "c++"):  # present unless a test takes them away
        (bin_dir / tool).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / tool).chmod(0o755)
    environ = {
        "PATH": str(bin_dir),
        "PYTHONPATH": str(site),
        "PIP": f"{sys.executable} -S {tmp_path / 'fake_pip.py'}",
        "FAKE_PIP_LOG": str(tmp_path / "pip.log"),
        "TMPDIR": str(tmp_path),
    }
    return site, environ, tmp_path / "pip.log"


def remove(site, name, module=None):
    shutil.rmtree(next(site.glob(f"{name.replace('-', '_')}-*.dist-info")))
    if module:
        shutil.rmtree(site / module)


def run(environ, **extra):
    out = subprocess.run(
        [sys.executable, "-S", SCRIPT], env={**environ, **extra}, capture_output=True, text=True, timeout=120
    )
    return out


def pip_calls(log):
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def one_sentence(text: str) -> str:
    line = text.strip()
    assert "\n" not in line and line.startswith("setup: ") and line.endswith("."), text
    return line


def test_everything_installed_is_a_no_op(env):
    site, environ, log = env
    out = run(environ)
    assert out.returncode == 0, out.stderr
    assert pip_calls(log) == []
    assert out.stdout == (
        "setup: nothing to install: torch 99.0, torchvision 99.0, detectron2 99.0, afigan 99.0 with [test,vis] "
        f"are in {sys.executable}.\n"
    )
    assert out.stderr == ""


def test_local_detectron2_checkout_is_built_with_the_installed_torch(env, tmp_path):
    site, environ, log = env
    remove(site, "detectron2", "detectron2")
    d2 = tmp_path / "d2"
    (d2 / "detectron2").mkdir(parents=True)
    (d2 / "setup.py").write_text("")
    (d2 / "detectron2" / "__init__.py").write_text("")
    out = run(environ, D2_SRC=str(d2))
    assert out.returncode == 0, out.stderr
    assert pip_calls(log) == [{"args": ["install", "--no-build-isolation", str(d2)], "cwd": REPO}]
    assert out.stdout.splitlines() == [
        f"setup: installing Detectron2 from {d2} (it is not on the package index; built against this torch, "
        "a few minutes)"
    ]


def test_detectron2_from_github_without_d2_src(env):
    site, environ, log = env
    remove(site, "detectron2", "detectron2")
    out = run(environ)
    assert out.returncode == 0, out.stderr
    assert pip_calls(log) == [{"args": ["install", "--no-build-isolation", D2_GIT], "cwd": REPO}]


def test_missing_torch_installs_the_tested_pair_or_torch_spec(env):
    site, environ, log = env
    remove(site, "torchvision", "torchvision")
    out = run(environ)
    assert out.returncode == 0, out.stderr
    # (the fake pip installs nothing, so afigan's step then finds torchvision missing too)
    assert out.stdout.splitlines()[0] == (
        "setup: installing torch==2.14.1 torchvision==0.29.1 (torchvision missing; the versions this project is "
        "tested with, TORCH_SPEC overrides)"
    )
    spec = "torch torchvision --index-url https://download.pytorch.org/whl/cpu"
    out = run(environ, TORCH_SPEC=spec)
    assert [c["args"] for c in pip_calls(log)][::2] == [
        ["install", "torch==2.14.1", "torchvision==0.29.1"],
        ["install", "torch", "torchvision", "--index-url", "https://download.pytorch.org/whl/cpu"],
    ]


def test_afigan_with_a_missing_extra_or_from_another_checkout_is_reinstalled_here(env, tmp_path):
    site, environ, log = env
    remove(site, "onnxruntime")
    out = run(environ)
    assert out.returncode == 0, out.stderr
    assert (
        out.stdout == "setup: installing afigan from this checkout, editable, with .[test,vis] (onnxruntime missing)\n"
    )
    remove(site, "afigan", "afigan")
    add_dist(site, "onnxruntime")
    add_dist(site, "afigan", "afigan", url="file://" + str(tmp_path / "elsewhere"))
    out = run(environ)
    assert f"comes from {tmp_path / 'elsewhere'}, not from this checkout" in out.stdout
    assert pip_calls(log) == [{"args": ["install", "-e", ".[test,vis]"], "cwd": REPO}] * 2


def test_another_opencv_build_is_kept(env):
    """opencv-python and opencv-python-headless clash: where the first is installed, it serves."""
    site, environ, log = env
    remove(site, "opencv-python-headless")
    add_dist(site, "opencv-python")
    assert run(environ).returncode == 0 and pip_calls(log) == []
    remove(site, "ruff")
    out = run(environ)
    assert out.returncode == 0, out.stderr
    assert pip_calls(log) == [{"args": ["install", "-e", ".", "pytest", "onnx", "onnxruntime", "ruff"], "cwd": REPO}]


def test_a_failing_pip_stops_with_one_sentence(env, tmp_path):
    site, environ, log = env
    remove(site, "torch", "torch")
    remove(site, "detectron2", "detectron2")
    out = run(environ, FAKE_PIP_STATUS="1")
    assert out.returncode == 1
    line = one_sentence(out.stderr)
    assert line.startswith("setup: installing PyTorch failed (pip exit status 1: ERROR: fake pip says no); ")
    logs = list(tmp_path.glob("afigan-setup-*.log"))
    assert line.endswith(f"pip's output is in {logs[0]}.") and len(logs) == 1
    assert len(pip_calls(log)) == 1  # Detectron2 is not tried after torch failed


def test_no_network_is_named(env, tmp_path):
    site, environ, log = env
    remove(site, "detectron2", "detectron2")
    noisy = tmp_path / "noisy_pip.py"
    noisy.write_text(
        "import sys\nprint(\"fatal: unable to access 'https://github.com/': Could not resolve host\")\nsys.exit(1)\n"
    )
    out = run(environ, PIP=f"{sys.executable} -S {noisy}")
    assert out.returncode == 1
    assert one_sentence(out.stderr).startswith(
        f"setup: installing Detectron2 failed (pip exit status 1: no network access); pip's output is in {tmp_path}"
    )


def test_d2_src_that_is_not_a_checkout_stops_before_pip(env, tmp_path):
    site, environ, log = env
    remove(site, "detectron2", "detectron2")
    out = run(environ, D2_SRC=str(tmp_path / "nowhere"))
    assert out.returncode == 1
    assert one_sentence(out.stderr) == (
        f"setup: D2_SRC={tmp_path / 'nowhere'} is not a Detectron2 checkout (no setup.py and detectron2/__init__.py "
        "there): point it at a clone of https://github.com/facebookresearch/detectron2, or unset it to install from "
        "GitHub."
    )
    assert pip_calls(log) == []


def test_no_compiler_stops_before_pip(env):
    site, environ, log = env
    remove(site, "detectron2", "detectron2")
    os.remove(os.path.join(environ["PATH"], "c++"))
    out = run(environ, CXX="no-such-compiler")
    assert out.returncode == 1
    assert one_sentence(out.stderr).startswith(
        "setup: building Detectron2 needs a C++ compiler and none of no-such-compiler, c++, g++, clang++ is on PATH"
    )
    assert pip_calls(log) == []


def test_makefile_runs_setup_first_then_the_quick_start_or_the_tests():
    if not shutil.which("make"):
        pytest.skip("make is not installed on this machine")

    def dry(target, *variables):
        out = subprocess.run(
            ["make", "-n", "-s", target, "PYTHON=py", *variables], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()

    assert dry("setup") == ["py scripts/setup_env.py"]
    # The quick start is the README's command, with the trailing overrides PIPELINE_OPTS gives.
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    command = re.search(r"^python (tools/pipeline\.py --config-dir configs/toy/quickstart .*)$", readme, re.M).group(1)
    assert [line.rstrip() for line in dry("quickstart")] == ["py scripts/setup_env.py", f"py {command}"]
    assert dry("quickstart", "PIPELINE_OPTS=SEED 3")[1] == f"py {command} SEED 3"
    assert dry("test") == ["py scripts/setup_env.py", "py -m pytest -q tests"]
