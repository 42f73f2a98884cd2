"""mechmed's modules stay in layers: no module imports one of a higher tier (imports inside functions
included), and only mechmed.sources and mechmed/demo name the embedded default's package.

Tiers, lowest first (a module may import its own tier and those below):

0. leaves: errors, sites, io, progress, runtime, sources (and the package root)
1. vocabulary: config, families, readout, processors, stats, data/*
2. model access: models, checkpoints, capture, spectral, tiny
3. methods (a loaded model and pairs in, results out): consistency, saes, fidelity, attribution, interventions,
   selection, store, audit, selection_audit, nulls
4. presentation (rows in, figures out): figures, report
5. stages (load by name, write run directories): stages, train, ablate, forgetting, pipeline
6. the command line: cli

mechmed/demo is the embedded default, registered through mechmed.sources; it may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "mechmed"
TIERS = {
    "errors": 0, "sites": 0, "io": 0, "progress": 0, "runtime": 0, "sources": 0, "": 0,
    "config": 1, "families": 1, "readout": 1, "processors": 1, "stats": 1, "data": 1,
    "models": 2, "checkpoints": 2, "capture": 2, "spectral": 2, "tiny": 2,
    "consistency": 3, "saes": 3, "fidelity": 3, "attribution": 3, "selection": 3, "store": 3,
    "interventions": 3, "audit": 3, "selection_audit": 3, "nulls": 3,
    "figures": 4, "report": 4,
    "stages": 5, "train": 5, "ablate": 5, "forgetting": 5, "pipeline": 5,
    "cli": 6, "__main__": 7,
}
DEMO_NAMERS = ("sources", "demo")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(module: str, source: str, is_package: bool = False) -> list[tuple[str, int]]:
    """(imported mechmed module, line) for every import in ``source``, at any depth."""
    found = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and node.args[0].value.split(".")[0] == "mechmed" \
                and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None)
                     in ("import_module", "__import__")):
            found.append((node.args[0].value, node.lineno))  # importlib.import_module("mechmed.x")
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "mechmed"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if base.split(".")[0] != "mechmed":
                continue
            found.append((base, node.lineno))
            # `from mechmed import sources` / `from mechmed.data import images` name modules too
            found += [(f"{base}.{a.name}", node.lineno) for a in node.names
                      if (ROOT.parent / f"{base}.{a.name}".replace(".", "/")).with_suffix(".py").is_file()
                      or (ROOT.parent / f"{base}.{a.name}".replace(".", "/")).is_dir()]
    return found


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Upward imports and stray names of mechmed.demo in ``{module: (source, is_package)}``."""
    bad = []
    for module, (source, is_package) in sorted(sources.items()):
        top = _top(module)
        for imported, line in imports(module, source, is_package):
            target = _top(imported)
            if target == "demo":
                if top not in DEMO_NAMERS:
                    bad.append(f"{module}:{line} imports {imported}: only mechmed.sources and mechmed/demo may")
                continue
            if top == "demo":
                continue
            if top not in TIERS or target not in TIERS:
                bad.append(f"{module}:{line} imports {imported}: a module without a tier; add it to TIERS")
            elif TIERS[target] > TIERS[top]:
                bad.append(f"{module}:{line} imports {imported} (tier {TIERS[target]}) from tier {TIERS[top]}")
    return bad


def package_sources() -> dict[str, tuple[str, bool]]:
    return {_module(p): (p.read_text(encoding="utf-8"), p.name == "__init__.py") for p in ROOT.rglob("*.py")}


def test_every_module_has_a_tier():
    tops = {_top(m) for m in package_sources()}
    assert tops - {"demo"} <= set(TIERS), sorted(tops - {"demo"} - set(TIERS))


def test_no_upward_imports_and_the_demo_only_through_sources():
    assert violations(package_sources()) == []


@pytest.mark.parametrize("module,line,expected", [
    ("mechmed.errors", "    from mechmed.train import train", "tier 5) from tier 0"),
    ("mechmed.readout", "    from .figures import save_figure", "tier 4) from tier 1"),
    ("mechmed.data.loaders", "    from ..stats import wilson_interval\n    from ..capture import capture", "tier 2) from tier 1"),
    ("mechmed.consistency", "    from mechmed.demo.build import ensure_demo_data", "only mechmed.sources"),
    ("mechmed.models", "    from mechmed import stages", "mechmed.stages (tier 5) from tier 2"),
    ("mechmed.saes", "    importlib.import_module('mechmed.report')", "mechmed.report (tier 4) from tier 3"),
    ("mechmed.capture", "    import mechmed.demo.build as b", "only mechmed.sources"),
])
def test_an_added_upward_import_fails(module, line, expected):
    """The check catches an import added inside a function, absolute or relative."""
    sources = package_sources()
    source, is_package = sources[module]
    sources[module] = (source + f"\n\ndef _added():\n{line}\n", is_package)
    found = violations(sources)
    assert len(found) == 1 and expected in found[0], found


def test_no_import_cycles_outside_the_demo():
    """Among the tiered modules no import circle, even through imports inside functions (the embedded
    default is reached through the sources registry, which imports it on first use by design)."""
    assert _cycles(package_sources()) == []


def test_an_added_cycle_fails():
    sources = package_sources()
    source, is_package = sources["mechmed.consistency"]
    sources["mechmed.consistency"] = (source + "\n\ndef _added():\n    from mechmed.attribution import attribute\n",
                                      is_package)
    assert ["mechmed.attribution", "mechmed.consistency"] in _cycles(sources)


def _cycles(sources: dict[str, tuple[str, bool]]) -> list[list[str]]:
    graph: dict[str, set[str]] = {}
    for module, (source, is_package) in sources.items():
        if _top(module) == "demo":
            continue
        graph.setdefault(module, set())
        for imported, _ in imports(module, source, is_package):
            if _top(imported) != "demo" and imported != module and imported in sources:
                graph[module].add(imported)
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles
