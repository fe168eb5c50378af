"""The import layering of pipeline/ (../shared/docs/architecture.md): data flows one way.
The stages (extract, train, predict) import no other stage; the inference path they share
with `segment` and `export` (inference.py) and every module below the stages import no stage
and nothing above; `segment` and `export` import no stage module; module-level imports form
no circle. Read from the source with `ast` (every import, also those inside functions)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PIPELINE = ROOT / "pipeline"
STAGES = {"extract", "train", "predict"}
# the commands that iterate or list the stages, above them (cli.py is outside pipeline/)
ABOVE_STAGES = {"runs", "workflow"}
COMMANDS = {"segment", "export"}  # commands on a trained run: the shared path, no stage


def _module(path: Path) -> str:
    """pipeline/x.py -> "x"; pipeline/report/y.py (a package) -> "report"."""
    return path.relative_to(PIPELINE).parts[0].removesuffix(".py")


def _package(path: Path) -> list[str]:
    """The dotted package of a file, as a list: pipeline/report/y.py -> [pipeline, report]."""
    return ["pipeline", *path.relative_to(PIPELINE).parts[:-1]]


def imports(path: Path, top_level_only: bool = False, source: str | None = None) -> set[str]:
    """The pipeline modules (first component below pipeline/) that the file `path` imports
    (`source`: its text, read from `path` when None); `top_level_only`: at module level."""
    text = path.read_text(encoding="utf-8") if source is None else source
    tree = ast.parse(text, str(path))
    nodes: list[ast.AST] = list(tree.body) if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "pipeline" and len(parts) > 1:
                    out.add(parts[1])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package(path)[:len(_package(path)) - node.level + 1]
                full = base + (node.module.split(".") if node.module else [])
            else:
                full = (node.module or "").split(".")
            if full[:1] != ["pipeline"]:
                continue
            if len(full) > 1:
                out.add(full[1])
            else:  # from pipeline import x, y / from . import x
                out.update(alias.name for alias in node.names)
    return out - {_module(path)}


def all_imports(top_level_only: bool = False) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PIPELINE.rglob("*.py")):
        graph.setdefault(_module(path), set()).update(imports(path, top_level_only))
    graph.pop("__init__", None)
    return graph


def test_the_parser_sees_relative_and_package_imports():
    """The helper itself: relative and absolute imports, in a module and in a package's
    file, at module level and inside functions."""
    src = ("from __future__ import annotations\nimport os\nfrom . import predict, train\n"
           "from .store import FeatureStore\nfrom ..data import Box\n"
           "def f():\n    from pipeline.extract import Extractor\n    import pipeline.runs\n")
    flat, nested = PIPELINE / "probe.py", PIPELINE / "report" / "probe.py"
    # (a flat module's `..data` is outside pipeline/; a package's `.store` is its own file)
    assert imports(flat, source=src) == {"predict", "train", "store", "extract", "runs"}
    assert imports(nested, source=src) == {"data", "extract", "runs"}
    assert imports(flat, top_level_only=True, source=src) == {"predict", "train", "store"}


@pytest.mark.parametrize("name", ["inference", "segment", "export"])
def test_the_shared_inference_path_imports_no_stage(name):
    graph = all_imports()
    assert name in graph
    assert not graph[name] & STAGES, (name, graph[name] & STAGES)


def test_no_module_imports_one_above_it():
    graph = all_imports()
    assert STAGES <= set(graph) and "inference" in graph
    for name, deps in graph.items():
        if name in ABOVE_STAGES:
            continue
        above = deps & (ABOVE_STAGES | COMMANDS)
        assert not above, f"{name} imports {sorted(above)}, above it"
        stages = deps & STAGES
        assert not stages, f"{name} imports the stage module(s) {sorted(stages)}"


def test_no_import_circle():
    graph = all_imports(top_level_only=True)
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph.get(name, ())):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [name, dep]
                raise AssertionError(f"import circle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
