"""The package's import graph, read from the AST of every module (nothing is imported): no cycle,
no import against the layering ``tools -> engine -> modeling -> layers`` (``data`` beside
``modeling``), and no function-level import of an afigan module (the usual way to hide a cycle)."""

import ast
import os
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "afigan")

# Component -> rank. A module may import afigan modules of its own component or of a component of
# strictly lower rank; components of equal rank (data, modeling) do not import each other.
RANKS = {
    "afigan.layers": 0,
    "afigan.seeding": 0,
    "afigan.io": 0,  # the atomic writer: standard library only
    "afigan.quiet": 0,  # third-party notes the entry points filter: standard library only
    "afigan.config": 1,
    "afigan.checkpoint": 1,
    "afigan.data": 2,
    "afigan.modeling": 2,
    # Below engine: the pipeline writes its metrics plot with afigan.analysis.metrics.
    "afigan.analysis": 3,
    "afigan.engine": 4,
    "afigan.benchmark": 5,
    "afigan.registration": 6,
    "afigan": 7,  # the package's __init__
}


def _modules():
    """{module name: path} of every .py file of the package."""
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, REPO)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = path
    return out


MODULES = _modules()


def component(module: str) -> str:
    for name in sorted(RANKS, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    raise AssertionError(f"{module} belongs to no component of RANKS; add it there")


def _resolve(module: str, path: str, node: ast.ImportFrom):
    is_pkg = path.endswith("__init__.py")
    parts = module.split(".")
    base = parts if is_pkg else parts[:-1]
    if node.level:
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module
    return target


def imports_of(module: str, path: str):
    """[(imported afigan module, line, inside a function?)] of one module."""
    tree = ast.parse(Path(path).read_text(), path)
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            func = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name == "afigan" or alias.name.startswith("afigan."):
                        found.append((alias.name, child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(module, path, child)
                if target and (target == "afigan" or target.startswith("afigan.")):
                    for alias in child.names:
                        sub = f"{target}.{alias.name}"
                        found.append((sub if sub in MODULES else target, child.lineno, in_function))
            visit(child, func)

    visit(tree, False)
    return found


GRAPH = {m: imports_of(m, p) for m, p in MODULES.items()}


def test_every_module_is_placed_and_every_import_resolves():
    assert len(MODULES) > 40
    for module, imports in GRAPH.items():
        component(module)
        for target, line, _ in imports:
            assert target in MODULES, f"{module}:{line} imports {target}, which is not a module of the package"


def test_no_function_level_import_of_afigan_modules():
    bad = [f"{m}:{line} imports {t}" for m, imps in GRAPH.items() for t, line, in_func in imps if in_func]
    assert not bad, bad


def layering_violations(graph):
    """Imports of a component of equal or higher rank than the importing module's (own component excepted)."""
    bad = []
    for module, imports in graph.items():
        own = component(module)
        for target, line, _ in imports:
            other = component(target)
            if other != own and RANKS[other] >= RANKS[own]:
                bad.append(
                    f"{module}:{line} ({own}, rank {RANKS[own]}) imports {target} ({other}, rank {RANKS[other]})"
                )
    return bad


def find_cycle(edges):
    """One import cycle of ``{module: [imported modules]}`` as a list ending where it starts, or None."""
    state, stack = {}, []

    def dfs(m):
        state[m] = "open"
        stack.append(m)
        for t in edges.get(m, ()):
            if state.get(t) == "open":
                return stack[stack.index(t) :] + [t]
            if t not in state:
                found = dfs(t)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(edges):
        if m not in state:
            found = dfs(m)
            if found:
                return found
    return None


def test_imports_follow_the_layering():
    assert layering_violations(GRAPH) == []


def test_layers_never_import_detectron2():
    for module, path in MODULES.items():
        if component(module) in ("afigan.layers", "afigan.seeding"):
            tree = ast.parse(Path(path).read_text())
            names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
            names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
            assert not [n for n in names if n.split(".")[0] == "detectron2"], module


def test_no_import_cycle():
    edges = {m: sorted({t for t, _, _ in imps if t != m}) for m, imps in GRAPH.items()}
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)


def test_the_checker_sees_a_cycle_a_wrong_direction_and_a_function_level_import(tmp_path):
    # The rules above must be able to fail: the same walk and checks over hand-made bad modules.
    path = tmp_path / "bad.py"
    path.write_text("from afigan.engine import setup_cfg\n\ndef f():\n    import afigan.config\n")
    found = imports_of("afigan.layers.bad", str(path))
    assert found == [("afigan.engine", 1, False), ("afigan.config", 4, True)]
    assert len(layering_violations({"afigan.layers.bad": found})) == 2  # layers may import neither
    assert layering_violations({"afigan.engine.x": [("afigan.layers", 1, False)]}) == []
    assert layering_violations({"afigan.data.x": [("afigan.modeling", 1, False)]}) != []  # data beside modeling
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": ["c"], "d": ["a", "c"]}) is None
