"""The import graph of hsl/, cli/ (hsl_cli) and data/ (hsl_data), read with `ast`, nothing imported.

An edge is every `import` / `from ... import` a module runs: at module level and inside functions
(a lazy import is still a dependency, and a cycle hidden behind one is still a cycle). Imports under
`if TYPE_CHECKING:` are left out: they never run, they only name types for a checker.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"hsl": "hsl", "hsl_cli": "cli", "hsl_data": "data"}  # import name -> folder (pyproject's package-dir)


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the three packages."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            found[".".join([package, *(p for p in parts if p != "__init__")])] = path
    return found


def _runs(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """The import statements of a module that can run: everything but `if TYPE_CHECKING:` bodies."""
    out: list[ast.Import | ast.ImportFrom] = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            out += [n for child in node.orelse for n in _runs(ast.Module(body=[child], type_ignores=[]))]
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            out.append(node)
        out += _runs(node)
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str | None]]:
    """(project module, imported name or None) for each project import of one module."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: list[tuple[str, str | None]] = []
    for node in _runs(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
            continue
        base = package[: len(package) - node.level + 1] if node.level else []
        module = ".".join(base + ([node.module] if node.module else []))
        for alias in node.names:  # `from . import x` imports module x; `from m import x` a name of m
            submodule = f"{module}.{alias.name}"
            found.append((submodule, None) if submodule in known else (module, alias.name))
    return [(module, imported) for module, imported in found if module in known and module != name]


def graph() -> tuple[dict[str, set[str]], list[str]]:
    """(module -> the project modules it imports, 'a imports b._x' for each private name imported)."""
    known = modules()
    edges: dict[str, set[str]] = {name: set() for name in known}
    private = []
    for name, path in known.items():
        for module, imported in imports(name, path, known):
            edges[name].add(module)
            if imported and imported.startswith("_") and not imported.startswith("__"):
                private.append(f"{name} imports {module}.{imported}")
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each a set of modules in a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(edges[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return groups


def test_the_graph_is_read():
    edges, _ = graph()
    assert {"hsl.extract", "hsl_cli.main", "hsl_data.sources"} <= set(edges)
    assert "hsl.store" in edges["hsl.extract_base"]  # a module-level import
    assert "hsl.devices" in edges["hsl.search"]  # a lazy import, inside a function
    assert "hsl.extract" not in edges["hsl"]  # under TYPE_CHECKING: never runs


def test_no_import_cycle():
    edges, _ = graph()
    assert cycles(edges) == []


def test_no_module_imports_another_modules_private_names():
    _, private = graph()
    assert private == []


def test_a_cycle_and_a_private_import_are_found(tmp_path: Path):
    """The checks themselves: a two-module cycle through a lazy import, and a private name."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    (tmp_path / "a.py").write_text("def f():\n    from .b import _helper\n", encoding="utf-8")
    known = {"p.a": tmp_path / "a.py", "p.b": tmp_path / "b.py"}
    assert imports("p.a", tmp_path / "a.py", known) == [("p.b", "_helper")]


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def error_strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string in an error the module raises or builds (a call to a ...Error)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        builds_error = (isinstance(node, ast.Call) and isinstance(node.func, ast.Name | ast.Attribute)
                        and (getattr(node.func, "id", None) or node.func.attr).endswith("Error"))
        if isinstance(node, ast.Raise) or builds_error:
            found += [(inner.lineno, inner.value) for inner in ast.walk(node)
                      if isinstance(inner, ast.Constant) and isinstance(inner.value, str)]
    return found


def flags_in_errors(path: Path) -> list[str]:
    """'file:line --flag' for each CLI flag in the text of an error the module raises or builds: the library
    says which parameter was wrong as data (hsl/errors.py), and each front end words it with its own names."""
    return sorted({f"{path.name}:{line} {flag}" for line, text in error_strings(path) for flag in FLAG.findall(text)})


def test_no_cli_flag_in_a_library_error():
    found = [hit for path in sorted((ROOT / "hsl").glob("*.py")) for hit in flags_in_errors(path)]
    assert not found, f"library errors that name CLI flags: {found}"


def test_a_flag_in_an_error_is_found(tmp_path: Path):
    (tmp_path / "m.py").write_text('def f(k):\n    raise HSLUsageError(f"--top-k must be at least 1, not {k}")\n'
                                   'def g():\n    return StoreError("give another " "--store")\n'
                                   'def h():\n    raise HSLUsageError("`top_k` must be at least 1", "top_k")\n')
    assert flags_in_errors(tmp_path / "m.py") == ["m.py:2 --top-k", "m.py:4 --store"]
