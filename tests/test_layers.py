"""The package's shape: one-way layers, no import circles, no module over 500 lines.

Imports are read from the source (nothing is imported), every one of them: module level,
inside functions and under ``TYPE_CHECKING``, because each ties two modules together for a
reader. The same rules as ``../shared/tools/import_cycles.py``, plus the layer order of
docs/architecture.md: a module imports only from its own part or from parts below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rlaif"
MAX_LINES = 500
# Bottom to top, as in docs/architecture.md. A module belongs to the longest prefix that names it.
LAYERS: list[tuple[str, ...]] = [
    ("rlaif.errors", "rlaif.yamlio", "rlaif.progress", "rlaif.resources", "rlaif.version"),
    ("rlaif.refusal",),
    ("rlaif.store", "rlaif.testing"),
    ("rlaif.backends",),
    ("rlaif.config",),
    ("rlaif.calls", "rlaif.sources"),
    ("rlaif.constitution", "rlaif.prompts"),
    ("rlaif.stages",),
    ("rlaif.export",),
    ("rlaif.train",),
    ("rlaif.evaluate",),
    ("rlaif.pipeline", "rlaif.report"),
    ("rlaif.cli",),
    ("rlaif",),  # the package root: the public API re-exported from every part
]


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the package folder ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The package modules that the module ``name`` (file ``path``) imports, anywhere in it."""
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            src = node.module or ""
            if node.level:
                src = ".".join(base[: len(base) - node.level + 1] + ([src] if src else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod
            targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in known else src for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph(root: Path) -> dict[str, set[str]]:
    files = modules(root)
    return {m: imports(p, m, set(files)) for m, p in files.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def layer(module: str, layers: list[tuple[str, ...]] = LAYERS) -> int | None:
    """The index in ``layers`` of the longest prefix naming ``module``, or None."""
    best: tuple[int, int] | None = None
    for i, prefixes in enumerate(layers):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    return best[0] if best else None


def upward(edges: dict[str, set[str]], layers: list[tuple[str, ...]] = LAYERS) -> list[str]:
    """Every import from a layer into a layer above it, and every module in no layer."""
    problems = [f"{m} is in no layer" for m in sorted(edges) if layer(m, layers) is None]
    for m, targets in sorted(edges.items()):
        for t in sorted(targets):
            lm, lt = layer(m, layers), layer(t, layers)
            if lm is not None and lt is not None and lt > lm:
                problems.append(f"{m} imports {t}, a layer above it")
    return problems


def test_no_import_circles() -> None:
    assert circles(graph(PACKAGE)) == []


def test_layers_import_only_downward() -> None:
    assert upward(graph(PACKAGE)) == []


def test_no_module_over_500_lines() -> None:
    long = {
        m: n
        for m, p in modules(PACKAGE).items()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}


def test_the_checks_catch_a_circle_and_an_upward_import(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("")
    (pkg / "low" / "a.py").write_text("def f():\n    from pkg.high import g  # lazy\n")
    (pkg / "high.py").write_text("from pkg.low.a import f\nfrom . import low\n")
    edges = graph(pkg)
    assert edges["pkg.high"] == {"pkg.low.a", "pkg.low"}
    assert circles(edges) == [["pkg.high", "pkg.low.a"]]
    layers = [("pkg.low",), ("pkg.high", "pkg")]
    assert upward(edges, layers) == ["pkg.low.a imports pkg.high, a layer above it"]
    assert upward(edges, [("pkg.low",)])[:2] == ["pkg is in no layer", "pkg.high is in no layer"]
