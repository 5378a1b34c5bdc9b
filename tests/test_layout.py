"""The code's layout rules (docs/architecture.md): no module imports another module's private
names, the modules' imports form no cycle (lazy, function-level imports included), and the
engine and the source modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "neuromerge"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names, line) of every ``neuromerge`` import in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "neuromerge":
            out.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names
                    if a.name.split(".")[0] == "neuromerge"]
    return out


def targets(module: str, names: list[str]) -> set[str]:
    """The modules an import statement loads: a submodule named in ``from pkg import sub``
    counts as that submodule."""
    out = set()
    for name in names or [""]:
        sub = f"{module}.{name}"
        out.add(sub if sub in MODULES else module)
    return {m for m in out if m in MODULES}


def test_no_module_imports_another_modules_private_names() -> None:
    found = []
    for name, path in MODULES.items():
        for module, names, line in imports(path):
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            if private and module != name:
                found.append(f"{path.relative_to(SRC)}:{line}: {module}.{private[0]}")
    assert not found, "private names imported across modules:\n" + "\n".join(found)


def test_imports_form_no_cycle() -> None:
    graph = {name: set().union(*(targets(m, ns) for m, ns, _ in imports(path))) - {name}
             for name, path in MODULES.items()}
    # the package root only re-exports; every import of a submodule runs it first anyway
    graph = {k: v - {"neuromerge"} for k, v in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_engine_functions_and_source_modules_stay_small() -> None:
    long_functions = []
    for path in (SRC / "engine").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > 80:
                    long_functions.append(f"engine/{path.name}: {node.name} ({n} lines)")
    assert not long_functions, long_functions
    # data modules (tables of tasks) may be longer: none is today
    big = [f"{p.relative_to(SRC)} ({n})" for p in SRC.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 400]
    assert not big, f"modules over 400 lines: {big}"
