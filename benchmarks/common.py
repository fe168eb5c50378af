"""What the benchmark scripts share: the paths of the shared data and weights, the command-line
options every script spells the same way, timing a `cli.py` child process or a callable, the
checkout's commit and a Markdown table. Standard library only, so a script that imports it still
runs on the device machine (no package index there)."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
OBJ_SEG = SHARED / "data" / "obj_seg"
DAVIS = SHARED / "data" / "davis2016_subset"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet_features.pt"


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose --help shows the script's docstring as written."""
    return argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_dataset_args(ap: argparse.ArgumentParser, *, backbone: bool = True) -> None:
    """--data, --layout (and --backbone) and --weights: obj_seg with MobileNetV2 by default."""
    ap.add_argument("--data", type=Path, default=OBJ_SEG, help="dataset root")
    ap.add_argument("--layout", default="obj_seg", help="data.layout of --data")
    if backbone:
        ap.add_argument("--backbone", default="mobilenet_v2", help="backbone.name")
    ap.add_argument(
        "--weights", default=str(WEIGHTS), help='backbone.weights: a file, "random" or "pretrained"'
    )


def add_sets_arg(ap: argparse.ArgumentParser, what: str = "a config override") -> None:
    """--set KEY=VALUE, repeatable, into `args.sets`."""
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"{what}, as cli.py's --set (repeatable)",
    )


def parse_dataset_args(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """`ap`'s arguments; exits naming --data when that folder is absent."""
    args = ap.parse_args()
    if not args.data.is_dir():
        sys.exit(f"benchmark data not found: {args.data}")
    return args


def dataset_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config values of add_dataset_args' options."""
    return {
        "data.root": args.data,
        "data.layout": args.layout,
        "backbone.name": args.backbone,
        "backbone.weights": args.weights,
    }


def absent(*paths: Path) -> Path | None:
    """The first of `paths` that does not exist (a script skips, saying which), else None."""
    return next((p for p in paths if not p.exists()), None)


def overrides(values: Mapping[str, Any]) -> list[str]:
    """`key=value` config overrides (load_config's `sets`), in the mapping's order."""
    return [f"{k}={v}" for k, v in values.items()]


def set_args(sets: Iterable[str]) -> list[str]:
    """cli.py's `--set` arguments for `key=value` overrides, in their order."""
    return [a for kv in sets for a in ("--set", kv)]


def cli_sets(values: Mapping[str, Any]) -> list[str]:
    """`--set key=value` arguments of cli.py, in the mapping's order."""
    return set_args(overrides(values))


def time_cli(
    args: Sequence[str],
    *,
    repo: Path = ROOT,
    env: Mapping[str, str] | None = None,
    stderr: bool = True,
) -> float:
    """Wall seconds of `python <repo>/cli.py args` (interpreter start-up included), its standard
    output discarded (and its standard error unless `stderr`); CalledProcessError when it fails."""
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, str(repo / "cli.py"), *args],
        cwd=repo,
        env=None if env is None else dict(env),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=None if stderr else subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


def timings(
    step: Callable[[], object],
    repeat: int,
    *,
    warmup: int = 1,
    sync: Callable[[], object] = lambda: None,
) -> list[float]:
    """Seconds of each of `repeat` calls of `step` after `warmup` untimed ones; `sync` (e.g.
    torch.cuda.synchronize) runs after each call, inside the timing."""
    for _ in range(warmup):
        step()
    sync()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def best_and_median(seconds: Sequence[float]) -> tuple[float, float]:
    """(best, median) of timings."""
    return min(seconds), statistics.median(seconds)


def git_commit(root: Path = ROOT) -> str:
    """The checkout's short commit, "(with uncommitted changes)" when tracked files differ;
    "unknown" outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, text=True, capture_output=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" (with uncommitted changes)" if dirty else "")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str) -> str:
    """A Markdown table; `align` has one letter per column: l (left) or r (right)."""
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = [header, rule, *([str(c) for c in r] for r in rows)]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)
