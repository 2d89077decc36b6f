"""The import contract: llmkit's packages form layers, each importing only its own layer and
those below it, with no import cycle between packages or between files. Every import counts,
at module level or inside a function (a deferred import is still a dependency)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import llmkit

ROOT = Path(llmkit.__file__).parent
# Bottom first. "llmkit" is the package's own __init__ (the version); a top-level module is
# its own package (errors, net, memory, devices, __main__).
LAYERS = [
    {"llmkit", "errors", "net", "memory", "devices"},
    {"arch"},
    {"checkpoint", "kernels"},
    {"quant", "shard"},
    {"runtime"},
    {"bench", "serve"},
    {"recipe"},
    {"cli", "__main__"},
]
LAYER_OF = {package: i for i, layer in enumerate(LAYERS) for package in layer}


def module_name(path: Path, root: Path) -> str:
    parts = ("llmkit", *path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, is_package: bool) -> set[str]:
    """The llmkit modules `source` imports (`from a import b` counts as a.b when a.b is a
    module, else as a: the caller resolves against the modules that exist)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}
    return {name for name in found if name == "llmkit" or name.startswith("llmkit.")}


def module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """llmkit module -> the llmkit modules it imports (only names that are modules)."""
    files = {module_name(path, root): path for path in root.rglob("*.py")}
    graph = {}
    for module, path in files.items():
        named = imports_of(path.read_text(), module, path.name == "__init__.py")
        graph[module] = {name for name in named if name in files and name != module}
    return graph


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "llmkit"


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in graph.items():
        for target in targets:
            if package(module) not in LAYER_OF or package(target) not in LAYER_OF:
                unplaced = package(module) if package(module) not in LAYER_OF else package(target)
                bad.append(f"{module}: the package {unplaced!r} has no layer in LAYERS")
            elif LAYER_OF[package(target)] > LAYER_OF[package(module)]:
                bad.append(f"{module} imports {target}, a layer above it")
    return sorted(set(bad))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages = defaultdict(set)
    for module, targets in graph.items():
        packages[package(module)] |= {package(t) for t in targets} - {package(module)}
    return dict(packages)


def without_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Files only: a package's __init__ importing its own modules is not a file cycle."""
    inits = {m for m in graph if (ROOT / Path(*m.split(".")[1:]) / "__init__.py").exists()}
    return {m: t - inits for m, t in graph.items() if m not in inits}


def test_every_package_has_a_layer_and_imports_only_downwards():
    assert layering_violations(module_graph()) == []


def test_no_import_cycle_between_packages():
    assert cycles(package_graph(module_graph())) == []


def test_no_import_cycle_between_files():
    assert cycles(without_package_inits(module_graph())) == []


def test_the_contract_catches_an_upward_import_and_a_cycle(tmp_path):
    """The same checks on a copy of the tree with one forbidden import added: quant (layer 2)
    importing the runtime (layer 3), which imports quant."""
    copy = tmp_path / "llmkit"
    for path in ROOT.rglob("*.py"):
        target = copy / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    pipeline = copy / "quant" / "pipeline.py"
    pipeline.write_text(pipeline.read_text() + "\nfrom llmkit.runtime import engine  # noqa\n")
    graph = module_graph(copy)
    violations = layering_violations(graph)
    assert "llmkit.quant.pipeline imports llmkit.runtime.engine, a layer above it" in violations
    assert all(v.startswith("llmkit.quant.pipeline imports llmkit.runtime") for v in violations)
    assert ["quant", "runtime"] in cycles(package_graph(graph))


def test_the_engine_holds_no_tensors():
    """engine.py schedules and bookkeeps; the executor's `step` and `release` are all it asks
    of the model side: it imports no torch and reaches into no runner or sampler."""
    source = (ROOT / "runtime" / "engine.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "torch" not in imported
    assert "executor.runner" not in source and "sampler." not in source
