"""The import graph of llava_getok and data_converters (docs: architecture, "an arrow only ever points down").

Every module imports; every project import it makes, at module level or inside a function, names something that
exists; layers import only from the layers below them; and no module reaches itself again through its imports.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("llava_getok", "data_converters")

# The core: the token language and what every layer above shares (numpy, no LLaVA, no files of other layers).
CORE = {f"llava_getok.{m}" for m in ("vocab", "geometry", "codec", "parse", "formats", "masks", "generation", "records", "viz",
                                     "atomic", "quiet", "patching", "options", "grammar", "rle", "messages", "frames",
                                     "images")}
# What users run: each may import any layer.
ENTRY = {"llava_getok", "llava_getok.cli", "llava_getok.predict", "llava_getok.train", "llava_getok.demo",
         "llava_getok.export",
         *(f"llava_getok.demo.{m}" for m in ("run", "data", "model", "scoring", "training", "backends")),
         "llava_getok.tiny_model", "llava_getok.recipes", "llava_getok.session", "llava_getok.session_backends", "llava_getok.chat", "llava_getok.web",
         "llava_getok.serve", "llava_getok.serve.model_worker"}
MAY_IMPORT = {  # layer -> the layers it may import from, besides its own
    "core": set(),
    "data_converters": {"core"},
    "training": {"core"},
    "llava": {"core", "training"},
    "hf": {"core", "training"},
    "eval": {"core"},
    "rl": {"core", "training", "llava", "hf"},
    "entry": {"core", "data_converters", "training", "llava", "hf", "eval", "rl", "entry"},
}
KNOWN_CYCLES: list[set[str]] = []  # a new cycle fails test_no_import_cycles


def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the project's packages (a package is its __init__.py)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = project_modules()


def imports_of(name: str) -> list[tuple[int, str, str | None]]:
    """(line, module, imported name or None) of every import in ``name`` that resolves into the project, module
    level or function-local; ``from pkg import sub`` resolves to the submodule ``pkg.sub``."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] not in PACKAGES:
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((node.lineno, sub, None) if sub in MODULES else (node.lineno, target, a.name))
    return out


def graph() -> dict[str, set[str]]:
    return {m: {target for _, target, _ in imports_of(m) if target != m} for m in MODULES}


def layer(name: str) -> str:
    if name in ENTRY:
        return "entry"
    if name in CORE:
        return "core"
    if name.startswith("data_converters"):
        return "data_converters"
    for sub in ("training", "llava", "hf", "eval", "rl"):
        if name == f"llava_getok.{sub}" or name.startswith(f"llava_getok.{sub}."):
            return sub
    raise AssertionError(f"{name}: no layer; add it to CORE or ENTRY in {Path(__file__).name}")


def cycles(g: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports_and_its_project_imports_exist(name):
    importlib.import_module(name)
    for line, target, attr in imports_of(name):
        assert target in MODULES, f"{MODULES[name].name}:{line} imports {target}, which is not a module"
        if attr is not None and attr != "*":
            assert hasattr(importlib.import_module(target), attr), f"{MODULES[name].name}:{line}: {target} has no {attr}"


def test_layers_only_import_downwards():
    wrong = [f"{m} ({layer(m)}) imports {t} ({layer(t)})" for m, targets in graph().items() for t in sorted(targets)
             if layer(t) != layer(m) and layer(t) not in MAY_IMPORT[layer(m)]]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    assert sorted(map(sorted, cycles(graph()))) == sorted(map(sorted, KNOWN_CYCLES))


def test_the_graph_sees_function_local_imports_and_cycles():
    """The walk itself: a function-local import is an edge, and a cycle through one is found."""
    assert "llava_getok.llava.trainer" in graph()["llava_getok.llava"]  # register() imports it inside the function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert layer("llava_getok.rl.rewards") == "rl" and layer("llava_getok.records") == "core"


def imports_of_llava(name: str) -> list[str]:
    """Where module ``name`` imports haotian-liu's ``llava`` package (absolute imports whose first name is llava)."""
    path = MODULES[name]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        out += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] == "llava"]
    return out


def test_the_training_core_never_imports_llava():
    """A second backend reuses llava_getok.training without LLaVA installed: no module of it imports ``llava``."""
    found = [line for name in MODULES if layer(name) == "training" for line in imports_of_llava(name)]
    assert not found, "\n".join(found)


def test_only_the_llava_backend_imports_llava():
    """LLaVA (haotian-liu's ``llava`` package) is one backend: only llava_getok/llava/ imports it; everything else asks
    that package."""
    found = [line for name in MODULES if layer(name) != "llava" for line in imports_of_llava(name)]
    assert not found, "\n".join(found)
