"""The package's import graph: no import cycle beyond the known one (torch autograd routed from
the core API), which the planned restructure (frameworks as a layer above the API) removes.

Every import statement counts, also one inside a function: a lazy import hides a cycle from
Python's import machinery but not from a reader."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cuflash"

def module_name(path: Path) -> str:
    """`cuflash/x.py` is "x", `cuflash/__init__.py` "__init__"; in a subpackage,
    `cuflash/bench/y.py` is "bench.y" and `cuflash/bench/__init__.py` "bench"."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if len(parts) > 1 and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, subpackages included (see `module_name`)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        # The package a relative import starts from ([] is cuflash itself).
        if path.stem != "__init__":
            here = name.split(".")[:-1]
        else:
            here = [] if name == "__init__" else name.split(".")
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or node.module == "cuflash"
                                                     or node.module.startswith("cuflash.")):
                if node.level:
                    base = ".".join([*here[:len(here) + 1 - node.level],
                                     *filter(None, [node.module])])
                else:
                    base = node.module.removeprefix("cuflash").removeprefix(".")
                for a in node.names:  # `from cuflash.bench import window` imports bench.window
                    sub = f"{base}.{a.name}" if base else a.name
                    deps.add(sub if sub in modules else base or "__init__")
            elif isinstance(node, ast.Import):
                deps |= {a.name.removeprefix("cuflash.") for a in node.names
                         if a.name.startswith("cuflash.")}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: set[frozenset[str]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == {frozenset({"a", "b", "c"})}


def test_the_package_has_no_import_cycle():
    """Every import counts, those inside functions too: a cycle there is a cycle of design."""
    graph = import_graph()
    assert {"api", "_core", "cuda._launch", "torch"} <= set(graph), "the graph must see the package"
    found = cycles(graph)
    assert not found, f"import cycles: {sorted(map(sorted, found))}"


def test_only_the_mask_knows_the_diagonal():
    """The bottom-right shift (seqlen_k - seqlen_q) is written in attention/mask.cuh and, in
    Python, in cuflash/_variant.py (and the oracle, cuflash/reference.py with its
    _reference_mods.py) only: every kernel and path asks those for its mask."""
    import re

    root = Path(__file__).resolve().parent.parent
    shift = re.compile(r"seqlen_k\s*-\s*(p\.)?seqlen_q|\bsk\s*-\s*sq\b|\bdiag\b")
    allowed = {"kernels_cu/attention/mask.cuh", "cuflash/_variant.py", "cuflash/reference.py",
               "cuflash/_reference_mods.py"}
    sources = [*root.glob("kernels_cu/*/*.cu"), *root.glob("kernels_cu/*/*.cuh"),
               *root.glob("cuflash/**/*.py")]
    assert len(sources) > 20, "the test must see the sources"
    offenders = []
    for path in sources:
        name = path.relative_to(root).as_posix()
        if name in allowed:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if shift.search(line):
                offenders.append(f"{name}:{number}: {line.strip()}")
    assert not offenders, "a diagonal outside the mask:\n" + "\n".join(offenders)


def private_names_across_modules(root: Path = PACKAGE) -> list[str]:
    """Each use of another package module's private name (one leading underscore): imported
    (``from cuflash.x import _name``) or reached through a module (``x._name``, where x is a
    package module). Private *modules* (``cuflash._cpu``) are fine: their names are what they
    share."""
    found = []
    for path in root.rglob("*.py"):
        name = path.relative_to(root).with_suffix("").as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = set()  # local names bound to package modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(
                    "cuflash")):
                # the package the names come from: a private module there is fine
                base = root.joinpath(*(node.module or "").split(".")[1:])
                for a in node.names:
                    private = a.name.startswith("_") and not a.name.startswith("__")
                    if private and not (base / f"{a.name}.py").exists() and not (
                            base / a.name).is_dir():
                        found.append(f"{name}: from {node.module} import {a.name}")
                    modules.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                modules |= {a.asname or a.name.split(".")[-1] for a in node.names
                            if a.name.startswith("cuflash")}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in modules and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                found.append(f"{name}: {node.value.id}.{node.attr}")
    return found


def test_private_name_finder_finds_planted_uses(tmp_path):
    (tmp_path / "_helpers.py").write_text("def _secret():\n    return 1\n\n\ndef open_():\n"
                                          "    return 2\n")
    (tmp_path / "user.py").write_text("from cuflash import _helpers\n"
                                      "from cuflash._helpers import _secret, open_\n\n\n"
                                      "def f():\n    return _helpers._secret() + open_()\n")
    found = private_names_across_modules(tmp_path)
    assert sorted(found) == ["user: _helpers._secret",
                             "user: from cuflash._helpers import _secret"]


def test_no_private_names_across_modules():
    """A name another module needs is part of its module's interface: no leading underscore."""
    assert len(list(PACKAGE.rglob("*.py"))) > 20, "the test must see the package"
    found = private_names_across_modules()
    assert not found, "private names used across modules:\n" + "\n".join(sorted(set(found)))
