"""The DAVIS-protocol numbers of pipeline.metrics (davis, masks) against the official
davis2017-evaluation code, on the masks of a predict run.

    python benchmarks/davis_check.py --official PATH/TO/davis2017-evaluation \\
        --data ../shared/data/davis2016_subset --split val \\
        --predictions outputs/<run>/predictions/val [--report outputs/<run>/report_val.json] \\
        [--layout obj_seg] [--out davis_check.json]

The official code is imported from `--official` (a checkout of
github.com/davisvideochallenge/davis2017-evaluation) at run time, never vendored; it needs
numpy, Pillow, opencv-python(-headless), scikit-image, scipy and tqdm, which the project does
not depend on (install them in a separate environment).

Both sides evaluate the same frames: those the split lists (the shared val split holds every
2nd frame of each sequence). The official evaluation is run as a whole
(`DAVISEvaluation.evaluate`) on a temporary DAVIS-2017-layout folder holding exactly those
frames: the annotations and the predicted masks re-encoded as label PNGs (0 background,
1 the object; the official reader takes 255 for "void", so the 0/255 files cannot be given
as they are), the images linked. Task "semi-supervised" drops each sequence's first and last
frame (the protocol of the report); task "unsupervised" evaluates every frame. Its per-frame
functions (db_eval_iou, db_eval_boundary) are also compared frame by frame.

Ours: per-frame J and F by pipeline.metrics.masks.image_stats on the same masks, aggregated by
pipeline.metrics.davis.davis_protocol. With `--report`, also the report's own per-image J and F of
the variant whose masks were written (pac). Exit 1 when a difference exceeds --tol (1e-6).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.data import list_items, load_mask  # noqa: E402
from pipeline.metrics.davis import davis_protocol  # noqa: E402
from pipeline.metrics.masks import image_stats  # noqa: E402

MASK_VARIANT = "pac"  # the variant whose masks predict writes


def read_pred(path: Path) -> np.ndarray:
    """A predicted mask PNG (0 / 255) as bool, as the report reads it back."""
    return np.asarray(Image.open(path).convert("L")) > 127


def load_frames(data: Path, layout: str, split: str, predictions: Path) -> dict[str, list[tuple]]:
    """{sequence: [(stem, image path, gt bool, pred bool)]} of the split's annotated frames,
    in stem order (a category of the layout is a sequence)."""
    items, problems = list_items(data, layout, split)
    if problems:
        raise SystemExit(f"{data}: split '{split}' has problems: {problems[0]}")
    out: dict[str, list[tuple]] = {}
    for it in items:
        if it.mask is None:
            continue
        pred_file = predictions / it.category / f"{it.stem}.png"
        if not pred_file.is_file():
            raise SystemExit(f"{pred_file}: no predicted mask for {it.key}")
        gt, pred = load_mask(data / it.mask), read_pred(pred_file)
        if gt.shape != pred.shape:
            raise SystemExit(
                f"{pred_file}: size {pred.shape} differs from the annotation's {gt.shape}"
            )
        out.setdefault(it.category, []).append((it.stem, data / it.image, gt, pred))
    for rows in out.values():
        rows.sort(key=lambda r: r[0])
    return out


def label_png(mask: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8), mode="L").save(path)


def official_layout(frames: dict[str, list[tuple]], tmp: Path) -> tuple[Path, Path]:
    """A DAVIS-2017 folder (`val` set = the sequences, only the split's frames) and a
    results folder, both with 0/1 label PNGs."""
    droot, results = tmp / "davis", tmp / "results"
    (droot / "ImageSets" / "2017").mkdir(parents=True)
    (droot / "ImageSets" / "2017" / "val.txt").write_text("".join(f"{s}\n" for s in frames))
    for seq, rows in frames.items():
        img_dir = droot / "JPEGImages" / "480p" / seq
        img_dir.mkdir(parents=True)
        for stem, image, gt, pred in rows:
            (img_dir / f"{stem}.jpg").symlink_to(Path(image).resolve())
            for ann in ("Annotations", "Annotations_unsupervised"):
                label_png(gt, droot / ann / "480p" / seq / f"{stem}.png")
            label_png(pred, results / seq / f"{stem}.png")
    return droot, results


def official_aggregate(evaluation_cls, droot: Path, results: Path, task: str) -> dict:
    """The official evaluation's per-sequence and global statistics (global as
    evaluation_method.py forms them: means over the sequences' values, J&F the mean of the
    J and F means)."""
    res = evaluation_cls(davis_root=str(droot), task=task, gt_set="val").evaluate(str(results))
    out: dict = {}
    for m in ("J", "F"):
        names = list(res[m]["M_per_object"])
        out[m] = {
            "mean": float(np.mean(res[m]["M"])),
            "recall": float(np.mean(res[m]["R"])),
            "decay": float(np.mean(res[m]["D"])),
        }
        out.setdefault("per_sequence", {})
        for k, name in enumerate(names):
            seq = name.rsplit("_", 1)[0]  # "<sequence>_<object>", one object here
            out["per_sequence"].setdefault(seq, {})[m] = {
                "mean": float(res[m]["M"][k]),
                "recall": float(res[m]["R"][k]),
                "decay": float(res[m]["D"][k]),
            }
    out["J&F"] = (out["J"]["mean"] + out["F"]["mean"]) / 2
    return out


def differences(ours: dict, theirs: dict) -> dict[str, float]:
    """Absolute differences of every global and per-sequence statistic."""
    diff = {"J&F": abs(ours["J&F"] - theirs["J&F"])}
    if set(ours["per_sequence"]) != set(theirs["per_sequence"]):
        raise SystemExit(
            f"sequences differ: ours {sorted(ours['per_sequence'])}, official "
            f"{sorted(theirs['per_sequence'])}"
        )
    for m in ("J", "F"):
        for s in ("mean", "recall", "decay"):
            diff[f"{m}.{s}"] = abs(ours[m][s] - theirs[m][s])
            for seq, st in ours["per_sequence"].items():
                diff[f"{seq}.{m}.{s}"] = abs(st[m][s] - theirs["per_sequence"][seq][m][s])
    return diff


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--official",
        type=Path,
        required=True,
        help="checkout of davis2017-evaluation (the folder holding davis2017/)",
    )
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/davis2016_subset")
    ap.add_argument("--layout", default="davis2016", choices=("davis2016", "obj_seg"))
    ap.add_argument("--split", default="val")
    ap.add_argument(
        "--predictions", type=Path, required=True, help="a predict run's predictions/<split> folder"
    )
    ap.add_argument("--report", type=Path, help="that run's report_<split>.json (optional)")
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(args.official.resolve()))
    from davis2017.evaluation import DAVISEvaluation  # the official code, at run time
    from davis2017.metrics import db_eval_boundary, db_eval_iou

    frames = load_frames(args.data, args.layout, args.split, args.predictions)
    n_frames = sum(len(r) for r in frames.values())
    ours_frame = {
        (seq, stem): image_stats(pred, gt, seq, stem)
        for seq, rows in frames.items()
        for stem, _, gt, pred in rows
    }
    per_frame = {"j": 0.0, "f": 0.0}
    for seq, rows in frames.items():
        for stem, _, gt, pred in rows:
            s = ours_frame[(seq, stem)]
            per_frame["j"] = max(per_frame["j"], abs(s.j - float(db_eval_iou(gt, pred))))
            per_frame["f"] = max(per_frame["f"], abs(s.f - float(db_eval_boundary(gt, pred))))
    rows4 = [(seq, stem, s.j, s.f) for (seq, stem), s in ours_frame.items()]
    summary: dict = {
        "split": args.split,
        "data": str(args.data),
        "layout": args.layout,
        "predictions": str(args.predictions),
        "sequences": len(frames),
        "frames_in_split": n_frames,
        "per_frame_max_abs_diff": per_frame,
        "tasks": {},
    }
    with tempfile.TemporaryDirectory(prefix="davis_check_") as tmp:
        droot, results = official_layout(frames, Path(tmp))
        for task, exclude_ends in (("semi-supervised", True), ("unsupervised", False)):
            ours = davis_protocol(rows4, exclude_ends=exclude_ends)
            if ours["skipped"]:
                raise SystemExit(
                    f"sequences with too few frames for the official code: {ours['skipped']}"
                )
            theirs = official_aggregate(DAVISEvaluation, droot, results, task)
            diff = differences(ours, theirs)
            worst = max(diff, key=lambda k: diff[k])
            summary["tasks"][task] = {
                "frames": ours["frames"],
                "frames_evaluated": sum(s["n_frames"] for s in ours["per_sequence"].values()),
                "ours": {k: ours[k] for k in ("J", "F", "J&F")},
                "official": {k: theirs[k] for k in ("J", "F", "J&F")},
                "max_abs_diff": diff[worst],
                "worst": worst,
            }
    if args.report is not None:
        report = json.loads(args.report.read_text())
        rep = {(r["category"], r["stem"]): r for r in report["per_image"]}
        if set(rep) != set(ours_frame):
            raise SystemExit(f"{args.report}: its images differ from the split's annotated ones")
        summary["report_vs_masks_max_abs_diff"] = max(
            max(abs(rep[k]["j"][MASK_VARIANT] - s.j), abs(rep[k]["f"][MASK_VARIANT] - s.f))
            for k, s in ours_frame.items()
        )
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    worst_all = max(
        [
            *per_frame.values(),
            *(t["max_abs_diff"] for t in summary["tasks"].values()),
            summary.get("report_vs_masks_max_abs_diff", 0.0),
        ]
    )
    print(
        f"max abs difference to the official code: {worst_all:.3g} "
        f"({'ok' if worst_all <= args.tol else 'FAILED'}, tolerance {args.tol:g})",
        file=sys.stderr,
    )
    return 0 if worst_all <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
