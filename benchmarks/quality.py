#!/usr/bin/env python
"""Quality options measured with stage 3's own report, on both shared datasets, two seeds:

    python benchmarks/quality.py                                  # the options below
    python benchmarks/quality.py --option "layers 3=backbone.layers=3" --seeds 0

Datasets: ../shared/data/obj_seg (train -> test) and ../shared/data/davis2016_subset
(train -> val: sequences never seen in training). Backbone: MobileNetV2 with the shared
ImageNet weights (no DINO weights are reachable offline). Each (dataset, option, seed) is a
run of the CLI in its own process: `extract-features` of both splits, `train-head`, `predict`;
the feature cache is shared by the runs of a dataset, so stage 1 is timed by the first seed of
an option (later seeds find it up to date). Printed: the PAC and linear_bilinear mIoU / J / F
per seed and their mean, the feature cache size of the option, and the stage seconds.
Raw results go to --json. With --tta each run is then also predicted with predict.tta=flip
(its models reused); a second invocation on the same --work finds every stage up to date and
only adds that (its stage seconds are then the no-op reruns', not the first pass's).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import DAVIS, OBJ_SEG, WEIGHTS, markdown_table, set_args, time_cli  # noqa: E402
from pipeline.metrics import definitions  # noqa: E402

SHARED = ROOT.parent / "shared"
DATASETS = {
    "obj_seg": (OBJ_SEG, "obj_seg", "train", "test"),
    "davis2016_subset": (DAVIS, "davis2016", "train", "val"),
}
DEFAULT_OPTIONS = [
    "baseline=backbone.layers=1",
    "layers 2=backbone.layers=2",
    "layers 3=backbone.layers=3",
]
HEADLINE = tuple(m.key for m in definitions.HEADLINE)


def cli(args: list[str], sets: list[str]) -> float:
    """Seconds of one CLI command (fails loudly)."""
    return time_cli([*args, *set_args(sets)])


def calibrate(train: str, sets: list[str]) -> float:
    """With predict.threshold = "auto" among `sets`: predict the validation split (data.val_cut's
    `<train>_heldout`, else data.val_split) at 0.5, whose sweep chooses the thresholds; its
    seconds (0 without "auto")."""
    if "predict.threshold=auto" not in sets:
        return 0.0
    cut = any(s.startswith("data.val_cut=") for s in sets)
    val = (
        f"{train}_heldout"
        if cut
        else next(s.split("=", 1)[1] for s in sets if s.startswith("data.val_split="))
    )
    return cli(["predict", "--split", val], [*sets, "predict.threshold=0.5"])


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def headline(report_path: Path) -> dict:
    """Per variant of a report: its HEADLINE metrics, the DAVIS protocol's J&F (`davis_jf`),
    the seconds per image (`s_per_image`, when the report times variants) and the threshold
    its masks were cut at (`threshold`, with `chosen_on`: the split that chose it)."""
    rep = json.loads(report_path.read_text())
    seconds = rep.get("timing", {}).get("seconds_per_image", {})
    calib = rep.get("calibration", {})
    out = {}
    for v, scores in rep["variants"].items():
        row = {k: scores["overall"][k] for k in HEADLINE}
        row["davis_jf"] = rep.get("davis", {}).get(v, {}).get("J&F")
        row["s_per_image"] = seconds.get(v)
        row["threshold"] = calib.get("thresholds", {}).get(v, rep["config"]["predict"]["threshold"])
        row["chosen_on"] = calib.get("split")
        out[v] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--option", action="append", help='"label=key=value[,key=value]"; repeatable')
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--weights", default=str(WEIGHTS))
    ap.add_argument(
        "--work", default=None, help="cache and outputs folder (default: a temporary one)"
    )
    ap.add_argument("--json", default=None, help="write the raw results here")
    ap.add_argument(
        "--tta",
        action="store_true",
        help="also predict each run with predict.tta=flip (stage 1 adds the mirrored "
        "features of the test split; the models are reused)",
    )
    args = ap.parse_args()
    options = []
    for spec in args.option or DEFAULT_OPTIONS:
        label, _, sets = spec.partition("=")
        options.append((label, [s for s in sets.split(",") if s]))
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_quality_"))
    results = []
    for ds in args.datasets.split(","):
        root, layout, train, test = DATASETS[ds]
        if not root.is_dir():
            sys.exit(f"benchmark data not found: {root}")
        for label, extra in options:
            for seed in [int(s) for s in args.seeds.split(",")]:
                run = f"{ds}-{label.replace(' ', '_')}-s{seed}"
                sets = [
                    f"data.root={root}",
                    f"data.layout={layout}",
                    f"data.train_split={train}",
                    f"data.test_split={test}",
                    "backbone.name=mobilenet_v2",
                    f"backbone.weights={args.weights}",
                    f"paths.cache={work / ds / 'cache'}",
                    f"paths.outputs={work / ds / 'outputs'}",
                    f"run.name={run}",
                    f"train.seed={seed}",
                    *extra,
                ]
                features = work / ds / "cache" / "features"
                before = dir_bytes(features) if features.is_dir() else 0
                row = {
                    "dataset": ds,
                    "option": label,
                    "sets": extra,
                    "seed": seed,
                    "extract_s": cli(["extract-features", "--split", train], sets)
                    + cli(["extract-features", "--split", test], sets),
                    "train_s": cli(["train-head"], sets),
                    "calibrate_s": calibrate(train, sets),
                    "predict_s": cli(["predict", "--split", test], sets),
                }
                report = work / ds / "outputs" / run / f"report_{test}.json"
                row["metrics"] = headline(report)
                grown = dir_bytes(features) - before  # the option's store, when this run made it
                row["cache_bytes"] = grown or next(
                    (
                        r["cache_bytes"]
                        for r in results
                        if r["dataset"] == ds and r["option"] == label
                    ),
                    0,
                )
                if args.tta:
                    tsets = [*sets, "predict.tta=flip"]
                    before = dir_bytes(features)
                    row["tta_extract_s"] = cli(["extract-features", "--split", test], tsets)
                    row["tta_predict_s"] = cli(["predict", "--split", test], tsets)
                    row["metrics_tta"] = headline(report)
                    row["tta_cache_bytes"] = dir_bytes(features) - before
                results.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print_table(results)


def _triple(m: dict) -> str:
    """ "mIoU / J / F" of one variant's metrics."""
    return f"{m['miou']:.3f} / {m['j_mean']:.3f} / {m['boundary_f']:.3f}"


def _triples(metrics: dict) -> tuple[str, str]:
    """ "mIoU / J / F" of linear_bilinear and of PAC, as two table cells."""
    return _triple(metrics["linear_bilinear"]), _triple(metrics["pac"])


def _run(r: dict) -> tuple[str, str, int]:
    return r["dataset"], r["option"], r["seed"]


def print_table(results: list[dict]) -> None:
    header = ("dataset", "option", "seed", "linear_bilinear mIoU / J / F", "PAC mIoU / J / F")
    rows = [
        (
            *_run(r),
            *_triples(r["metrics"]),
            f"{r['extract_s']:.0f} / {r['train_s']:.0f} / {r['predict_s']:.0f}",
            f"{r['cache_bytes'] / 2**20:.0f}",
        )
        for r in results
    ]
    print("\n" + markdown_table((*header, "stage 1 / 2 / 3 s", "cache MiB"), rows, "lllllll"))
    print_variants(results)
    if any("metrics_tta" in r for r in results):
        rows = [
            (
                *_run(r),
                *_triples(r["metrics_tta"]),
                f"{r['tta_extract_s']:.0f} / {r['tta_predict_s']:.0f}",
                f"{r['tta_cache_bytes'] / 2**20:.0f}",
            )
            for r in results
        ]
        header = (*header[:3], "+ flip TTA: linear_bilinear mIoU / J / F", header[4])
        header += ("stage 1 s added / stage 3 s with TTA", "cache MiB added")
        print("\n" + markdown_table(header, rows, "lllllll"))


def print_variants(results: list[dict]) -> None:
    """Every variant of every run: mIoU / J / F, DAVIS J&F, threshold, seconds per image."""
    header = ("dataset", "option", "seed", "variant", "mIoU / J / F", "DAVIS J&F")
    header += ("threshold (chosen on)", "s / image")
    rows = [
        (
            *_run(r),
            v,
            _triple(m),
            "-" if m["davis_jf"] is None else f"{m['davis_jf']:.3f}",
            f"{m['threshold']} ({m['chosen_on'] or 'fixed'})",
            "-" if m["s_per_image"] is None else f"{m['s_per_image']:.3f}",
        )
        for r in results
        for v, m in r["metrics"].items()
    ]
    print("\n" + markdown_table(header, rows, "lllllrlr"))


if __name__ == "__main__":
    main()
