"""afigan imports only what it declares (issue 25, item 1), on any machine.

scripts/check_dependencies.py imports every module of afigan and every tools/*.py in a subprocess
behind an import guard: only the standard library, afigan, its install_requires and Detectron2 with
what they declare in their installed metadata may load; a direct import (made by afigan's own
code) must be declared by afigan itself. The guard is proven on a throw-away package with the
requirements afigan declared before this check (commit 9768d68): PyYAML and OpenCV undeclared.
"""

import ast
import glob
import importlib.util
import os
import re
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "check_dependencies.py")


def _load_checker():
    spec = importlib.util.spec_from_file_location("check_dependencies", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


checker = _load_checker()


@pytest.fixture(scope="module")
def by_dist():
    """Distribution -> its top-level modules (reading every installed RECORD takes seconds: once)."""
    return checker.modules_by_distribution()


# setup()'s requirement lists at commit 9768d68 (`git show 9768d68:setup.py`), before PyYAML,
# omegaconf and OpenCV were declared and while predict.py imported Detectron2's Visualizer on import.
OLD_SETUP_PY = """
setup(
    name="afigan",
    install_requires=["torch", "torchvision", "fvcore", "pycocotools", "timm", "numpy", "Pillow", "matplotlib", "tqdm"],
    extras_require={"test": ["pytest"], "plot": ["matplotlib"], "onnx": ["onnx", "onnxruntime"]},
)
"""


def run_checker(*args, timeout=300):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def afigan_module_count() -> int:
    """Modules of the package (every .py file, packages by their __init__) and tools/*.py."""
    files = glob.glob(os.path.join(REPO, "afigan", "**", "*.py"), recursive=True)
    return len(files) + len(glob.glob(os.path.join(REPO, "tools", "*.py")))


def test_every_module_and_tool_imports_with_only_declared_dependencies():
    pytest.importorskip("detectron2")
    out = run_checker()
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    count = int(re.search(r"check_dependencies: (\d+) modules and tools import", out.stdout).group(1))
    assert count == afigan_module_count()


@pytest.fixture
def probe(tmp_path):
    """A throw-away package standing for afigan's own code, and an OpenCV 'installed' on this
    machine (a cv2 module with its distribution's metadata, first on sys.path) that must not count."""
    pkg = tmp_path / "code" / "probe_pkg"
    pkg.mkdir(parents=True)
    files = {
        "__init__.py": "",
        "uses_yaml.py": "import yaml  # declared by Detectron2 and fvcore, not by the old setup.py\n",
        # the line afigan/analysis/predict.py had at the top until issue 25
        "draws.py": "from detectron2.utils.visualizer import Visualizer  # needs cv2\n",
        "optional.py": "try:\n    import cv2\nexcept ImportError:\n    cv2 = None\n",
        "lazy.py": "def draw():\n    import cv2\n\n    return cv2\n",
        "fine.py": "import numpy\nimport torch\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    site = tmp_path / "site"
    (site / "cv2").mkdir(parents=True)
    (site / "cv2" / "__init__.py").write_text("raise RuntimeError('the guard let the fake OpenCV load')\n")
    info = site / "opencv_python_headless-99.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: opencv-python-headless\nVersion: 99.0\n")
    (info / "top_level.txt").write_text("cv2\n")
    (info / "RECORD").write_text("cv2/__init__.py,,\n")
    return tmp_path, pkg


def run_on_probe(tmp_path, pkg, setup_py: str):
    (tmp_path / "setup.py").write_text(setup_py)
    return run_checker(
        "--setup",
        str(tmp_path / "setup.py"),
        "--package",
        "probe_pkg",
        "--tools",
        "",
        "--own",
        str(pkg),
        "--path",
        str(tmp_path / "site"),
        "--path",
        str(tmp_path / "code"),
    )


def problems(stdout: str):
    """{first line of each reported problem: its indented lines}."""
    out, key = {}, None
    for line in stdout.splitlines()[1:]:
        if line.startswith("    "):
            out[key].append(line.strip())
        else:
            key = line
            out[key] = []
    return out


def test_guard_fails_on_the_old_setup_py_even_with_opencv_installed(probe):
    pytest.importorskip("detectron2")
    out = run_on_probe(*probe, OLD_SETUP_PY)
    assert out.returncode == 1, out.stdout + out.stderr[-3000:]
    found = problems(out.stdout)
    yaml_line = (
        "yaml is imported by afigan's own code but afigan does not declare it in setup.py (it only arrives "
        "through another package's requirements); installed here from pyyaml, which does not count:"
    )
    assert found[yaml_line] == ["probe_pkg.uses_yaml:1 -> yaml", "so these do not import: probe_pkg.uses_yaml"]
    cv2_undeclared = (
        "cv2 is declared neither by afigan nor by what afigan and Detectron2 require; "
        "installed here from opencv-python-headless, which does not count:"
    )
    assert re.fullmatch(r"probe_pkg\.draws:1 -> detectron2\.utils\.visualizer:\d+ -> cv2", found[cv2_undeclared][0])
    assert found[cv2_undeclared][1] == "so these do not import: probe_pkg.draws"
    # A direct import that the importer catches is still reported: afigan's code may not rely on it.
    cv2_direct = (
        "cv2 is imported by afigan's own code but afigan does not declare it in setup.py; "
        "installed here from opencv-python-headless, which does not count:"
    )
    assert found[cv2_direct] == [
        "probe_pkg.optional:2 -> cv2",
        "(the importer caught the error; afigan's own code must not need it all the same)",
    ]
    assert len(found) == 3, out.stdout  # lazy.py (never called) and fine.py pass


def test_guard_keeps_optional_extras_out_of_import_time(probe):
    """With today's setup.py, yaml is declared and cv2 comes with the vis (and test) extra: importing a
    module still must not need it, as predict.py did before issue 25 (the pipeline imports it)."""
    pytest.importorskip("detectron2")
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        out = run_on_probe(*probe, f.read())
    assert out.returncode == 1, out.stdout + out.stderr[-3000:]
    found = problems(out.stdout)
    extra_only = (
        "cv2 comes only with afigan's extras [test, vis], so no module may need it on import "
        "(import it inside the function that uses it):"
    )
    assert list(found) == [extra_only], out.stdout
    assert re.fullmatch(r"probe_pkg\.draws:1 -> detectron2\.utils\.visualizer:\d+ -> cv2", found[extra_only][0])
    assert found[extra_only][1] == "so these do not import: probe_pkg.draws"


def _setup():
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        return checker.setup_requirements(f.read())


def test_extras_keep_their_names_and_test_brings_what_the_suite_and_ci_use():
    requires, extras = _setup()
    assert {"PyYAML", "omegaconf", "matplotlib", "tqdm", "torch", "torchvision"} <= set(requires)
    assert extras["vis"] == ["opencv-python-headless"]
    assert extras["test"] == ["pytest", "onnx", "onnxruntime", "ruff", "opencv-python-headless"]
    assert extras["plot"] == ["matplotlib"] and extras["onnx"] == ["onnx", "onnxruntime"]
    assert not any("opencv" in r for r in requires)  # training, the pipeline and evaluation never need it


def _skipped_by_name(tree):
    """Modules that ``pytest.importorskip("name")`` asks for (imports too, written as calls)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip" and node.args:
            yield node.lineno, node.args[0].value.partition(".")[0]


def test_every_module_imported_anywhere_is_declared(by_dist):
    """Read from the source (nothing is imported), function-level imports too: every top-level module
    that afigan/, tools/, configs/ (LazyConfig files) and tests/ name is the standard library, afigan,
    Detectron2, a test helper, or comes from a distribution that setup.py declares (install_requires
    or an extra)."""
    requires, extras = _setup()
    declared = {checker.normalize(n) for n in map(checker.requirement_name, requires + sum(extras.values(), [])) if n}
    provided = {m for d in declared for m in by_dist.get(d, ())} | {d.replace("-", "_") for d in declared}
    # Modules of this checkout imported by name: the tests' helpers, and scripts/ (test_setup_env.py).
    local = glob.glob(os.path.join(REPO, "tests", "**", "*.py"), recursive=True) + glob.glob(
        os.path.join(REPO, "scripts", "*.py")
    )
    helpers = {os.path.splitext(os.path.basename(p))[0] for p in local}
    allowed = checker.stdlib_names() | provided | helpers | {"afigan", "detectron2"}
    files = [
        p
        for folder in ("afigan", "tools", "configs", "tests")
        for p in glob.glob(os.path.join(REPO, folder, "**", "*.py"), recursive=True)
    ]
    found = checker.static_imports(files)
    for path in glob.glob(os.path.join(REPO, "tests", "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as f:
            found += [(path, line, name) for line, name in _skipped_by_name(ast.parse(f.read()))]
    undeclared = sorted(
        f"{os.path.relpath(p, REPO)}:{line} imports {name}" for p, line, name in found if name not in allowed
    )
    assert not undeclared, "undeclared in setup.py:\n" + "\n".join(undeclared)
    assert {"yaml", "omegaconf", "onnxruntime", "onnx"} <= {name for _, _, name in found}  # the check sees them


def test_old_setup_py_fails_the_static_check_too(by_dist):
    """The same rule, applied to the requirement lists of 9768d68, names what was missing."""
    requires, extras = checker.setup_requirements(OLD_SETUP_PY)
    declared = {checker.normalize(n) for n in requires + sum(extras.values(), [])}
    provided = {m for d in declared for m in by_dist.get(d, ())} | {d.replace("-", "_") for d in declared}
    names = {
        name
        for _, _, name in checker.static_imports(glob.glob(os.path.join(REPO, "afigan", "**", "*.py"), recursive=True))
    }
    names |= {
        name
        for _, _, name in checker.static_imports(glob.glob(os.path.join(REPO, "configs", "**", "*.py"), recursive=True))
    }
    missing = names - provided - checker.stdlib_names() - {"afigan", "detectron2"}
    assert {"yaml", "omegaconf"} <= missing


def test_setup_requirements_reads_names_and_sums_of_lists():
    text = textwrap.dedent(
        """
        import os
        VIS = ["opencv-python-headless"]
        here = os.path.dirname(__file__)
        setup(name="x", install_requires=["a>=1", "b"], extras_require={"vis": VIS, "test": ["pytest"] + VIS})
        """
    )
    assert checker.setup_requirements(text) == (
        ["a>=1", "b"],
        {"vis": ["opencv-python-headless"], "test": ["pytest", "opencv-python-headless"]},
    )
