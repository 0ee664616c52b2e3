#!/usr/bin/env python
"""Install into the active Python what afigan's quick start and tests need; leave alone what is there.

    python scripts/setup_env.py        (what `make setup`, `make quickstart` and `make test` run first)

In order, each step only when what it installs is missing (checked from the installed metadata and
the import system, not by asking pip):

1. PyTorch and torchvision: ``TORCH_SPEC`` (default ``torch==2.14.1 torchvision==0.29.1``, the pair this
   project is tested with; anything pip accepts, e.g. with ``--index-url`` for a CUDA build).
2. Detectron2, which is not on the package index: built from its git repository (``D2_GIT``), or from a
   local checkout given as ``D2_SRC`` (machines that cannot reach GitHub), against the torch of step 1
   (``--no-build-isolation``); it needs a C++ compiler.
3. afigan from this checkout, editable, with the extras the tests and the demo's drawings use:
   ``pip install -e ".[test,vis]"``.

Each install prints one line saying what and why; pip's own output goes to a log file. A failing step
stops with one sentence on stderr (exit status 1). ``PIP`` replaces the pip command (default: this
Python's ``-m pip``). Standard library only: it runs before anything is installed.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from importlib.util import find_spec
from typing import List, Optional, Sequence
from urllib.parse import unquote, urlparse

# realpath: run through a linked copy of the checkout, it still means this checkout.
REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_dependencies import normalize, requirement_name, setup_requirements  # noqa: E402

TORCH_SPEC = "torch==2.14.1 torchvision==0.29.1"
D2_GIT = "git+https://github.com/facebookresearch/detectron2.git"
EXTRAS = ("test", "vis")
# Every distribution that installs `cv2`: any of them serves the `vis` extra. Installing
# opencv-python-headless beside another one breaks both, so afigan's step then leaves it out.
OPENCV = ("opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless")


class StepFailed(Exception):
    """One sentence saying which step failed and what to do."""


def version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def importable(dist: str, module: str) -> bool:
    """Installed (metadata) and found by the import system (not half-removed)."""
    return version(dist) is not None and find_spec(module) is not None


def satisfied(spec: str) -> bool:
    """Is requirement ``spec`` installed (in a version it accepts, where packaging can tell)?"""
    name = requirement_name(spec)
    if name is None:
        return True  # its marker rules it out here
    if normalize(name) in OPENCV:
        return any(version(d) for d in OPENCV)
    found = version(name)
    if found is None:
        return False
    try:
        from packaging.requirements import Requirement
    except ImportError:  # before anything is installed there is no packaging; presence is enough
        return True
    return Requirement(spec).specifier.contains(found, prereleases=True)


def afigan_requirements() -> List[str]:
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        requires, extras = setup_requirements(f.read())
    return requires + [r for extra in EXTRAS for r in extras.get(extra, [])]


def afigan_source() -> Optional[str]:
    """The folder the installed afigan was installed from (its direct_url.json), if any."""
    try:
        text = metadata.distribution("afigan").read_text("direct_url.json") or ""
    except metadata.PackageNotFoundError:
        return None
    url = json.loads(text).get("url", "") if text else ""
    return os.path.realpath(unquote(urlparse(url).path)) if url.startswith("file://") else None


# ------------------------------------------------------------------------------------------------ steps


def torch_step() -> Optional[List[str]]:
    missing = [d for d in ("torch", "torchvision") if not importable(d, d)]
    if not missing:
        return None
    spec = os.environ.get("TORCH_SPEC") or TORCH_SPEC
    why = f"{' and '.join(missing)} missing; the versions this project is tested with, TORCH_SPEC overrides"
    say(f"installing {spec} ({why})")
    return ["install", *shlex.split(spec)]


def detectron2_step() -> Optional[List[str]]:
    if importable("detectron2", "detectron2"):
        return None
    src = os.environ.get("D2_SRC")
    if src:
        src = os.path.abspath(os.path.expanduser(src))
        if not (
            os.path.isfile(os.path.join(src, "setup.py"))
            and os.path.isfile(os.path.join(src, "detectron2", "__init__.py"))
        ):
            raise StepFailed(
                f"D2_SRC={src} is not a Detectron2 checkout (no setup.py and detectron2/__init__.py there): point "
                "it at a clone of https://github.com/facebookresearch/detectron2, or unset it to install from GitHub."
            )
        where = src
    else:
        where = os.environ.get("D2_GIT") or D2_GIT
        if where.startswith("git+") and not shutil.which("git"):
            raise StepFailed(
                "installing Detectron2 from GitHub needs git, which is not on PATH: install git, or give a local "
                "checkout as D2_SRC=/path/to/detectron2."
            )
    compilers = [c for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c]
    if not any(shutil.which(c) for c in compilers):
        raise StepFailed(
            f"building Detectron2 needs a C++ compiler and none of {', '.join(compilers)} is on PATH: install one "
            "(e.g. apt-get install g++, or Xcode's command line tools) and run this again."
        )
    say(f"installing Detectron2 from {where} (it is not on the package index; built against this torch, a few minutes)")
    return ["install", "--no-build-isolation", where]


def afigan_step() -> Optional[List[str]]:
    extras = f".[{','.join(EXTRAS)}]"
    source = afigan_source()
    if version("afigan") is None:
        why = "afigan is not installed"
    elif source != os.path.realpath(REPO):
        why = f"the installed afigan comes from {source or 'elsewhere'}, not from this checkout"
    else:
        missing = [r for r in afigan_requirements() if not satisfied(r)]
        if not missing:
            return None
        why = f"{', '.join(missing)} missing"
    others = [d for d in OPENCV if version(d) and d != "opencv-python-headless"]
    if others:
        # Another OpenCV build already provides cv2: install the extras' other requirements by name.
        with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
            _, declared = setup_requirements(f.read())
        names = [r for e in EXTRAS for r in declared.get(e, []) if normalize(requirement_name(r) or "") not in OPENCV]
        say(f"installing afigan (editable) and {' '.join(dict.fromkeys(names))} ({why}; {others[0]} provides cv2)")
        return ["install", "-e", ".", *dict.fromkeys(names)]
    say(f"installing afigan from this checkout, editable, with {extras} ({why})")
    return ["install", "-e", extras]


# ------------------------------------------------------------------------------------------------- pip


def say(line: str):
    print(f"setup: {line}", flush=True)


def pip_command() -> List[str]:
    return shlex.split(os.environ["PIP"]) if os.environ.get("PIP") else [sys.executable, "-m", "pip"]


def reason(log: str) -> str:
    """Why pip failed, in a few words, from its output."""
    patterns = (
        (
            r"Could not resolve host|Temporary failure in name resolution|Failed to establish a new connection|"
            r"Network is unreachable|Could not fetch URL|unable to access 'http",
            "no network access",
        ),
        (r"No matching distribution found for (\S+)", "no matching distribution of {0} for this Python and platform"),
        (
            r"command '[^']*(?:gcc|g\+\+|c\+\+|clang|cc)' failed|unable to execute '[^']*(?:gcc|g\+\+|c\+\+)'|"
            r"No such file or directory: '(?:gcc|g\+\+|c\+\+|cc)'|Microsoft Visual C\+\+",
            "the C++ compiler is missing or failed",
        ),
        (r"No module named 'torch'", "the build does not see torch"),
    )
    for pattern, text in patterns:
        m = re.search(pattern, log)
        if m:
            return text.format(*m.groups())
    errors = [line.strip() for line in log.splitlines() if line.strip().lower().startswith("error")]
    return errors[-1].rstrip(".") if errors else "see its output"


def run_pip(args: Sequence[str], what: str):
    fd, log = tempfile.mkstemp(prefix="afigan-setup-", suffix=".log")
    with os.fdopen(fd, "w") as out:
        try:
            status = subprocess.call([*pip_command(), *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        except OSError as e:
            raise StepFailed(
                f"installing {what} failed: cannot run {' '.join(pip_command())} ({e.strerror})."
            ) from None
    if status != 0:
        with open(log, errors="replace") as f:
            why = reason(f.read())
        raise StepFailed(f"installing {what} failed (pip exit status {status}: {why}); pip's output is in {log}.")
    os.remove(log)


def main() -> int:
    steps = (("PyTorch", torch_step), ("Detectron2", detectron2_step), ("afigan", afigan_step))
    ran = False
    try:
        for what, step in steps:
            args = step()
            if args:
                run_pip(args, what)
                ran = True
    except StepFailed as e:
        print(f"setup: {e}", file=sys.stderr)
        return 1
    if not ran:
        parts = [f"{d} {version(d)}" for d in ("torch", "torchvision", "detectron2", "afigan")]
        say(f"nothing to install: {', '.join(parts)} with [{','.join(EXTRAS)}] are in {sys.executable}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
