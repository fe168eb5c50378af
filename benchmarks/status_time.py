"""How long `python cli.py status` takes on an up-to-date run: a fresh interpreter each time
(what a user waits for), several repeats, the median. Target: under TARGET_S on the 2-core
development VM.

    python benchmarks/status_time.py --run NAME --set paths.outputs=DIR [--set ...]
    python benchmarks/status_time.py ... --repeats 7 --check   # exit 1 above TARGET_S

The run must be up to date (every stage `up-to-date`: the script says so and stops
otherwise), so that the time is that of judging, not of finding work. Prints the wall and CPU
times, their medians, the machine (CPUs) and the load average before and after, as a Markdown
snippet for benchmarks/RESULTS.md (wall time on a loaded machine is mostly waiting: the CPU
seconds say what the command costs).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, add_sets_arg, set_args  # noqa: E402

TARGET_S = 1.5


def status(args: list[str]) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """Wall seconds and CPU seconds (user + system) of one `cli.py status` in a fresh
    interpreter, and its result."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "status", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="the run to judge (--run of cli.py)")
    add_sets_arg(ap)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--check", action="store_true", help=f"exit 1 when the median > {TARGET_S}")
    a = ap.parse_args()
    args = ["--run", a.run, *set_args(a.sets)]
    _, _, first = status(args)  # warms the file cache; its output says whether it is up to date
    lines = first.stdout.strip().splitlines()
    if first.returncode or not lines or any("up-to-date" not in ln for ln in lines):
        print(
            f"not an up-to-date run (exit {first.returncode}):\n{first.stdout}{first.stderr}",
            file=sys.stderr,
        )
        return 2
    load_before = os.getloadavg()
    runs = [status(args)[:2] for _ in range(a.repeats)]
    load_after = os.getloadavg()
    times = [w for w, _ in runs]
    median = statistics.median(times)
    cpu = statistics.median(c for _, c in runs)
    print(
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; machine: "
        f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(
        f"- load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; "
        f"after: {', '.join(f'{x:.2f}' for x in load_after)}"
    )
    print(
        f"- `cli.py status {' '.join(args)}` ({len(lines)} stages up-to-date), "
        f"{a.repeats} runs: {', '.join(f'{t:.2f}' for t in times)} s"
    )
    print(
        f"- median {median:.2f} s wall (target < {TARGET_S} s: "
        f"{'met' if median < TARGET_S else 'NOT met'}), median CPU (user + system) "
        f"{cpu:.2f} s; CPU: {', '.join(f'{c:.2f}' for _, c in runs)} s"
    )
    return 1 if a.check and median >= TARGET_S else 0


if __name__ == "__main__":
    sys.exit(main())
