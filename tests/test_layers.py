"""The package's layers import downward only (docs/ARCHITECTURE.md): read from the source with ``ast``, every
``museum`` import (at module level or inside a function) of every module names a module of the same or a lower
layer, and no two packages import each other, directly or around a loop."""

import ast
from pathlib import Path

import museum

ROOT = Path(museum.__file__).parent
#: lowest first; a module belongs to the first entry that is it or a package above it
LAYERS = [
    ["museum.errors"],
    ["museum.world"],
    ["museum.store"],
    ["museum.models"],
    ["museum.generation"],
    ["museum.plumbing"],
    ["museum.methods"],
    ["museum.training"],
    ["museum.collection", "museum.drawing", "museum.learning", "museum.export", "museum.museum"],
    ["museum.evaluation"],
    ["museum.report"],
    ["museum.demo"],
    ["museum.studio"],
    ["museum.cli", "museum.__main__", "museum"],
]


def unit(module: str) -> str:
    """The layer entry a module belongs to (its package, or the module itself)."""
    for layer in LAYERS:
        for name in layer:
            if module == name or (name != "museum" and module.startswith(name + ".")):
                return name
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS (and to docs/ARCHITECTURE.md)")


def level(module: str) -> int:
    name = unit(module)
    return next(i for i, layer in enumerate(LAYERS) if name in layer)


def imports() -> dict[str, set[str]]:
    """Each module of the package -> the ``museum`` modules it imports."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found |= {f"{node.module}.{a.name}" if node.module == "museum" else node.module for a in node.names}
        out[module] = {m for m in found if m == "museum" or m.startswith("museum.")}
    return out


def upward(found: dict[str, set[str]]) -> list[str]:
    return [f"{module} imports {target}" for module, targets in found.items() for target in sorted(targets)
            if level(target) > level(module)]


def loops(found: dict[str, set[str]]) -> list[str]:
    """The packages (layer entries) that reach themselves through imports."""
    graph: dict[str, set[str]] = {}
    for module, targets in found.items():
        graph.setdefault(unit(module), set()).update(unit(t) for t in targets if unit(t) != unit(module))

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph.get(start, ()))

    return sorted(name for name in graph if reaches(name, name, {name}))


def test_every_import_goes_to_the_same_or_a_lower_layer():
    assert not upward(imports()), "\n".join(upward(imports()))


def test_no_loops_between_packages():
    assert not loops(imports()), f"packages in an import loop: {loops(imports())}"


def test_the_checks_see_what_they_forbid():
    """The loops that issue #22 broke: training and methods, models (then ``base``) and evaluation."""
    before = {"museum.training.trainer": {"museum.methods.base"}, "museum.methods.lfs": {"museum.training.distill"},
              "museum.models.loading": {"museum.evaluation.evaluator"}, "museum.evaluation.protocol": {"museum.models"}}
    assert upward(before) == ["museum.methods.lfs imports museum.training.distill",
                              "museum.models.loading imports museum.evaluation.evaluator"]
    assert loops(before) == ["museum.evaluation", "museum.methods", "museum.models", "museum.training"]
