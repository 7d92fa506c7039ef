"""The house rules of ../DESIGN.md that the import graph shows, checked from the source with ``ast``.

Every import counts: module level, inside functions and under ``TYPE_CHECKING``. A failure names the modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "monai_medplib"
# Front ends sit above the core: the CLI (``medplib serve`` starts the MONAI Label adapter, ``verify-parity`` runs
# the parity tooling), the adapters and the parity tooling. The core never imports any of them.
FRONT_ENDS = ("monai_medplib.cli", "monai_medplib.commands", "monai_medplib.adapters", "monai_medplib.parity")
MAX_ROOT_MODULES = 12


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Absolute names an ``import from`` refers to (the module, and ``module.name`` for each name)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{alias.name}" for alias in node.names]


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}`` over every ``.py`` file below ``root``."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                candidates = resolve(name, path.name == "__init__.py", node)
            else:
                continue
            edges.update(c for c in candidates if c in files and c != name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def is_package_init_edge(source: str, target: str) -> bool:
    # a package's __init__ re-exporting its own submodules is not a dependency of the package on itself
    return target.startswith(source + ".")


def test_the_checker_finds_cycles_and_resolves_relative_imports(tmp_path):
    pkg = tmp_path / "monai_medplib"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    graph = import_graph(pkg)
    assert graph["monai_medplib.a"] == {"monai_medplib.sub", "monai_medplib.sub.b"}
    assert graph["monai_medplib.sub.b"] == {"monai_medplib.a"}
    assert find_cycle(graph) == ["monai_medplib.a", "monai_medplib.sub.b", "monai_medplib.a"]
    (pkg / "sub" / "b.py").write_text("import typing\nif typing.TYPE_CHECKING:\n    import monai_medplib.a\n")
    assert find_cycle(import_graph(pkg)) is not None  # hidden behind TYPE_CHECKING still counts


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    full = import_graph()
    return {m: {t for t in ts if not is_package_init_edge(m, t)} for m, ts in full.items()}


def test_no_import_cycle(graph):
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_the_core_never_imports_a_front_end(graph):
    bad = sorted(
        f"{m} -> {t}"
        for m, targets in graph.items()
        if not m.startswith(FRONT_ENDS)
        for t in targets
        if t.startswith(FRONT_ENDS)
    )
    assert not bad, "the core imports a front end (CLI, adapter, parity):\n" + "\n".join(bad)


def test_adapters_and_parity_never_import_the_cli(graph):
    bad = sorted(
        f"{m} -> {t}"
        for m, targets in graph.items()
        if m.startswith(("monai_medplib.adapters", "monai_medplib.parity"))
        for t in targets
        if t.startswith(("monai_medplib.cli", "monai_medplib.commands"))
    )
    assert not bad, bad


def test_modeling_imports_neither_monai_nor_file_formats():
    forbidden = ("monai", "nibabel", "pydicom", "highdicom", "itk", "PIL", "safetensors")
    bad = []
    for path in (PACKAGE / "modeling").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            bad += [f"{path.name}: {n}" for n in names if n.split(".")[0] in forbidden]
    assert not bad, bad


def test_transforms_never_import_the_model(graph):
    bad = sorted(
        f"{m} -> {t}"
        for m, targets in graph.items()
        if m.startswith("monai_medplib.transforms")
        for t in targets
        if t.startswith(("monai_medplib.modeling", "monai_medplib.pipeline", "monai_medplib.checkpoint"))
    )
    assert not bad, bad


def test_the_pipeline_imports_only_downward(graph):
    order = [
        "options",
        "cache",
        "features",
        "results",
        "runner",
        "grounding",
        "keyframes",
        "image",
        "refinement",
    ]
    order += ["volume"]
    order += ["medplib"]
    rank = {f"monai_medplib.pipeline.{name}": n for n, name in enumerate(order)}
    up = sorted(
        f"{m} -> {t}"
        for m, targets in graph.items()
        if m in rank
        for t in targets
        if t in rank and rank[t] >= rank[m]
    )
    assert not up, "pipeline modules importing upward:\n" + "\n".join(up)


def test_special_tokens_imports_nothing():
    tree = ast.parse((PACKAGE / "special_tokens.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]


def test_at_most_twelve_modules_in_the_package_root():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= MAX_ROOT_MODULES, modules
