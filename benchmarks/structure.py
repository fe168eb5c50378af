"""The structure figures of issue 28, read from the source of a checkout (this one, or
`--root` another), so that before and after can be compared:

- the longest import chain among the modules (cli.py and pipeline/**): the most on one path of
  module-level imports (a module imports the next), and the same counting the imports inside
  functions too (those hide the real graph; a circle there is not followed twice);
- how many functions (and methods) take a `Config` parameter, and in how many modules;
- the modules that load torch when imported (each imported alone in a fresh interpreter).

    python benchmarks/structure.py                  # this checkout
    python benchmarks/structure.py --root ../other  # another checkout of the project
    python benchmarks/structure.py --json           # the figures as JSON
    python benchmarks/structure.py --no-torch       # skip the (slower) torch check
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of cli.py and of every module of root/pipeline (a package by its
    __init__)."""
    out = {"cli": root / "cli.py"}
    for path in sorted((root / "pipeline").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _absolute(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    """The module a `from ... import` names, made absolute."""
    if not node.level:
        return node.module or ""
    base = name.split(".") if is_package else name.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str, path: Path, known: dict[str, Path], top_level_only: bool) -> set[str]:
    """The pipeline modules that module `name` imports (at module level only, or anywhere)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, name, is_package)
            for alias in node.names:
                target = f"{base}.{alias.name}"
                out.add(target if target in known else base)
    return (out & set(known)) - {name}


def import_graph(root: Path, top_level_only: bool) -> dict[str, set[str]]:
    known = modules(root)
    return {n: imports(n, p, known, top_level_only) for n, p in known.items()}


def _has_circle(graph: dict[str, set[str]]) -> bool:
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(name: str) -> bool:
        state[name] = 1
        for dep in graph.get(name, ()):
            if state.get(dep) == 1 or (dep not in state and visit(dep)):
                return True
        state[name] = 2
        return False

    return any(visit(n) for n in sorted(graph) if n not in state)


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    """The longest path of modules, each importing the next, visiting no module twice (the
    module-level graph has no circle, tests/test_layering.py; where the imports inside
    functions make one, every simple path is searched)."""
    if not _has_circle(graph):

        @functools.cache
        def from_(name: str) -> tuple[str, ...]:
            tails = [from_(dep) for dep in sorted(graph.get(name, ()))]
            return (name, *max(tails, key=len, default=()))

        return list(max((from_(n) for n in sorted(graph)), key=len, default=()))
    best: list[str] = []

    def walk(path: list[str], seen: set[str]) -> None:
        nonlocal best
        if len(path) > len(best):
            best = list(path)
        for dep in sorted(graph.get(path[-1], ())):
            if dep not in seen:
                seen.add(dep)
                path.append(dep)
                walk(path, seen)
                path.pop()
                seen.discard(dep)

    for n in sorted(graph):
        walk([n], {n})
    return best


def _annotation_names(node: ast.expr | None) -> Iterator[str]:
    if node is None:
        return
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # "Config"
        try:
            node = ast.parse(node.value, mode="eval").body
        except SyntaxError:
            return
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            yield sub.id
        elif isinstance(sub, ast.Attribute):
            yield sub.attr


def functions_taking(
    root: Path, type_name: str = "Config", arg: str = "cfg"
) -> dict[str, list[str]]:
    """Module -> the functions (and methods) with a parameter annotated `type_name` (also
    `type_name | None`, a string annotation, `config.Config`) or named `arg` (cli.py's
    commands are not annotated)."""
    out: dict[str, list[str]] = {}
    for name, path in modules(root).items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            a = node.args
            params = [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]
            if any(
                p.arg == arg or type_name in _annotation_names(p.annotation) for p in params if p
            ):
                out.setdefault(name, []).append(f"{node.name}:{node.lineno}")
    return out


def loads_torch(root: Path, name: str) -> bool:
    """Whether importing module `name` alone, in a fresh interpreter, loads torch."""
    code = f"import sys, {name}; print('torch' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(root), "PATH": ""},
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"import {name} failed: {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout.strip() == "True"


def figures(root: Path, torch: bool = True) -> dict:
    top = import_graph(root, top_level_only=True)
    every = import_graph(root, top_level_only=False)
    taking = functions_taking(root)
    out = {
        "root": str(root),
        "modules": len(top),
        "longest_chain_module_level": longest_chain(top),
        "longest_chain_with_local_imports": longest_chain(every),
        "functions_taking_config": sum(len(f) for f in taking.values()),
        "modules_with_functions_taking_config": {m: len(f) for m, f in sorted(taking.items())},
    }
    if torch:
        names = sorted(top)
        with ThreadPoolExecutor(2) as pool:
            flags = list(pool.map(lambda n: loads_torch(root, n), names))
        out["modules_loading_torch"] = [n for n, f in zip(names, flags, strict=True) if f]
        out["modules_torch_free"] = len(names) - len(out["modules_loading_torch"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="a checkout of the project")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch import check")
    args = ap.parse_args()
    f = figures(args.root.resolve(), torch=not args.no_torch)
    if args.json:
        print(json.dumps(f, indent=2))
        return 0
    top, every = f["longest_chain_module_level"], f["longest_chain_with_local_imports"]
    print(f"{f['root']}: {f['modules']} modules")
    print(f"longest import chain, module level: {len(top)} modules: {' -> '.join(top)}")
    print(
        f"longest import chain, with imports inside functions: {len(every)} modules: "
        f"{' -> '.join(every)}"
    )
    taking = f["modules_with_functions_taking_config"]
    print(
        f"functions taking Config: {f['functions_taking_config']} in {len(taking)} modules: "
        + ", ".join(f"{m} {n}" for m, n in taking.items())
    )
    if "modules_loading_torch" in f:
        torch = f["modules_loading_torch"]
        print(
            f"modules loading torch when imported: {len(torch)} of {f['modules']} "
            f"(torch-free: {f['modules_torch_free']}): {', '.join(torch)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
