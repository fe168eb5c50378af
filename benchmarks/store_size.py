#!/usr/bin/env python
"""Feature-store size and train-head time of a checkout, through its CLI alone (so that an
older checkout, e.g. `git worktree add /tmp/old <commit>`, is measured the same way).

    python benchmarks/store_size.py                       # this checkout
    python benchmarks/store_size.py --repo /tmp/old       # another checkout

1. `extract-features` on `--size-data` (default ../shared/data/davis2016_subset, all splits)
   with MobileNetV2 and the shared ImageNet weights; the store's bytes, per image, and split
   into features / image / mask datasets (read with h5py).
2. `train-head` on `--train-data` (default ../shared/data/obj_seg, its train split) with the
   default config, wall seconds of the child process (interpreter start-up included).
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet_features.pt"


def cli(repo: Path, *args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, str(repo / "cli.py"), *args],
        cwd=repo,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


def dataset_bytes(cache: Path) -> tuple[int, dict[str, int], int]:
    """(file bytes, {dataset name: storage bytes}, images) over every shard under `cache`."""
    total, parts, n = 0, {}, 0
    for path in cache.rglob("*.h5"):
        total += path.stat().st_size
        with h5py.File(path, "r") as f:
            for g in f.values():
                n += 1
                for ds_name, ds in g.items():
                    parts[ds_name] = parts.get(ds_name, 0) + ds.id.get_storage_size()
    return total, parts, n


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repo", type=Path, default=ROOT, help="checkout whose cli.py to measure")
    ap.add_argument("--size-data", type=Path, default=SHARED / "data" / "davis2016_subset")
    ap.add_argument("--size-layout", default="davis2016")
    ap.add_argument("--train-data", type=Path, default=SHARED / "data" / "obj_seg")
    ap.add_argument("--weights", type=Path, default=WEIGHTS)
    args = ap.parse_args()
    for p in (args.size_data, args.train_data, args.weights):
        if not p.exists():
            print(f"skipped: {p} is absent", file=sys.stderr)
            return 0
    work = Path(tempfile.mkdtemp(prefix="store_size_"))
    common = [
        "--set",
        "backbone.name=mobilenet_v2",
        "--set",
        f"backbone.weights={args.weights.resolve()}",
        "--set",
        f"paths.outputs={work / 'outputs'}",
    ]
    try:
        size_sets = [
            *common,
            "--set",
            f"paths.cache={work / 'cache_size'}",
            "--set",
            f"data.root={args.size_data.resolve()}",
            "--set",
            f"data.layout={args.size_layout}",
        ]
        t_extract = cli(args.repo, "extract-features", *size_sets)
        total, parts, n = dataset_bytes(work / "cache_size")
        train_sets = [
            *common,
            "--set",
            f"paths.cache={work / 'cache_train'}",
            "--set",
            f"data.root={args.train_data.resolve()}",
        ]
        cli(args.repo, "extract-features", "--split", "train", *train_sets)
        t_train = cli(args.repo, "train-head", *train_sets)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mib = 1 << 20
    print(
        "| checkout | images | store MiB | KiB/image | features MiB | image MiB | mask MiB "
        "| extract s | train-head s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {args.repo} | {n} | {total / mib:.1f} | {total / n / 1024:.0f} "
        f"| {parts.get('features', 0) / mib:.1f} | {parts.get('image', 0) / mib:.1f} "
        f"| {parts.get('mask', 0) / mib:.1f} | {t_extract:.1f} | {t_train:.1f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
