"""`segment` throughput against the pure backbone forward, on the same images, in one run:

  (a) forward: `Extractor.launch` (stage 1's batched forward, the one segment uses) on
      pre-decoded canvases, same-size batches of extract.batch_size, no I/O: what segment
      can at best reach
  (b) segment end to end (`run_segment`, --force): listing, reading, hashing, decoding,
      backbone, heads (`Predictor.masks`), PNG writing, the record; without and with overlays

    python benchmarks/segment.py             # MobileNetV2 on ../shared/data/obj_seg (142 frames)
    python benchmarks/segment.py --outputs /path/to/outputs --run default

Without --outputs a quick run (extract + a short train-head) is trained in a temporary folder
first (not timed). The frames are passed as one folder: a temporary folder of links to the
layout's images (the annotations are left out).
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from pipeline.commands.segment import run_segment  # noqa: E402
from pipeline.core.config import load_config  # noqa: E402
from pipeline.data import (  # noqa: E402
    fit_box,
    list_items,
    list_splits,
    load_image,
    same_size_batches,
    to_canvas,
)
from pipeline.models.devices import apply_threads, resolve_device  # noqa: E402
from pipeline.stages.extract import extractor_of, run_extract  # noqa: E402
from pipeline.stages.train import run_train  # noqa: E402

QUICK_TRAIN = ["train.epochs=2", "train.linear_epochs=5", "train.crop=160"]


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"{torch.get_num_threads()}-thread CPU ({cpu}), torch {torch.__version__}"


def link_frames(root: Path, layout: str, dest: Path) -> list[Path]:
    """A folder of links <split>/<category>/<file> to the layout's images (no annotations)."""
    frames = []
    for split in list_splits(root, layout):
        for it in list_items(root, layout, split)[0]:
            link = dest / split / it.category / Path(it.image).name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((root / it.image).resolve())
            frames.append(link)
    return frames


def forward_only(cfg, frames: list[Path]) -> float:
    """Seconds of stage 1's batched forward over all frames' canvases (decoded beforehand)."""
    ex = extractor_of(cfg)
    canvases = []
    for f in frames:
        img = load_image(f)
        box = fit_box(*img.shape[:2], ex.patch, ex.fit)
        canvases.append(np.ascontiguousarray(to_canvas(img, box)))
    batches = same_size_batches(
        [fit_box(c.shape[0], c.shape[1], ex.patch, ex.fit) for c in canvases], ex.batch_size
    )
    ex.launch([canvases[i] for i in batches[0]])()  # warm-up
    if ex.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in batches:
        ex.launch([canvases[i] for i in b])()
    return time.perf_counter() - t0


def segment_once(cfg, frames_dir: Path, out: Path, overlays: bool) -> float:
    t0 = time.perf_counter()
    res = run_segment(cfg, [frames_dir], out, overlays=overlays, force=True, progress=False)
    dt = time.perf_counter() - t0
    assert not res.errors, res.errors
    return dt


def main() -> None:
    ap = common.parser(__doc__)
    common.add_dataset_args(ap)
    ap.add_argument("--outputs", default=None, help="paths.outputs of an existing trained run")
    ap.add_argument("--run", default="default", help="run.name of that run")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="timed repetitions (median reported)")
    args = common.parse_dataset_args(ap)
    root = args.data
    work = Path(tempfile.mkdtemp(prefix="bench_segment_"))
    try:
        outputs = Path(args.outputs) if args.outputs else work / "outputs"
        sets = common.overrides(
            {
                **common.dataset_values(args),
                "extract.device": args.device,
                "train.device": args.device,
                "predict.device": args.device,
                "extract.batch_size": args.batch_size,
                "paths.cache": work / "cache",
                "paths.outputs": outputs,
                "run.name": args.run,
            }
        )
        if not args.outputs:
            sets += QUICK_TRAIN
        cfg = load_config(ROOT / "configs" / "default.toml", sets)
        apply_threads(cfg.run.threads)
        if not args.outputs:
            t0 = time.perf_counter()
            run_extract(cfg, [cfg.data.train_split], log=lambda s: None, progress=False)
            run_train(cfg, log=lambda s: None, progress=False)
            print(
                f"(trained a quick run in {time.perf_counter() - t0:.0f} s; not timed)",
                file=sys.stderr,
            )
        frames = link_frames(root, args.layout, work / "frames")
        n = len(frames)
        segment_once(cfg, work / "frames", work / "warm", False)  # warm-up: page cache, allocator
        load0 = os.getloadavg()[0]
        times: dict[str, list[float]] = {"forward": [], "plain": [], "overlays": []}
        for _ in range(args.repeat):  # interleaved, so that background load hits all alike
            times["forward"].append(forward_only(cfg, frames))
            times["plain"].append(segment_once(cfg, work / "frames", work / "seg", False))
            times["overlays"].append(segment_once(cfg, work / "frames", work / "seg_ov", True))
        load1 = os.getloadavg()[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    t = {k: statistics.median(v) for k, v in times.items()}
    device = resolve_device(args.device)
    rows = [
        (
            f"(a) backbone forward only (Extractor.launch, batch {args.batch_size}, no I/O)",
            t["forward"],
        ),
        ("(b) `segment --no-overlays` end to end", t["plain"]),
        ("(b') `segment` end to end, with overlays (default)", t["overlays"]),
    ]
    lines = [
        f"segment vs forward: {args.backbone} ({Path(args.weights).name}), {n} frames of "
        f"{root.name}, device {device}; {machine(device)}; median of {args.repeat}; "
        f"1-min load average {load0:.2f} -> {load1:.2f}",
        "",
        "| way | images | seconds | images/s | vs (a) |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, s in rows:
        lines.append(f"| {label} | {n} | {s:.2f} | {n / s:.1f} | {100 * t['forward'] / s:.0f} % |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
