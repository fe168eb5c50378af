"""The import layering of pipeline/ (../shared/docs/architecture.md): data flows one way.

The folders are floors, lowest first (FLOORS): a module imports nothing from a floor above its
own. The stage modules (stages/extract, train, predict) import no other stage; below the
stages nothing imports one, and the commands on a trained run (segment, export) import none
either; module-level imports form no circle; the torch-free floor stays torch-free. Read from
the source with `ast` (every import, also those inside functions)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PIPELINE = ROOT / "pipeline"
# lowest first; a name is a folder (a package of pipeline/) or a top-level module
FLOORS: tuple[frozenset[str], ...] = tuple(
    frozenset(f)
    for f in (
        {"core"},  # config, keys, errors, fingerprints, fsutil, registry: torch-free
        {"data", "metrics"},
        {"models"},
        {"store", "streaming", "executors"},
        {"report"},
        {"runconfig"},
        {"inference"},  # the one inference path of predict, segment and export
        {"stages"},  # stages.workflow: the ordered list of stages
        {"commands"},
    )
)
STAGES = {"stages.extract", "stages.train", "stages.predict"}
# modules above the stages that iterate or list them
ABOVE_STAGES = {"stages.workflow", "commands.runs"}
TORCH_FREE = ("core",)


def _module(path: Path) -> str:
    """pipeline/x.py -> "x"; pipeline/stages/y.py -> "stages.y"; a package's __init__ -> its
    folder's name."""
    parts = list(path.relative_to(PIPELINE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _package(path: Path) -> list[str]:
    """The dotted package of a file, as a list: pipeline/report/y.py -> [pipeline, report]."""
    return ["pipeline", *path.relative_to(PIPELINE).parts[:-1]]


def _target(full: list[str]) -> str:
    """pipeline.a.b.c -> "a.b" (a module of a folder) or "a" (a top-level module)."""
    return ".".join(full[1:3])


def _imported(full: list[str], name: str) -> str:
    """`from <full> import name` where <full> is pipeline or one of its folders: the module
    `name` where it is one, else the folder itself (a name its __init__ defines)."""
    folder = PIPELINE.joinpath(*full[1:])
    if (folder / f"{name}.py").is_file() or (folder / name).is_dir():
        return _target([*full, name])
    return _target(full)


def imports(path: Path, top_level_only: bool = False, source: str | None = None) -> set[str]:
    """The pipeline modules ("folder.module" or a top-level "module") that the file `path`
    imports (`source`: its text, read from `path` when None); `top_level_only`: at module
    level."""
    text = path.read_text(encoding="utf-8") if source is None else source
    tree = ast.parse(text, str(path))
    nodes: list[ast.AST] = list(tree.body) if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "pipeline" and len(parts) > 1:
                    out.add(_target(parts))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package(path)[: len(_package(path)) - node.level + 1]
                full = base + (node.module.split(".") if node.module else [])
            else:
                full = (node.module or "").split(".")
            if full[:1] != ["pipeline"]:
                continue
            if len(full) > 2 or (len(full) == 2 and not (PIPELINE / full[1]).is_dir()):
                out.add(_target(full))
            else:  # from pipeline import x / from pipeline.stages import extract / from . import x
                out.update(_imported(full, alias.name) for alias in node.names)
    return out - {_module(path)}


def all_imports(top_level_only: bool = False) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PIPELINE.rglob("*.py")):
        graph.setdefault(_module(path), set()).update(imports(path, top_level_only))
    graph.pop("", None)
    return graph


def floor(name: str) -> int:
    top = name.split(".")[0]
    for i, names in enumerate(FLOORS):
        if top in names:
            return i
    raise AssertionError(f"pipeline/{top} is on no floor of FLOORS: add it")


def test_the_parser_sees_relative_and_package_imports():
    """The helper itself: relative and absolute imports, in a folder's module, at module
    level and inside functions, of modules and of folders' modules."""
    src = (
        "from __future__ import annotations\nimport os\nfrom . import predict, train\n"
        "from ..store import FeatureStore\nfrom ..core.config import Config\n"
        "from .. import inference\n"
        "def f():\n    from pipeline.stages.extract import Extractor\n"
        "    import pipeline.commands.runs\n    from pipeline.stages import base\n"
    )
    nested = PIPELINE / "stages" / "probe.py"
    assert imports(nested, source=src) == {
        "stages.predict",
        "stages.train",
        "store",
        "core.config",
        "inference",
        "stages.extract",
        "commands.runs",
        "stages.base",
    }
    assert imports(nested, top_level_only=True, source=src) == {
        "stages.predict",
        "stages.train",
        "store",
        "core.config",
        "inference",
    }


def test_every_module_is_on_a_floor_and_imports_none_above_it():
    graph = all_imports()
    assert STAGES <= set(graph) and "inference" in graph
    for name, deps in graph.items():
        above = sorted(d for d in deps if floor(d) > floor(name))
        assert not above, f"pipeline/{name} imports {above}, above it"


@pytest.mark.parametrize("name", ["inference", "commands.segment", "commands.export"])
def test_the_shared_inference_path_imports_no_stage(name):
    graph = all_imports()
    assert name in graph
    assert not graph[name] & STAGES, (name, graph[name] & STAGES)


def test_no_stage_imports_another_and_nothing_below_imports_one():
    for name, deps in all_imports().items():
        if name in ABOVE_STAGES:
            continue
        stages = deps & STAGES
        assert not stages, f"pipeline/{name} imports the stage module(s) {sorted(stages)}"


def test_no_import_circle():
    graph = all_imports(top_level_only=True)
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph.get(name, ())):
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep] if dep in path else [name, dep]
                raise AssertionError(f"import circle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_torch_free_floor_imports_no_torch():
    names = sorted(f"pipeline.{m}" for m in all_imports() if m.split(".")[0] in TORCH_FREE)
    code = (
        "import sys\n"
        + "".join(f"import {n}\n" for n in names)
        + "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]", (names, out)
