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

import shutil
import sys
import tempfile
from pathlib import Path

import h5py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    DAVIS,
    OBJ_SEG,
    ROOT,
    WEIGHTS,
    absent,
    cli_sets,
    markdown_table,
    parser,
    time_cli,
)


def cli(repo: Path, *args: str) -> float:
    return time_cli(args, repo=repo)


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
    ap = parser(__doc__)
    ap.add_argument("--repo", type=Path, default=ROOT, help="checkout whose cli.py to measure")
    ap.add_argument("--size-data", type=Path, default=DAVIS)
    ap.add_argument("--size-layout", default="davis2016")
    ap.add_argument("--train-data", type=Path, default=OBJ_SEG)
    ap.add_argument("--weights", type=Path, default=WEIGHTS)
    args = ap.parse_args()
    if (missing := absent(args.size_data, args.train_data, args.weights)) is not None:
        print(f"skipped: {missing} is absent", file=sys.stderr)
        return 0
    work = Path(tempfile.mkdtemp(prefix="store_size_"))
    common = {
        "backbone.name": "mobilenet_v2",
        "backbone.weights": args.weights.resolve(),
        "paths.outputs": work / "outputs",
    }
    try:
        size_sets = cli_sets(
            {
                **common,
                "paths.cache": work / "cache_size",
                "data.root": args.size_data.resolve(),
                "data.layout": args.size_layout,
            }
        )
        t_extract = cli(args.repo, "extract-features", *size_sets)
        total, parts, n = dataset_bytes(work / "cache_size")
        train_sets = cli_sets(
            {**common, "paths.cache": work / "cache_train", "data.root": args.train_data.resolve()}
        )
        cli(args.repo, "extract-features", "--split", "train", *train_sets)
        t_train = cli(args.repo, "train-head", *train_sets)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mib = 1 << 20
    header = ("checkout", "images", "store MiB", "KiB/image", "features MiB", "image MiB")
    header += ("mask MiB", "extract s", "train-head s")
    row = (args.repo, n, f"{total / mib:.1f}", f"{total / n / 1024:.0f}")
    row += tuple(f"{parts.get(k, 0) / mib:.1f}" for k in ("features", "image", "mask"))
    print(markdown_table(header, [(*row, f"{t_extract:.1f}", f"{t_train:.1f}")], "lrrrrrrrr"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
