"""Stage 1 on Dask against in-process at equal cores: the fixed start-up and the per-image cost.

Each measurement is one `extract-features` into a fresh cache in a child process (the real
command: interpreter, imports, the Dask cluster's start and its workers' model load for
`local:N`), on two datasets of different size; the per-image cost is the slope between the two
sizes, the fixed start-up the intercept (what a run of 0 images would cost). In-process runs
get N torch threads (`run.threads=N`), `local:N` gets N workers of one forward thread each:
the same cores.

    python benchmarks/dask_overhead.py                    # N = 2, 3 repeats, writes RESULTS.md
    python benchmarks/dask_overhead.py --workers 2 --repeats 3 --no-write

The two datasets are `../shared/data/obj_seg` (142 images) and
`../shared/data/davis2016_subset` (591 images), with mobilenet_v2 and the shared weights so
that every image is real work. Runs alternate (local, Dask, local, Dask, ...) so that a change
of the machine's load hits both alike; the medians are reported, with the 1-minute load
average before and after every run. Writes its section of benchmarks/RESULTS.md (replacing an
earlier one of this script) and prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet_features.pt"
DATASETS = {  # name: (root, layout)
    "obj_seg": (SHARED / "data" / "obj_seg", "obj_seg"),
    "davis2016_subset": (SHARED / "data" / "davis2016_subset", "davis2016"),
}
HEADING = "## Stage 1: Dask against in-process at equal cores (benchmarks/dask_overhead.py)"
TARGET = 0.15  # the per-image overhead the scale-out issue allows


def load1() -> float:
    return os.getloadavg()[0]


def one_run(dataset: str, scheduler: str, cores: int, work: Path) -> dict:
    """`cli.py extract-features` on all splits of `dataset` into a fresh cache; wall seconds
    of the whole command and the stage's own seconds (its "N images in X s" line)."""
    root, layout = DATASETS[dataset]
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=work))
    cmd = [
        sys.executable,
        str(ROOT / "cli.py"),
        "extract-features",
        "--set",
        f"data.root={root}",
        "--set",
        f"data.layout={layout}",
        "--set",
        "backbone.name=mobilenet_v2",
        "--set",
        f"backbone.weights={WEIGHTS}",
        "--set",
        f"paths.cache={cache}",
        "--set",
        f"paths.outputs={work / 'outputs'}",
        "--set",
        f"run.threads={cores}",
        "--set",
        f"dask.scheduler={scheduler}",
    ]
    before = load1()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    found = re.findall(r"extract-features: [\d,]+ images? in ([\d.]+) s", p.stdout + p.stderr)
    stage = float(found[-1]) if found else float("nan")
    subprocess.run(["rm", "-rf", str(cache)], check=False)
    return {
        "dataset": dataset,
        "scheduler": scheduler or "local",
        "wall_s": round(wall, 2),
        "stage_s": stage,
        "load_before": round(before, 2),
        "load_after": round(load1(), 2),
    }


def count_images(dataset: str) -> int:
    sys.path.insert(0, str(ROOT))
    from pipeline.data import list_items, list_splits

    root, layout = DATASETS[dataset]
    return sum(len(list_items(root, layout, s)[0]) for s in list_splits(root, layout))


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(intercept s, slope s/image) through two sizes' medians."""
    (n0, t0), (n1, t1) = points
    slope = (t1 - t0) / (n1 - n0)
    return t0 - slope * n0, slope


def summarise(runs: list[dict], sizes: dict[str, int]) -> dict:
    out: dict = {}
    for sched in sorted({r["scheduler"] for r in runs}):
        res: dict = {}
        for key in ("wall_s", "stage_s"):
            pts = [
                (
                    sizes[d],
                    statistics.median(
                        r[key] for r in runs if r["scheduler"] == sched and r["dataset"] == d
                    ),
                )
                for d in DATASETS
            ]
            fixed, per_image = fit(pts)
            res[key] = {
                "medians": {d: t for d, (_, t) in zip(DATASETS, pts, strict=True)},
                "fixed_s": round(fixed, 2),
                "per_image_ms": round(per_image * 1e3, 1),
            }
        out[sched] = res
    return out


def paired_overheads(runs: list[dict], sizes: dict[str, int], dask: str) -> list[float]:
    """Per repeat, the per-image overhead of `dask` against local from that repeat's own four
    runs (neighbours in time, so a change of the machine's load between repeats cancels)."""
    n0, n1 = (sizes[d] for d in DATASETS)
    d0, d1 = DATASETS
    out = []
    for k in range(len(runs) // 4):
        rep = {(r["dataset"], r["scheduler"]): r["wall_s"] for r in runs[4 * k : 4 * k + 4]}
        slope = {s: (rep[(d1, s)] - rep[(d0, s)]) / (n1 - n0) for s in ("local", dask)}
        out.append(slope[dask] / slope["local"] - 1)
    return out


def render(summary: dict, runs: list[dict], sizes: dict[str, int], args, command: str) -> str:
    local = summary["local"]["wall_s"]
    dask = summary[f"local:{args.workers}"]["wall_s"]
    over = dask["per_image_ms"] / local["per_image_ms"] - 1
    paired = paired_overheads(runs, sizes, f"local:{args.workers}")
    loads = [r["load_before"] for r in runs] + [r["load_after"] for r in runs]
    rows = []
    for sched, res in summary.items():
        w, s = res["wall_s"], res["stage_s"]
        rows.append(
            f"| {sched} | "
            + " | ".join(f"{w['medians'][d]:.1f}" for d in DATASETS)
            + f" | {w['fixed_s']:.1f} | {w['per_image_ms']:.1f} | {s['fixed_s']:.1f} |"
            f" {s['per_image_ms']:.1f} |"
        )
    lines = [
        HEADING,
        "",
        f"- date: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        f"- command: `{command}`",
        f"- {args.repeats} repeats per cell, alternating local and Dask; medians; 1-minute "
        f"load average around the runs: min {min(loads):.1f}, median "
        f"{statistics.median(loads):.1f}, max {max(loads):.1f} (on {os.cpu_count()} cores: "
        "other processes took CPU time from both alike)",
        f"- data: obj_seg ({sizes['obj_seg']} images) and davis2016_subset "
        f"({sizes['davis2016_subset']} images), mobilenet_v2 with the shared weights; "
        f"in-process with `run.threads={args.workers}`, Dask `local:{args.workers}` "
        f"({args.workers} workers of one forward thread each, two task threads: one shard "
        "decodes or writes while another is in the forward)",
        "",
        "Fixed = intercept (a run of 0 images: interpreter, imports, cluster start, model "
        'loads), per image = slope between the two sizes. "stage" columns: the stage\'s own '
        "time (its log line; without the interpreter's start and imports).",
        "",
        "| scheduler | obj_seg wall s | davis wall s | fixed s | per image ms "
        "| stage fixed s | stage per image ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Per-image overhead of `local:{args.workers}` against in-process: {over * 100:+.1f} % "
        f"(target at most {TARGET * 100:.0f} %: {'met' if over <= TARGET else 'missed'}); "
        f"fixed start-up {dask['fixed_s'] - local['fixed_s']:+.1f} s. Per repeat (its own four "
        "runs, close in time): "
        + ", ".join(f"{p * 100:+.1f} %" for p in paired)
        + f" (median {statistics.median(paired) * 100:+.1f} %).",
        "",
        "Every run:",
        "",
        "| dataset | scheduler | wall s | stage s | load before | load after |",
        "|---|---|---:|---:|---:|---:|",
        *[
            f"| {r['dataset']} | {r['scheduler']} | {r['wall_s']:.1f} | {r['stage_s']:.1f} | "
            f"{r['load_before']:.1f} | {r['load_after']:.1f} |"
            for r in runs
        ],
    ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace this script's section of RESULTS.md (up to the next `## `), or append it."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = text.find(HEADING)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(HEADING))
        text = text[:start] + section + ("\n" + text[end + 1 :] if end >= 0 else "")
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2, help="cores: torch threads / workers")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = ap.parse_args(argv)
    missing = [str(p) for p in (WEIGHTS, *(r for r, _ in DATASETS.values())) if not p.exists()]
    if missing:
        raise SystemExit(f"not found: {', '.join(missing)}")
    sizes = {d: count_images(d) for d in DATASETS}
    runs = []
    (ROOT / "benchmarks" / "_work").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(
        prefix="dask-overhead-", dir=ROOT / "benchmarks" / "_work"
    ) as tmp:
        work = Path(tmp)
        for _ in range(args.repeats):
            for dataset in DATASETS:
                for sched in ("", f"local:{args.workers}"):
                    r = one_run(dataset, sched, args.workers, work)
                    print(json.dumps(r), file=sys.stderr, flush=True)
                    runs.append(r)
    summary = summarise(runs, sizes)
    command = shlex.join(
        ["python", "benchmarks/dask_overhead.py", *(sys.argv[1:] if argv is None else argv)]
    )
    section = render(summary, runs, sizes, args, command)
    print(section)
    print(json.dumps({"sizes": sizes, "summary": summary, "runs": runs}))
    if not args.no_write:
        write_section(args.out, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
