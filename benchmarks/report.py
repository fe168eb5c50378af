"""How long `write_reports` takes for a full report: four figures in three formats each (SVG,
PDF, PNG), twelve thumbnail strips and their full-size enlargements of 854x480 images, 300
per-image rows, the two templates. The suite checks that no figure is laid out or saved twice
(tests/test_report.py); the time itself is measured here.

    python benchmarks/report.py              # best of 3, after one warm-up report
    python benchmarks/report.py --check      # exit 1 when the best exceeds TARGET_CPU_S

CPU seconds (time.process_time) are the measure, so that another process on the machine
changes them little; wall seconds are printed too.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core.variants import VARIANTS  # noqa: E402
from pipeline.report import Thumb, write_reports  # noqa: E402

# 2.2 s measured on the 2-core development VM (the target the test suite used to assert)
TARGET_CPU_S = 3.0
CATEGORIES = ("bear", "dog")


def metrics(miou: float, n: int) -> dict:
    return {
        "miou": miou,
        "fg_iou": miou - 0.05,
        "bg_iou": miou + 0.05,
        "accuracy": 0.95,
        "precision": 0.87,
        "recall": 0.86,
        "j_mean": miou - 0.05,
        "boundary_f": miou - 0.2,
        "n_images": n,
    }


def inputs(n_rows: int = 300, n_thumbs: int = 12):
    """A report of three variants on two categories, their threshold sweep, `n_rows`
    per-image rows, `n_thumbs` 854x480 thumbnails and a training history."""
    report = {
        "split": "test",
        "n_images": n_rows,
        "n_predicted": n_rows,
        "backbone": {"name": "mobilenet_v2", "weights": "random"},
        "run": "bench",
        "config": {"train": {"lr": 0.002}},
        "fingerprints": {"features": "0" * 16},
        "variants": {
            v: {
                "overall": metrics(0.8 + 0.05 * k, n_rows),
                "per_category": {
                    c: metrics(0.78 + 0.05 * k + 0.01 * i, n_rows // 2)
                    for i, c in enumerate(CATEGORIES)
                },
            }
            for k, v in enumerate(VARIANTS)
        },
        "threshold_sweep": {
            v: [
                {
                    "threshold": round(0.05 * t, 2),
                    "j_mean": 0.8 - 0.002 * (t - 10) ** 2,
                    "precision": 0.5 + 0.025 * t,
                    "recall": 1 - 0.025 * t,
                }
                for t in range(1, 20)
            ]
            for v in VARIANTS
        },
    }
    report["config"]["predict"] = {"threshold": 0.5}
    rng = np.random.default_rng(0)
    rows = [
        {
            "category": CATEGORIES[i % 2],
            "stem": f"{i:05d}",
            "j": {v: float(rng.uniform(0.5, 1.0)) for v in VARIANTS},
            "f": {v: float(rng.uniform(0.3, 1.0)) for v in VARIANTS},
        }
        for i in range(n_rows)
    ]
    h, w = 480, 854
    yy, xx = np.mgrid[:h, :w]
    gt = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (h / 3) ** 2
    pred = (yy - h / 2) ** 2 + (xx - w / 2 - 4) ** 2 < (h / 3) ** 2
    thumbs = [
        Thumb(
            "bear", f"{i:05d}", 0.5, 0.4, rng.integers(0, 256, (h, w, 3), dtype=np.uint8), gt, pred
        )
        for i in range(n_thumbs)
    ]
    history = [{"phase": "linear", "epoch": e, "loss": 0.7 / (e + 1)} for e in range(4)] + [
        {"phase": "upsampler", "epoch": e, "loss": 0.3 / (e + 1), "val_miou": 0.8} for e in range(3)
    ]
    return report, rows, thumbs, history


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--check",
        action="store_true",
        help=f"exit 1 when the best CPU time exceeds {TARGET_CPU_S} s",
    )
    args = ap.parse_args()
    report, rows, thumbs, history = inputs()
    half = len(thumbs) // 2
    with tempfile.TemporaryDirectory() as d:
        write_reports(Path(d) / "warm", "test", report, rows[:6], [], [], history)
        cpu, wall = [], []
        for k in range(args.repeats):
            t0, w0 = time.process_time(), time.perf_counter()
            write_reports(
                Path(d) / f"r{k}", "test", report, rows, thumbs[:half], thumbs[half:], history
            )
            cpu.append(time.process_time() - t0)
            wall.append(time.perf_counter() - w0)
    best = min(cpu)
    print(
        f"write_reports, {len(rows)} rows, {len(thumbs)} 854x480 thumbnails, 5 figures x 3 "
        f"formats: best {best:.2f} s CPU ({min(wall):.2f} s wall) of {args.repeats}; "
        f"target < {TARGET_CPU_S:.1f} s CPU"
    )
    return 1 if args.check and best > TARGET_CPU_S else 0


if __name__ == "__main__":
    sys.exit(main())
