#!/usr/bin/env python
"""Does afigan import only what it declares? Checked on any machine, whatever happens to be installed.

Imports every module of ``afigan`` and every ``tools/*.py`` (as a module; ``main`` does not run) behind
an import guard that allows, at import time, only

* the standard library and afigan itself;
* afigan's ``install_requires`` (read from setup.py) and Detectron2 (a prerequisite built from
  source), with everything they declare in their installed metadata (``Requires-Dist``,
  transitively, no extras), top-level module names mapped to distributions with
  ``importlib.metadata.packages_distributions()``.

Any other top-level import raises ``ModuleNotFoundError`` naming the import chain, even when the
module is installed (OpenCV on a developer's machine). A direct import -- one made by afigan's own
code -- must be declared by afigan itself: ``yaml`` arriving through Detectron2 is not enough. Modules
of afigan's extras (``test``, ``vis``, ...) are declared, but only for imports inside the functions
that need them, so importing a module never needs an extra (training, the pipeline and evaluation
run without OpenCV).

    python scripts/check_dependencies.py            # afigan/ and tools/ against ./setup.py

Exit status 0 when every module imports, 1 with one report per offending import otherwise. Standard
library (and ``packaging``, which pip and pytest bring) only, so it runs before afigan is installed.
"""

import argparse
import ast
import builtins
import glob
import importlib
import importlib.abc
import importlib.metadata as metadata
import importlib.util
import os
import pkgutil
import re
import sys
import sysconfig
import traceback
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREREQUISITES = ("detectron2",)  # installed from source before afigan, never through pip's resolver
TOOL_PREFIX = "_afigan_tool_"


def normalize(name: str) -> str:
    """PEP 503 name: ``PyYAML`` -> ``pyyaml``, ``opencv_python`` -> ``opencv-python``."""
    return re.sub(r"[-_.]+", "-", name).lower()


# ---------------------------------------------------------------------------------------------- setup.py


def _literal(node: ast.AST, names: Dict[str, object]):
    """Value of a literal expression of setup.py, with module-level names and ``+`` of lists."""
    if isinstance(node, ast.Name):
        return names[node.id]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _literal(node.left, names) + _literal(node.right, names)
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e, names) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k, names): _literal(v, names) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def setup_requirements(source: str) -> Tuple[List[str], Dict[str, List[str]]]:
    """``(install_requires, extras_require)`` of a setup.py's text, read without running it."""
    tree = ast.parse(source)
    names: Dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                names[node.targets[0].id] = _literal(node.value, names)
            except (ValueError, KeyError, TypeError):
                pass  # not a literal (paths, the version): setup()'s requirement lists never use them
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            kw = {k.arg: k.value for k in node.keywords}
            requires = _literal(kw["install_requires"], names) if "install_requires" in kw else []
            extras = _literal(kw["extras_require"], names) if "extras_require" in kw else {}
            return list(requires), {k: list(v) for k, v in extras.items()}
    raise ValueError("setup.py has no setup(...) call")


# ------------------------------------------------------------------------------------ what is allowed


def requirement_name(spec: str) -> Optional[str]:
    """The distribution a requirement string names, or None when its marker rules it out here
    (an ``extra == ...`` marker always does: extras of dependencies are not followed)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - pip and pytest both bring packaging
        name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec).group(1)
        return None if ";" in spec and "extra" in spec.split(";", 1)[1] else name
    req = Requirement(spec)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        return None
    return req.name


def closure(requirements: Iterable[str]) -> Set[str]:
    """Normalized names of ``requirements`` and of everything their installed metadata requires."""
    seen: Set[str] = set()
    todo = [n for n in map(requirement_name, requirements) if n]
    while todo:
        name = normalize(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += [n for n in map(requirement_name, metadata.requires(name) or []) if n]
        except metadata.PackageNotFoundError:
            pass  # declared but not installed: importing it fails on its own
    return seen


def modules_by_distribution() -> Dict[str, Set[str]]:
    """Normalized distribution name -> the top-level modules it installs (packages_distributions(),
    plus the names its RECORD shows, for distributions whose top_level.txt leaves some out)."""
    out: Dict[str, Set[str]] = {}
    by_module = getattr(metadata, "packages_distributions", dict)()  # Python >= 3.10; RECORD below covers older
    for module, dists in by_module.items():
        for d in dists:
            out.setdefault(normalize(d), set()).add(module)
    for dist in metadata.distributions():
        tops = out.setdefault(normalize(dist.metadata["Name"] or ""), set())
        for f in dist.files or ():
            parts = f.parts
            if len(parts) > 1 and not parts[0].endswith((".dist-info", ".egg-info", ".data")) and parts[0] != "..":
                tops.add(parts[0])
            elif len(parts) == 1 and parts[0].endswith(".py"):
                tops.add(parts[0][:-3])
    return out


STDLIB_DIRS = sorted({sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib")})
STDLIB_DIRS += [os.path.join(d, "lib-dynload") for d in STDLIB_DIRS]


def stdlib_names() -> Set[str]:
    """The standard library's top-level modules, including the interpreter's private ones
    (``_sysconfigdata_*``, which sys.stdlib_module_names leaves out)."""
    names = set(sys.builtin_module_names) | set(getattr(sys, "stdlib_module_names", ()))
    return names | {m.name for m in pkgutil.iter_modules(STDLIB_DIRS)}


class Policy:
    """Which top-level module names may be imported, and why not when they may not."""

    def __init__(self, requires: Sequence[str], extras: Dict[str, Sequence[str]], own_packages: Sequence[str]):
        self.stdlib = stdlib_names()
        self.own = set(own_packages)
        tops = modules_by_distribution()

        def names(dists: Iterable[str]) -> Set[str]:
            return {m for d in dists for m in tops.get(d, ())}

        declared = {normalize(n) for n in map(requirement_name, requires) if n}
        self.direct = names(declared | {normalize(p) for p in PREREQUISITES})
        self.at_import = names(closure(list(requires) + list(PREREQUISITES)))
        self.extra_of: Dict[str, Set[str]] = {}  # module -> the extras that declare it
        for extra, specs in extras.items():
            for d in {normalize(n) for n in map(requirement_name, specs) if n} - declared:
                for m in names([d]) | {d.replace("-", "_")}:  # the name guessed where it is not installed
                    self.extra_of.setdefault(m, set()).add(extra)
        self.direct |= set(self.extra_of)
        self.providers = {m: d for d, ms in tops.items() for m in ms}

    def base(self, top: str) -> bool:
        return top in self.stdlib or top in self.own or top.startswith("__editable__")

    def at_import_problem(self, top: str) -> Optional[str]:
        """Why ``top`` may not be imported while a module loads (None: it may)."""
        if self.base(top) or top in self.at_import:
            return None
        if top in self.extra_of:
            return (
                f"comes only with afigan's extras [{', '.join(sorted(self.extra_of[top]))}], so no module may "
                "need it on import (import it inside the function that uses it)"
            )
        return "is declared neither by afigan nor by what afigan and Detectron2 require" + self._installed(top)

    def direct_problem(self, top: str) -> Optional[str]:
        """Why afigan's own code may not import ``top`` itself (None: it may)."""
        if self.base(top) or top in self.direct:
            return None
        via = " (it only arrives through another package's requirements)" if top in self.at_import else ""
        return (
            "is imported by afigan's own code but afigan does not declare it in setup.py" + via + self._installed(top)
        )

    def _installed(self, top: str) -> str:
        return f"; installed here from {self.providers[top]}, which does not count" if top in self.providers else ""


# --------------------------------------------------------------------------------------------- the guard


def _where(frame) -> str:
    name = frame.f_globals.get("__name__", "?")
    if name.startswith(TOOL_PREFIX):
        name = os.path.relpath(frame.f_code.co_filename, REPO)
    return f"{name}:{frame.f_lineno}"


def import_chain(top: str) -> str:
    """``tools/pipeline.py:14 -> afigan.engine.pipeline:20 -> ... -> top``: the module bodies being
    executed (outermost first) and the line that asked for ``top``."""
    frames = []
    f = sys._getframe(1)
    while f is not None:
        file = f.f_code.co_filename
        if not (file.startswith("<frozen") or file == __file__ or os.path.basename(file) == "pkgutil.py"):
            frames.append(f)
        f = f.f_back
    frames.reverse()
    links = [_where(f) for f in frames[:-1] if f.f_code.co_name == "<module>"]
    if frames:
        inner = frames[-1]
        links.append(_where(inner) + ("" if inner.f_code.co_name == "<module>" else f" in {inner.f_code.co_name}()"))
    return " -> ".join(links + [top])


def _probing() -> bool:
    """Is this importlib.util.find_spec asking whether a module exists (torch asks about optional
    packages this way and expects None, not an error)? A real import comes from _find_and_load."""
    f = sys._getframe(2)  # Guard.find_spec <- importlib._bootstrap._find_spec <- the asker
    while f is not None and f.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
        f = f.f_back
    file = f.f_code.co_filename if f is not None else ""
    return f.f_code.co_name == "find_spec" and (
        file == "<frozen importlib.util>" or file.endswith(os.path.join("importlib", "util.py"))
    )


class Guard(importlib.abc.MetaPathFinder):
    """First on sys.meta_path (first imports of a module) and around builtins.__import__ (every
    import statement of afigan's own code, cached modules included)."""

    def __init__(self, policy: Policy, own_dirs: Sequence[str]):
        self.policy = policy
        self.own_dirs = tuple(os.path.realpath(d) + os.sep for d in own_dirs)
        self.problems: List[Tuple[str, str, str, bool]] = []  # (module, why, chain, by own code)
        self._own_file: Dict[str, bool] = {}
        self._import = builtins.__import__

    def install(self):
        sys.meta_path.insert(0, self)
        builtins.__import__ = self._guarded_import

    def is_own(self, file: Optional[str]) -> bool:
        if not file:
            return False
        if file not in self._own_file:
            self._own_file[file] = os.path.realpath(file).startswith(self.own_dirs)
        return self._own_file[file]

    def _deny(self, top: str, why: str, own: bool):
        chain = import_chain(top)
        self.problems.append((top, why, chain, own))
        raise ModuleNotFoundError(f"{top} {why}: {chain}", name=top)

    def find_spec(self, fullname, path=None, target=None):
        if "." not in fullname and not _probing():
            why = self.policy.at_import_problem(fullname)
            if why:
                self._deny(fullname, why, False)
        return None  # allowed: the other finders find it (or not)

    def _guarded_import(self, name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and globals is not None and self.is_own(globals.get("__file__")):
            why = self.policy.direct_problem(name.partition(".")[0])
            if why:
                self._deny(name.partition(".")[0], why, True)
        return self._import(name, globals, locals, fromlist, level)


# ------------------------------------------------------------------------------------------ the check


def package_modules(package: str) -> List[str]:
    """``package`` and every module under it (pkgutil.walk_packages; subpackages that fail to
    import are imported again, and reported, by the caller)."""
    pkg = importlib.import_module(package)
    names = [package]
    for info in pkgutil.walk_packages(pkg.__path__, package + ".", onerror=lambda name: None):
        names.append(info.name)
    return names


def import_file(path: str):
    """``path`` as a module named ``_afigan_tool_<stem>`` (so ``if __name__ == "__main__"`` stays false)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(TOOL_PREFIX + stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(spec.name, None)
        raise


def run_check(guard: Guard, packages: Sequence[str], files: Sequence[str]) -> Tuple[int, List[str]]:
    """Import everything; ``(number imported, failures)``: one entry per offending import (its
    chain, and the modules that did not import because of it), then any other import error."""
    failed: Dict[str, str] = {}  # what -> error
    count = 0
    targets: List[Tuple[str, str]] = []
    for package in packages:
        try:
            targets += [("module", m) for m in package_modules(package)]
        except BaseException as e:  # noqa: BLE001 - the package itself does not import: report it
            failed[package] = _error(e)
    targets += [("file", f) for f in files]
    for kind, what in targets:
        label = os.path.relpath(what, REPO) if kind == "file" else what
        try:
            if kind == "module":
                importlib.import_module(what)
            else:
                import_file(what)
            count += 1
        except BaseException as e:  # noqa: BLE001 - SystemExit at import time is a failure too
            failed[label] = _error(e)
    reports: List[str] = []
    grouped: Dict[Tuple[str, str], List[str]] = {}
    for top, why, chain, own in guard.problems:
        site = chain.rsplit(" -> ", 2)[-2] if " -> " in chain else chain
        grouped.setdefault((top, why, site), []).append(chain)
    for (top, why, site), chains in grouped.items():
        victims = sorted(k for k, err in failed.items() if any(c in err for c in chains))
        own = any(o for t, w, c, o in guard.problems if c in chains)
        if not victims and not own:
            continue  # another package's optional import, which it caught: it works without it
        lines = [f"{top} {why}:", f"    {chains[0]}"]
        if victims:
            lines.append(f"    so these do not import: {', '.join(victims)}")
        else:
            lines.append("    (the importer caught the error; afigan's own code must not need it all the same)")
        reports.append("\n".join(lines))
    guarded = {c for chains in grouped.values() for c in chains}
    for label, err in failed.items():
        if not any(c in err for c in guarded):
            reports.append(f"{label} does not import: {err}")
    return count, reports


def _error(e: BaseException) -> str:
    """The exception in one line, and where it was raised (not in the guard or importlib)."""
    text = "".join(traceback.format_exception_only(type(e), e)).strip()
    frames = [
        f
        for f in traceback.extract_tb(e.__traceback__)
        if f.filename != __file__ and not f.filename.startswith("<frozen")
    ]
    return text + (f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else "")


# --------------------------------------------------------------------------------------- static check


def static_imports(paths: Iterable[str]) -> List[Tuple[str, int, str]]:
    """``(file, line, top-level module)`` of every absolute import statement in ``paths`` (.py
    files), at module level or inside functions alike; nothing is imported."""
    out = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                out += [(path, node.lineno, a.name.partition(".")[0]) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                out.append((path, node.lineno, node.module.partition(".")[0]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", default=os.path.join(REPO, "setup.py"), help="the setup.py whose requirements count")
    p.add_argument("--package", action="append", help="import it and all its modules (default: afigan)")
    p.add_argument("--tools", default="tools/*.py", help="scripts to import as modules (a glob; '' for none)")
    p.add_argument("--own", action="append", help="a folder of afigan's own code (default: afigan, tools)")
    p.add_argument("--path", action="append", default=[], help="put this folder first on sys.path")
    args = p.parse_args(argv)
    with open(args.setup, encoding="utf-8") as f:
        requires, extras = setup_requirements(f.read())
    packages = args.package or ["afigan"]
    files = sorted(glob.glob(os.path.join(REPO, args.tools))) if args.tools else []
    own_dirs = args.own or [os.path.join(REPO, "afigan"), os.path.join(REPO, "tools")]
    sys.path[:0] = args.path + [REPO]  # this checkout's afigan, not another installed copy
    guard = Guard(Policy(requires, extras, [p.partition(".")[0] for p in packages]), own_dirs)
    guard.install()
    count, reports = run_check(guard, packages, files)
    if reports:
        print(
            f"check_dependencies: {len(reports)} problem(s) importing {', '.join(packages)} and {len(files)} file(s):"
        )
        print("\n".join(reports))
        return 1
    print(
        f"check_dependencies: {count} modules and tools import with only what {os.path.relpath(args.setup)} declares."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
