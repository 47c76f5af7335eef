"""The shape of the code that docs/architecture.md describes: imports go one way through the layers, no module
imports itself back, one definition per shared idea, one spec per model kind, one engine contract."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: docs/architecture.md's layers, lowest first. A unit is a top-level module or a subpackage of memtrain; a
#: unit may import units of lower layers only (any import: module level or inside a function; imports under
#: ``if TYPE_CHECKING:`` are for annotations and do not count).
LAYERS = [
    {"memtrain", "memtrain.errors", "memtrain.labels", "memtrain.kinds"},
    {"memtrain.fileio", "memtrain.devices", "memtrain.version", "memtrain.shipped", "memtrain.tables"},
    {"memtrain.config"},
    {"memtrain.kernels"},
    {"memtrain.objectives", "memtrain.metrics"},
    {"memtrain.data"},
    {"memtrain.models"},
    {"memtrain.flops", "memtrain.evaluation"},
    {"memtrain.engine"},
    {"memtrain.inference", "memtrain.precompute", "memtrain.launch"},
    {"memtrain.convert", "memtrain.eval", "memtrain.bench"},
    {"memtrain.hub"},
    {"memtrain.cli", "memtrain.config_docs"},
    {"memtrain.__main__"},
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}
#: facades: a unit that packs what every layer below it makes (memtrain.hub writes and reads Hub folders of
#: models, tokenizers, cards and results). Lower layers may call it only from inside a function, so that it is
#: imported when someone asks for a Hub folder and never while the lower layer itself is being imported.
FACADES = {"memtrain.hub"}


def _modules() -> dict[str, Path]:
    """Every module of the installed package, by its import name (kernels/ installs as memtrain.kernels)."""
    mods = {}
    for base, pkg in ((REPO / "memtrain", "memtrain"), (REPO / "kernels", "memtrain.kernels")):
        for f in base.rglob("*.py"):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = f
    return mods


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """The memtrain modules that ``path`` imports anywhere (TYPE_CHECKING blocks left out), except a facade
    imported inside a function by a unit below it (FACADES)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(node: ast.AST, in_function: bool) -> None:
        if _type_checking_block(node):
            return
        names: set[str] = set()
        if isinstance(node, ast.Import):
            names = {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = {module, *(f"{module}.{a.name}" for a in node.names)}
        found.update(n for n in names if not (in_function and _unit(n) in FACADES and _unit(name) not in FACADES))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return {m for m in found if m in known and m != name}


def _unit(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(path, name, mods) for name, path in mods.items()}


def test_every_unit_has_a_layer(graph):
    assert {_unit(m) for m in graph} <= set(LAYER), sorted({_unit(m) for m in graph} - set(LAYER))


def test_imports_go_down_the_layers(graph):
    wrong = sorted(
        f"{src} imports {dst}"
        for src, dsts in graph.items()
        for dst in dsts
        if _unit(src) != _unit(dst) and LAYER[_unit(dst)] >= LAYER[_unit(src)]
    )
    assert not wrong, "imports against docs/architecture.md's layers:\n" + "\n".join(wrong)


def test_no_module_imports_itself_back(graph):
    """No cycle between modules (strongly connected components of the import graph are single modules)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            strong(v)
    assert not cycles, cycles


@pytest.mark.parametrize(
    "pattern", [r"^IGNORE_INDEX\s*=", r"^def (pick_device|resolve_precision|autocast_for)\b", r"is_bf16_supported\(\)"]
)
def test_one_definition(pattern):
    hits = [
        f"{p.relative_to(REPO)}"
        for base in ("memtrain", "kernels", "tools")
        for p in (REPO / base).rglob("*.py")
        if re.search(pattern, p.read_text(), re.M)
    ]
    assert len(hits) == 1, hits


def test_model_kinds_are_one_registry():
    from typing import get_args

    from memtrain.config import ModelConfig
    from memtrain.engine import pipeline
    from memtrain.kinds import KINDS
    from memtrain.models.base import MemtrainModel

    assert set(get_args(ModelConfig.model_fields["kind"].annotation)) == set(KINDS)
    assert set(pipeline._BUILDERS) == set(KINDS)
    for name, spec in KINDS.items():
        cls = spec.load_class()
        assert issubclass(cls, MemtrainModel) and cls.kind == name
        assert spec.own_objective in spec.objectives


def test_both_engines_keep_the_contract():
    import inspect

    from memtrain.engine.contract import Engine
    from memtrain.engine.ds_engine import DeepSpeedEngine
    from memtrain.engine.engines import PlainEngine

    wanted = {n for n, v in vars(Engine).items() if callable(v) and not n.startswith("_")}
    for cls in (PlainEngine, DeepSpeedEngine):
        for name in wanted:
            assert callable(getattr(cls, name, None)), f"{cls.__name__} lacks {name}"
            want = list(inspect.signature(getattr(Engine, name)).parameters)
            assert list(inspect.signature(getattr(cls, name)).parameters) == want, (cls.__name__, name)
