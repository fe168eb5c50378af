#!/usr/bin/env python
"""The whole benchmark suite in one command; prints every table and writes benchmarks/RESULTS.md.

    python benchmarks/run_all.py                        # real data, MobileNetV2, all benchmarks
    python benchmarks/run_all.py --quick --out /tmp/bench_quick.md   # smoke test, < 1 minute
    python benchmarks/run_all.py --device cuda --skip-pac --skip-dask

What it runs, each in its own child process (so each peak memory is that process's own):
  1. benchmarks/extract.py: stage 1 the course's way (a) vs pure batched forward (b) vs the
     stage end to end (c), on ../shared/data/obj_seg with the MobileNetV2 ImageNet weights.
  2. The CLI stages into a fresh cache and outputs folder: `cli.py extract-features`,
     `train-head`, `predict --split test`, then the no-op rerun `cli.py run --split test`.
     Measured: wall seconds (interpreter start-up included), images, images/s, and the child's
     peak resident set size (ru_maxrss from os.wait4).
  3. Stage 1 on Dask: `extract-features` with `dask.scheduler=local:1` and `local:2`, each into a
     fresh cache, against the local run of 2.; the caches must be byte-identical.
  4. benchmarks/pac.py: the PAC op's forward+backward time and peak memory vs the naive unfold
     version, on CPU at 480x848 (also on CUDA when --device resolves to CUDA). A few minutes.

`--quick` swaps the real data for a small generated dataset (pipeline.data.synth.make_dataset),
randomly initialised backbone weights and a small PAC size, so the suite runs in well under a
minute. Scratch files go to a fresh folder under benchmarks/_work/ (git-ignored), removed at
the end unless --keep-work.
"""

from __future__ import annotations

import argparse
import datetime
import filecmp
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(ROOT))

from benchmarks.common import OBJ_SEG, WEIGHTS, git_commit  # noqa: E402

BACKBONE = "mobilenet_v2"
LAYOUT = "obj_seg"
DEFAULT_DATA = OBJ_SEG
DEFAULT_WEIGHTS = WEIGHTS
DEFAULT_OUT = BENCH / "RESULTS.md"
WORK_PARENT = BENCH / "_work"
QUICK_SPLITS = {"train": 6, "test": 3}  # images per category per split
QUICK_SIZE = (160, 224)  # (height, width)
QUICK_PAC = ["--size", "48x80", "--repeats", "3", "--warmup", "1"]
QUICK_SETS = ("train.epochs=2", "train.linear_epochs=5")  # a short training for the smoke test
DASK_SCHEDULERS = ("local:1", "local:2")


# ----------------------------------------------------------------------------- measuring


class BenchmarkError(Exception):
    """A benchmark's child process failed; the message names it and ends with its stderr."""


@dataclass
class Measured:
    """One finished child process."""

    label: str
    returncode: int
    seconds: float  # wall, start-up included
    peak_rss: int  # bytes: ru_maxrss of the child (or of its largest reaped descendant)
    stdout: str
    stderr: str


def run_measured(label: str, argv: list[str], check: bool = True) -> Measured:
    """Run `argv` in the repository root as a fresh child; time it and read its own rusage.

    os.wait4 reaps this one child and returns its rusage, so the peak is this child's alone
    (the maximum over it and the descendants it reaped itself), never an earlier stage's."""
    print(f"[run_all] {label} ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        m = Measured(
            label, proc.returncode, seconds, usage.ru_maxrss * 1024, out.read(), err.read()
        )
    print(
        f"[run_all] {label}: {m.seconds:.1f} s, peak {mib(m.peak_rss)}, exit {m.returncode}",
        file=sys.stderr,
        flush=True,
    )
    if check and m.returncode != 0:
        tail = "\n".join((m.stderr or m.stdout).strip().splitlines()[-15:])
        raise BenchmarkError(f"{label} failed (exit {m.returncode}): {' '.join(argv)}\n{tail}")
    return m


def mib(n_bytes: float | None) -> str:
    return "-" if n_bytes is None else f"{n_bytes / 2**20:.0f} MiB"


def secs(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.4f}" if seconds < 0.1 else f"{seconds:.2f}"


def rate(n: int | None, seconds: float | None) -> str:
    return f"{n / seconds:.1f}" if n and seconds else "-"


# ----------------------------------------------------------------------------- Markdown


@dataclass
class Row:
    """One line of the summary table."""

    benchmark: str
    device: str
    images: int | None
    seconds: float | None
    peak: str = "-"
    per_second: str | None = None  # images/s as the benchmark itself reported it, if it did


def md_table(header: list[str], rows: list[list[str]], align: str = "") -> str:
    """A Markdown table; `align` holds one character per column, 'r' for right-aligned."""
    align = align or "l" * len(header)
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def parse_md_table(text: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table in `text`, as dicts keyed by the header cells."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("|")]
    if len(lines) < 2:
        return []
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    # lenient: a row with missing or extra cells keeps what lines up with the header
    return [dict(zip(cells[0], c, strict=False)) for c in cells[2:]]


def summary_table(rows: list[Row]) -> str:
    return md_table(
        ["benchmark", "device", "images", "seconds", "images/s", "peak memory"],
        [
            [
                r.benchmark,
                r.device,
                str(r.images) if r.images is not None else "-",
                secs(r.seconds),
                r.per_second or rate(r.images, r.seconds),
                r.peak,
            ]
            for r in rows
        ],
        "llrrrr",
    )


# ----------------------------------------------------------------------------- machine


def machine_header(device: str, load_start: tuple[float, ...]) -> list[str]:
    """Lines naming the machine, software, date and load (other processes skew timings)."""
    import torch

    cpu = platform.processor() or platform.machine()
    ram = "?"
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in info.splitlines()
                if ln.startswith("model name")
            ),
            cpu,
        )
        kib = int(re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1))
        ram = f"{kib / 2**20:.1f} GiB"
    except (OSError, AttributeError):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    dev = device
    if device.startswith("cuda"):
        dev += f" ({torch.cuda.get_device_name(torch.device(device))})"
    commit = git_commit()
    return [
        f"- CPU: {cpu}, {os.cpu_count()} cores ({usable} usable), torch CPU threads "
        f"{torch.get_num_threads()}",
        f"- RAM: {ram}",
        f"- device: {dev}",
        f"- software: Python {platform.python_version()}, torch {torch.__version__}, "
        f"{platform.system()} {platform.release()}",
        f"- commit: {commit}",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- 1-minute load average at start / end: {load_start[0]:.2f} / {os.getloadavg()[0]:.2f} "
        f"(timings are unreliable when other processes keep the {os.cpu_count()} cores busy)",
    ]


def resolve_device(name: str) -> str:
    from pipeline.models.devices import resolve_device as resolve

    return str(resolve(name))


# ----------------------------------------------------------------------------- the suite


@dataclass
class Setup:
    """What every benchmark runs on."""

    data: Path
    weights: str
    device_opt: str  # what the stages are given: cpu | cuda | auto
    device: str  # what that resolves to here
    work: Path
    quick: bool
    sets: tuple[str, ...] = ()  # extra `--set KEY=VALUE` for every CLI command


@dataclass
class Report:
    """Everything collected for RESULTS.md."""

    summary: list[Row] = field(default_factory=list)
    sections: list[tuple[str, str]] = field(default_factory=list)  # (title, Markdown)
    notes: list[str] = field(default_factory=list)
    failed: bool = False


def count_images(data: Path, split: str | None = None) -> int:
    from pipeline.data import list_items, list_splits

    splits = [split] if split else list_splits(data, LAYOUT)
    return sum(len(list_items(data, LAYOUT, s)[0]) for s in splits)


def cli_argv(
    command: list[str], s: Setup, cache: Path, outputs: Path, extra: tuple[str, ...] = ()
) -> list[str]:
    """`python cli.py COMMAND --set ...` on the benchmark's data, backbone, folders and device."""
    sets = {
        "data.root": str(s.data),
        "data.layout": LAYOUT,
        "backbone.name": BACKBONE,
        "backbone.weights": s.weights,
        "paths.cache": str(cache),
        "paths.outputs": str(outputs),
        "extract.device": s.device_opt,
        "train.device": s.device_opt,
        "predict.device": s.device_opt,
    }
    argv = [sys.executable, "cli.py", *command]
    for key, value in sets.items():
        argv += ["--set", f"{key}={json.dumps(value)}"]  # a JSON string is a TOML string
    for item in (*s.sets, *extra):
        argv += ["--set", item]
    return argv


def bench_extract_script(s: Setup, rep: Report) -> None:
    """1. benchmarks/extract.py: the course's way vs forward only vs the stage."""
    md_file = s.work / "extract.md"
    m = run_measured(
        "stage 1 ways (benchmarks/extract.py)",
        [
            sys.executable,
            str(BENCH / "extract.py"),
            "--data",
            str(s.data),
            "--layout",
            LAYOUT,
            "--backbone",
            BACKBONE,
            "--weights",
            s.weights,
            "--device",
            s.device_opt,
            "--markdown-out",
            str(md_file),
        ],
    )
    text = md_file.read_text().strip()
    n = count_images(s.data)
    for r in parse_md_table(text):
        way = r.get("way", "?")
        per_s = float(r["images/s"])  # more digits than its seconds column, which has one decimal
        seconds = n / per_s if per_s else float(r["seconds"])
        rep.summary.append(Row(f"stage 1 {way}", s.device, n, seconds, per_second=r["images/s"]))
    rep.sections.append(
        (
            "Stage 1: the course's way, the forward pass, the stage (benchmarks/extract.py)",
            text + "\n\nAll four ways ran in one process (peak RSS "
            f"{mib(m.peak_rss)}), so the summary table gives no per-way peak "
            "memory.",
        )
    )


def parse_number(pattern: str, text: str) -> float | None:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else None


def bench_stages(s: Setup, rep: Report) -> tuple[Path, Measured]:
    """2. The three CLI stages and the no-op rerun into a fresh cache; returns that cache and
    the measurement of its `extract-features` run (the reference of the Dask benchmark)."""
    from pipeline.core.config import load_config

    cache, outputs = s.work / "stages" / "cache", s.work / "stages" / "outputs"
    argv = lambda *cmd: cli_argv(list(cmd), s, cache, outputs)  # noqa: E731
    cfg = load_config(ROOT / "configs" / "default.toml", s.sets)
    n_all, n_train = count_images(s.data), count_images(s.data, cfg.data.train_split)
    n_test = count_images(s.data, cfg.data.test_split)

    rows = []  # (label, Measured, stage-reported seconds, images)
    m = extract = run_measured("stage 1 extract-features", argv("extract-features"))
    n = parse_number(r"extract-features: (\d+) images", m.stdout)
    rows.append(
        (
            "`cli.py extract-features` (all splits)",
            m,
            parse_number(r"images in ([\d.]+) s", m.stdout),
            int(n) if n is not None else n_all,
        )
    )
    m = run_measured("stage 2 train-head", argv("train-head"))
    rows.append(
        (
            f"`cli.py train-head` ({cfg.train.linear_epochs} linear + {cfg.train.epochs} PAC "
            f"epochs, {cfg.data.train_split} split)",
            m,
            parse_number(r"trained in ([\d.]+) s", m.stdout),
            n_train,
        )
    )
    m = run_measured("stage 3 predict", argv("predict", "--split", cfg.data.test_split))
    n = parse_number(r"predict \[\w+\]: (\d+) images", m.stdout)
    rows.append(
        (
            f"`cli.py predict --split {cfg.data.test_split}`",
            m,
            parse_number(r"images in ([\d.]+) s", m.stdout),
            int(n) if n is not None else n_test,
        )
    )
    m = run_measured("no-op rerun", argv("run", "--split", cfg.data.test_split))
    rows.append(
        (f"`cli.py run --split {cfg.data.test_split}`, all up to date (no-op)", m, None, None)
    )
    if m.stdout.count("up-to-date") < 3:
        rep.notes.append(
            "The no-op `cli.py run` did not report all three stages up to date:\n"
            + "\n".join(f"    {ln}" for ln in m.stdout.strip().splitlines())
        )

    for label, m, _, images in rows:
        rep.summary.append(Row(label, s.device, images, m.seconds, mib(m.peak_rss)))
    table = md_table(
        ["command", "wall s", "stage's own s", "images", "images/s (wall)", "peak RSS"],
        [
            [
                label,
                f"{m.seconds:.2f}",
                f"{own:.1f}" if own is not None else "-",
                str(images) if images is not None else "-",
                rate(images, m.seconds),
                mib(m.peak_rss),
            ]
            for label, m, own, images in rows
        ],
        "lrrrrr",
    )
    rep.sections.append(
        (
            "Stages 1-3 through the CLI",
            f"Fresh cache and outputs; backbone {BACKBONE} ({Path(s.weights).name}), data {s.data} "
            f"({n_all} images, {n_train} {cfg.data.train_split}, {n_test} {cfg.data.test_split}), "
            f"device {s.device}{', with --set ' + ' '.join(s.sets) if s.sets else ''}. "
            "Wall time includes interpreter start-up and imports; "
            "\"stage's own s\" is what the command itself reports. Peak RSS: the child's "
            "ru_maxrss.\n\n" + table,
        )
    )
    return cache, extract


def cache_files(cache: Path) -> dict[str, Path]:
    """The feature-cache files whose bytes must not depend on how they were computed:
    model.json, <split>/manifest.json and <split>/shards/*.h5, keyed by path under features/."""
    base = cache / "features"
    files = [
        *base.glob("*/model.json"),
        *base.glob("*/*/manifest.json"),
        *base.glob("*/*/shards/*.h5"),
    ]
    return {p.relative_to(base).as_posix(): p for p in files}


def shard_content_diff(a: Path, b: Path) -> tuple[float, bool]:
    """Two shards of the same images: the largest absolute difference of their features, and
    whether everything else they store (images, masks, attributes) is equal."""
    import h5py
    import numpy as np

    worst, rest_equal = 0.0, True
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        rest_equal = sorted(fa) == sorted(fb) and str(dict(fa.attrs)) == str(dict(fb.attrs))
        for key in set(fa) & set(fb):
            ga, gb = fa[key], fb[key]
            x, y = ga["features"][()].astype(np.float64), gb["features"][()].astype(np.float64)
            worst = max(worst, float(np.abs(x - y).max()) if x.shape == y.shape else float("inf"))
            rest_equal &= all(np.array_equal(ga[n][()], gb[n][()]) for n in ("image", "mask"))
            rest_equal &= str(dict(ga.attrs)) == str(dict(gb.attrs))
    return worst, rest_equal


def compare_caches(ref: Path, other: Path) -> tuple[bool, str]:
    """Whether two feature caches are byte-identical, and a short explanation."""
    fa, fb = cache_files(ref), cache_files(other)
    if not fa:
        return False, f"no cache files under {ref}"
    if set(fa) != set(fb):
        only = sorted(set(fa) ^ set(fb))
        return False, f"different file sets ({len(only)} differ, e.g. {only[0]})"
    differ = [k for k in sorted(fa) if not filecmp.cmp(fa[k], fb[k], shallow=False)]
    n_shards = sum(k.endswith(".h5") for k in fa)
    if not differ:
        return True, f"identical ({n_shards} shards + manifests, byte for byte)"
    parts = []
    diffs = {k: shard_content_diff(fa[k], fb[k]) for k in differ if k.endswith(".h5")}
    if diffs:
        parts.append(f"{len(diffs)}/{n_shards} shards differ in bytes")
    features = [d for d, _ in diffs.values() if d > 0]
    if features:
        parts.append(f"features differ in {len(features)} (max abs diff {max(features):.3g})")
    layout = [k for k, (d, rest) in diffs.items() if d == 0 and rest]
    if layout:
        parts.append(
            f"{len(layout)} hold equal features, images, masks and attributes "
            "(HDF5 file layout only)"
        )
    others = [k for k in differ if not k.endswith(".h5")]
    if others:
        parts.append(f"also {', '.join(others)}")
    return False, "; ".join(parts)


def bench_dask(s: Setup, rep: Report, local_cache: Path, local: Measured) -> None:
    """3. Stage 1 on local Dask clusters vs the local run, and whether the caches are equal."""
    n = count_images(s.data)
    rows = [
        [
            "local (threads in one process)",
            f"{local.seconds:.2f}",
            rate(n, local.seconds),
            "1.00x",
            mib(local.peak_rss),
            "(reference)",
        ]
    ]
    for scheduler in DASK_SCHEDULERS:
        folder = s.work / f"dask-{scheduler.replace(':', '')}"
        m = run_measured(
            f"stage 1 dask {scheduler}",
            cli_argv(
                ["extract-features"],
                s,
                folder / "cache",
                folder / "outputs",
                (f"dask.scheduler={json.dumps(scheduler)}",),
            ),
        )
        same, detail = compare_caches(local_cache, folder / "cache")
        if not same:
            rep.notes.append(
                f"The `dask.scheduler={scheduler}` cache is not identical to the "
                f"local one: {detail}."
            )
        rows.append(
            [
                f"`dask.scheduler={scheduler}`",
                f"{m.seconds:.2f}",
                rate(n, m.seconds),
                f"{local.seconds / m.seconds:.2f}x",
                mib(m.peak_rss),
                ("yes: " if same else "NO: ") + detail,
            ]
        )
        rep.summary.append(
            Row(
                f"stage 1 `extract-features`, dask {scheduler}",
                s.device,
                n,
                m.seconds,
                mib(m.peak_rss),
            )
        )
    rep.sections.append(
        (
            "Stage 1 on Dask",
            f"`cli.py extract-features` on all {n} images into a fresh cache each time; wall "
            "seconds "
            'with start-up (cluster start included). "vs local" is the speed ratio (above 1 is '
            "faster). Dask workers run one thread each, and the nanny sets OMP_NUM_THREADS=1 in "
            "them, so torch uses 1 thread per worker. Peak RSS is ru_maxrss of the CLI process "
            "tree: "
            "the largest single process in it, not the sum over workers.\n\n"
            + md_table(
                [
                    "scheduler",
                    "seconds",
                    "images/s",
                    "vs local",
                    "peak RSS",
                    "cache identical to local",
                ],
                rows,
                "lrrrrl",
            )
            + "\n\nFeature differences of float16 rounding size (~1e-7) come from torch's "
            'thread count (1 in a Dask worker, all cores locally); "HDF5 file layout only" '
            "means the same records were written to different bytes.",
        )
    )


def bench_pac(s: Setup, rep: Report) -> None:
    """4. benchmarks/pac.py on CPU (and on CUDA when the suite's device is CUDA)."""
    devices = ["cpu"] + (["cuda"] if s.device.startswith("cuda") else [])
    for dev in devices:
        md_file = s.work / f"pac-{dev}.md"
        run_measured(
            f"PAC op on {dev} (benchmarks/pac.py)",
            [
                sys.executable,
                str(BENCH / "pac.py"),
                "--device",
                dev,
                "--markdown-out",
                str(md_file),
                *(QUICK_PAC if s.quick else []),
            ],
        )
        text = md_file.read_text().strip()
        size = re.search(r"(\d+x\d+)", text.splitlines()[0])
        for r in parse_md_table(text):
            batch = re.search(r"\bB(\d+)\b", r["shape"])
            rep.summary.append(
                Row(
                    f"PAC fwd+bwd `{r['variant']}` {r['shape']}",
                    dev,
                    int(batch.group(1)) if batch else None,
                    float(r["fwd+bwd ms"]) / 1e3,
                    f"{float(r['peak MiB']):.0f} MiB",
                )
            )
        rep.sections.append(
            (f"PAC op on {dev}, {size.group(1) if size else ''} (benchmarks/pac.py)", text)
        )


def run_section(name: str, rep: Report, fn, *args):
    """Run one benchmark; on failure note it (with the child's stderr) and carry on."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - one failed benchmark must not lose the others
        rep.failed = True
        msg = str(e) if isinstance(e, BenchmarkError) else traceback.format_exc()
        print(f"[run_all] {name} FAILED: {msg}", file=sys.stderr, flush=True)
        rep.notes.append(f"{name} FAILED:\n\n```\n{msg.strip()}\n```")
        return None


def render(
    s: Setup,
    rep: Report,
    skipped: list[str],
    elapsed: float,
    command: str,
    load_start: tuple[float, ...],
) -> str:
    title = "# Benchmark results" + (
        " (--quick: generated data, random weights)" if s.quick else ""
    )
    parts = [
        title,
        "",
        f"Written by `{command}` in {elapsed:.0f} s.",
        "",
        *machine_header(s.device, load_start),
        "",
        "## Summary",
        "",
        "Seconds are wall time; for the `cli.py` rows they include interpreter start-up, "
        "and peak memory is the child process's max RSS. PAC rows: one forward+backward "
        "of one image-sized layer (median), peak memory its rise in RSS (CPU) or allocated "
        "memory (CUDA).",
        "",
        summary_table(rep.summary) if rep.summary else "(nothing was measured)",
        "",
    ]
    if skipped:
        parts += ["Skipped:", "", *[f"- {why}" for why in skipped], ""]
    for title_, body in rep.sections:
        parts += [f"## {title_}", "", body, ""]
    if rep.notes:
        parts += ["## Notes", "", *[f"- {note}" for note in rep.notes], ""]
    return "\n".join(parts)


def keep_other_sections(old: str, new: str) -> str:
    """`new`, followed by the `## ` sections of `old` that `new` does not have (measurements
    recorded by hand or by the other benchmarks: the Dask overhead, the device check, ...),
    so that a run of this suite replaces its own sections only."""

    def sections(text: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for block in ("\n" + text).split("\n## ")[1:]:
            title = block.split("\n", 1)[0].strip()
            out.append((title, "## " + block.rstrip() + "\n"))
        return out

    have = {title for title, _ in sections(new)}
    kept = [body for title, body in sections(old) if title not in have]
    if not kept:
        return new.rstrip() + "\n"
    note = (
        "The sections below were kept from the earlier RESULTS.md (recorded by other "
        "benchmarks or earlier runs; each says how and when it was measured).\n"
    )
    return new.rstrip() + "\n\n" + note + "\n" + "\n".join(kept)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="small generated dataset, random weights, small PAC size (< 1 minute)",
    )
    ap.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="auto",
        help="device of the stages (extract/train/predict.device)",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the Markdown file to write")
    ap.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="obj_seg dataset (not with --quick)"
    )
    ap.add_argument(
        "--weights", default=str(DEFAULT_WEIGHTS), help="MobileNetV2 weights (not with --quick)"
    )
    ap.add_argument("--skip-pac", action="store_true", help="skip the PAC op benchmark")
    ap.add_argument("--skip-dask", action="store_true", help="skip the Dask scaling benchmark")
    ap.add_argument(
        "--keep-work", action="store_true", help="keep the scratch folder under benchmarks/_work/"
    )
    args = ap.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    return args


def setup(args: argparse.Namespace, work: Path) -> Setup:
    """The data and weights of the run: a generated dataset and random weights for --quick."""
    if args.quick:
        from pipeline.data.synth import make_dataset

        data = make_dataset(work / "data" / LAYOUT, LAYOUT, QUICK_SPLITS, size=QUICK_SIZE)
        weights = "random"
    else:
        data, weights = args.data.resolve(), str(Path(args.weights).resolve())
    return Setup(
        data,
        weights,
        args.device,
        resolve_device(args.device),
        work,
        args.quick,
        QUICK_SETS if args.quick else (),
    )


def run_sections(args: argparse.Namespace, s: Setup, rep: Report) -> list[str]:
    """Every section the arguments ask for, into `rep`; returns the skipped ones, and why."""
    skipped: list[str] = []
    missing = [
        f"{what} not found: {p}"
        for what, p in (("benchmark data", s.data), ("weights", s.weights))
        if not args.quick and not Path(p).exists()
    ]
    if missing:
        reason = "; ".join(missing)
        skipped += [
            f"stage 1 ways (benchmarks/extract.py): {reason}",
            f"stages 1-3 through the CLI: {reason}",
        ]
        if not args.skip_dask:
            skipped.append(f"stage 1 on Dask: {reason}")
        for why in skipped:
            print(f"[run_all] skipped {why}", file=sys.stderr)
    else:
        run_section("stage 1 ways (benchmarks/extract.py)", rep, bench_extract_script, s, rep)
        local = run_section("stages through the CLI", rep, bench_stages, s, rep)
        if args.skip_dask:
            skipped.append("stage 1 on Dask: --skip-dask")
        elif local is None:
            skipped.append("stage 1 on Dask: no local `extract-features` run to compare with")
        else:
            run_section("stage 1 on Dask", rep, bench_dask, s, rep, *local)
    if args.skip_pac:
        skipped.append("PAC op (benchmarks/pac.py): --skip-pac")
    else:
        run_section("PAC op (benchmarks/pac.py)", rep, bench_pac, s, rep)
    return skipped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0, load_start = time.perf_counter(), os.getloadavg()
    WORK_PARENT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run_all_", dir=WORK_PARENT))
    rep = Report()
    try:
        s = setup(args, work)
        skipped = run_sections(args, s, rep)
        given = sys.argv[1:] if argv is None else argv
        command = shlex.join(["python", "benchmarks/run_all.py", *given])
        text = render(s, rep, skipped, time.perf_counter() - t0, command, load_start)
    finally:
        if args.keep_work:
            print(f"[run_all] scratch files kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    old = args.out.read_text() if args.out.is_file() else ""
    args.out.write_text(keep_other_sections(old, text))
    print(f"[run_all] wrote {args.out}", file=sys.stderr)
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
