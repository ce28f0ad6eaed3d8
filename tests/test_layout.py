"""The layout: every import of fastprune/ and kernels/ points down the declared layers, no cycles, small files.

Read with ``ast`` (every ``import``, also those inside functions), so that a lazy import cannot hide
an upward dependency.
"""
import ast
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: Layers, lowest first. A module may import modules of its own layer or below, never above.
LAYERS = (
    ("validation and primitives", ("fastprune._checks", "fastprune.reference", "fastprune.flops")),
    ("kernels", ("fastprune._C", "fastprune._C_cuda", "fastprune._ext", "fastprune.kernels", "fastprune.kernels.*")),
    ("attention, schedules, backends", ("fastprune.attention", "fastprune.schedules", "fastprune.backends")),
    ("methods", ("fastprune.functional", "fastprune.tome", "fastprune.evit", "fastprune.bat", "fastprune.idle",
                 "fastprune.idle_loss", "fastprune")),
    ("integrations", ("fastprune.patch", "fastprune.patch.*")),
    ("evaluation", ("fastprune.evaluation", "fastprune.evaluation.*")),
    ("command line", ("fastprune.evaluate", "fastprune.compare", "fastprune.calibrate", "fastprune.visualize")),
)
MAX_LINES = 500
#: Files over MAX_LINES, with the reason they are allowed for now.
OVERSIZED: dict = {}


def _module_files() -> dict:
    """``{module name: path}`` of every module of fastprune/ and kernels/ (kernels/ is fastprune.kernels)."""
    out = {}
    for top, package in (("fastprune", "fastprune"), ("kernels", "fastprune.kernels")):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT / top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package] + parts)] = path
    return out


MODULES = _module_files()
#: The compiled extension modules (built from csrc/): imported, never importing.
COMPILED = ("fastprune._C", "fastprune._C_cuda")


def _layer(module: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if module == pattern or (pattern.endswith(".*") and module.startswith(pattern[:-1])):
                return i
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py: add it to LAYERS")


def _imports(module: str, path: pathlib.Path) -> set:
    """The fastprune modules ``module`` imports (a name imported from a package counts as the package
    unless it is a module of it)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            known = set(MODULES) | set(COMPILED)
            names = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES and name not in COMPILED and name.startswith("fastprune"):
                name = name.rpartition(".")[0]
            if (name in MODULES or name in COMPILED) and name != module:
                found.add(name)
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}
GRAPH.update({module: set() for module in COMPILED})


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    up = [(other, LAYERS[_layer(other)][0]) for other in sorted(GRAPH[module]) if _layer(other) > _layer(module)]
    assert not up, f"{module} ({LAYERS[_layer(module)][0]}) imports from layers above it: {up}"


def test_no_import_cycles():
    order, state = [], {}

    def visit(module, stack):
        if state.get(module) == "done":
            return
        if state.get(module) == "active":
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(module):] + [module]))
        state[module] = "active"
        for other in sorted(GRAPH[module]):
            visit(other, stack + [module])
        state[module] = "done"
        order.append(module)

    for module in sorted(GRAPH):
        visit(module, [])
    for module in order:  # dependency order: everything a module imports comes first
        if module not in COMPILED:
            importlib.import_module(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_is_small(module):
    path = MODULES[module]
    rel = path.relative_to(ROOT).as_posix()
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES or rel in OVERSIZED, f"{rel} has {lines} lines (at most {MAX_LINES})"
