"""The package's import graph: layers only import downwards, and the one cycle is the lazy tokenizer registry."""

import ast
from pathlib import Path

import omnitok

ROOT = Path(omnitok.__file__).parent
# Lower layers first. A module may import from its own layer and the layers before it, never from a later one.
LAYERS = [
    {"omnitok.errors", "omnitok.jsonfile", "omnitok.config", "omnitok.device", "omnitok.weights",
     "omnitok.distributed", "omnitok"},
    {"omnitok.tokenizers"},
    {"omnitok.data"},
    {"omnitok.model"},
    {"omnitok.serve"},
    {"omnitok.train"},
    {"omnitok.eval"},
    {"omnitok.demo", "omnitok.cli", "omnitok.__main__"},
]
# The media tokenizer registry (protocol.MEDIA_LOADERS) imports a tokenizer module when a directory of its type is
# loaded, and those modules import the protocol: the one cycle there is, and it is lazy.
REGISTRY_CYCLE = {"omnitok.tokenizers.protocol", "omnitok.tokenizers.image", "omnitok.tokenizers.audio"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every omnitok module ``name`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name}: relative import"  # the package uses absolute imports only
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                      for a in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known:
            found.add(node.value)  # a module named for import_module (the lazy registries)
    return {m for m in found if m in known and m != name}


def _layer(module: str) -> int:
    best = max((p for layer in LAYERS for p in layer if module == p or module.startswith(p + ".")), key=len)
    return next(i for i, layer in enumerate(LAYERS) if best in layer)


def test_no_module_imports_from_a_layer_above_it():
    modules = _modules()
    upward = [f"{m} -> {t}" for m, p in modules.items() for t in _imports(m, p, set(modules))
              if _layer(t) > _layer(m)]
    assert upward == []


def test_the_only_import_cycle_is_the_lazy_tokenizer_registry():
    modules = _modules()
    graph = {m: _imports(m, p, set(modules)) for m, p in modules.items()}
    graph = {m: {t for t in ts if not (m == "omnitok.tokenizers" and t in REGISTRY_CYCLE)} for m, ts in graph.items()}
    cycles = [c for c in _strongly_connected(graph) if len(c) > 1]
    assert [c for c in cycles if not c <= REGISTRY_CYCLE] == []
    assert any(c <= REGISTRY_CYCLE for c in cycles)  # the registry is what the test thinks it is


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
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
            component = set()
            while True:
                w = stack.pop()
                on.discard(w)
                component.add(w)
                if w == v:
                    break
            out.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return out
