#!/usr/bin/env python
"""train-head under load: the default thread count against one thread, on an idle machine and
with one other CPU-bound process running (what a shared cluster node looks like).

    python benchmarks/threads.py                       # ../shared/data/obj_seg, MobileNetV2
    python benchmarks/threads.py --epochs 20 --linear-epochs 30   # the full default schedule

Stage 1 runs once into a scratch cache; then each case runs `cli.py train-head --force` in a
child process and is timed (wall seconds, interpreter start-up included). The load is a
separate Python process spinning on one core. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def spin() -> None:
    while True:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "obj_seg")
    ap.add_argument(
        "--weights", type=Path, default=SHARED / "weights" / "mobilenet_v2_imagenet_features.pt"
    )
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--linear-epochs", type=int, default=10)
    args = ap.parse_args()
    if not args.data.is_dir() or not args.weights.is_file():
        print(f"skipped: {args.data} or {args.weights} is absent", file=sys.stderr)
        return 0
    work = Path(tempfile.mkdtemp(prefix="threads_"))
    sets = [
        "--set",
        f"data.root={args.data.resolve()}",
        "--set",
        "backbone.name=mobilenet_v2",
        "--set",
        f"backbone.weights={args.weights.resolve()}",
        "--set",
        f"paths.cache={work / 'cache'}",
        "--set",
        f"paths.outputs={work / 'outputs'}",
        "--set",
        f"train.epochs={args.epochs}",
        "--set",
        f"train.linear_epochs={args.linear_epochs}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}

    def cli(*a: str) -> float:
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, str(ROOT / "cli.py"), *a, *sets],
            cwd=ROOT,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return time.perf_counter() - t0

    rows = []
    try:
        cli("extract-features", "--split", "train")
        for load in (False, True):
            spinner = None
            if load:
                spinner = mp.get_context("spawn").Process(target=spin, daemon=True)
                spinner.start()
            try:
                for threads in (0, 1):
                    seconds = cli("train-head", "--force", "--set", f"run.threads={threads}")
                    rows.append((load, threads, seconds))
            finally:
                if spinner is not None:
                    spinner.terminate()
                    spinner.join()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    idle = {t: s for load, t, s in rows if not load}
    print(
        f"train-head, {args.epochs} PAC + {args.linear_epochs} linear epochs, "
        f"{os.cpu_count()} cores, torch default threads = usable cores"
    )
    print("| machine | run.threads | seconds | vs idle, same threads | vs idle, default |")
    print("|---|---|---:|---:|---:|")
    for load, threads, s in rows:
        name = "default (0)" if threads == 0 else str(threads)
        print(
            f"| {'loaded (1 busy process)' if load else 'idle'} | {name} | {s:.1f} "
            f"| {s / idle[threads]:.2f}x | {s / idle[0]:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
