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

import multiprocessing as mp
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import OBJ_SEG, WEIGHTS, absent, cli_sets, markdown_table, parser, time_cli  # noqa: E402,E501


def spin() -> None:
    while True:
        pass


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--data", type=Path, default=OBJ_SEG)
    ap.add_argument("--weights", type=Path, default=WEIGHTS)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--linear-epochs", type=int, default=10)
    args = ap.parse_args()
    if (missing := absent(args.data, args.weights)) is not None:
        print(f"skipped: {missing} is absent", file=sys.stderr)
        return 0
    work = Path(tempfile.mkdtemp(prefix="threads_"))
    sets = cli_sets(
        {
            "data.root": args.data.resolve(),
            "backbone.name": "mobilenet_v2",
            "backbone.weights": args.weights.resolve(),
            "paths.cache": work / "cache",
            "paths.outputs": work / "outputs",
            "train.epochs": args.epochs,
            "train.linear_epochs": args.linear_epochs,
        }
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}

    def cli(*a: str) -> float:
        return time_cli([*a, *sets], env=env, stderr=False)

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
    header = ("machine", "run.threads", "seconds", "vs idle, same threads", "vs idle, default")
    table = [
        (
            "loaded (1 busy process)" if load else "idle",
            "default (0)" if threads == 0 else threads,
            f"{s:.1f}",
            f"{s / idle[threads]:.2f}x",
            f"{s / idle[0]:.2f}x",
        )
        for load, threads, s in rows
    ]
    print(markdown_table(header, table, "llrrr"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
