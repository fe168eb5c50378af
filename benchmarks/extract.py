"""Stage 1 throughput: the course's way vs pure model forward vs this stage end to end.

On the same images, backbone and weights, in one run:
  (a) course: one image at a time, batch 1, fp32, no inference optimisations, torch.save per image
  (b) forward: the stage's model forward alone on pre-decoded canvases (what (c) can at best reach)
      and, for reference, the plain model at the configured batch size
  (c) stage: `extract-features` end to end into a fresh cache (listing, hashing, decoding,
      forward, HDF5 writing)

    python benchmarks/extract.py                      # MobileNetV2 on ../shared/data/obj_seg
    python benchmarks/extract.py --backbone dino_vits16 --weights random --device cuda
"""

from __future__ import annotations

import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from pipeline.core.config import load_config  # noqa: E402
from pipeline.data import fit_box, list_items, list_splits, load_image, to_canvas  # noqa: E402
from pipeline.models.backbones import create_backbone  # noqa: E402
from pipeline.models.devices import autocast_dtype, resolve_device  # noqa: E402
from pipeline.stages.extract import extractor_of, run_extract  # noqa: E402


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{torch.get_num_threads()}-thread CPU ({cpu}), torch {torch.__version__}"


def course_way(root: Path, items, name: str, weights: str, device, out: Path) -> float:
    """The notebook loop: decode, normalise, forward one image in fp32, torch.save."""
    model = create_backbone(name, weights).to(device)
    patch = model.spec.patch_size
    t0 = time.perf_counter()
    with torch.no_grad():
        for it in items:
            img = load_image(root / it.image)
            canvas = to_canvas(img, fit_box(img.shape[0], img.shape[1], patch, "crop"))
            x = torch.from_numpy(np.ascontiguousarray(canvas)).permute(2, 0, 1)[None].to(device)
            feats = model(x)[0].cpu()
            torch.save(feats, out / f"{it.category}_{it.stem}.pt")
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def forward_only(cfg, canvases: list[np.ndarray]) -> float:
    """The stage's own engine (same optimisations, batching and precision), no I/O."""
    ex = extractor_of(cfg)
    bs = cfg.extract.batch_size
    ex.launch(canvases[: min(bs, len(canvases))])()  # warm-up
    t0 = time.perf_counter()
    for k in range(0, len(canvases), bs):
        ex.launch(canvases[k : k + bs])()
    return time.perf_counter() - t0


def plain_batched(name: str, weights: str, device, canvases, bs: int, precision: str) -> float:
    model = create_backbone(name, weights).to(device)
    amp = autocast_dtype(precision, device)
    x_all = [
        torch.from_numpy(np.stack(canvases[k : k + bs])).permute(0, 3, 1, 2)
        for k in range(0, len(canvases), bs)
    ]
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None),
    ):
        model(x_all[0].to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for x in x_all:
            model(x.to(device, non_blocking=True)).float().cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = common.parser(__doc__)
    common.add_dataset_args(ap)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--markdown-out", default=None, help="append the table to this file")
    args = common.parse_dataset_args(ap)
    root = args.data
    device = resolve_device(args.device)
    items = [
        it for s in list_splits(root, args.layout) for it in list_items(root, args.layout, s)[0]
    ]
    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        sets = common.overrides(
            {
                **common.dataset_values(args),
                "extract.device": args.device,
                "extract.batch_size": args.batch_size,
                "extract.num_workers": args.workers,
                "extract.precision": args.precision,
                "paths.cache": work / "cache",
                "paths.outputs": work / "outputs",
            }
        )
        cfg = load_config(ROOT / "configs" / "default.toml", sets)
        n = len(items)

        (work / "course").mkdir()
        t_a = course_way(root, items, args.backbone, args.weights, device, work / "course")

        patch = create_backbone(args.backbone, "random").spec.patch_size
        canvases = []
        for it in items:
            img = load_image(root / it.image)
            box = fit_box(img.shape[0], img.shape[1], patch, "crop")
            canvases.append(np.ascontiguousarray(to_canvas(img, box)))
        t_b = forward_only(cfg, canvases)
        t_b_plain = plain_batched(
            args.backbone, args.weights, device, canvases, args.batch_size, args.precision
        )
        del canvases

        t0 = time.perf_counter()
        res = run_extract(cfg, log=lambda s: None, progress=False)
        t_c = time.perf_counter() - t0
        assert res.n_images == n and not res.errors, res.errors
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = [
        ("(a) course: batch 1, fp32, torch.save per image", t_a),
        (f"(b) forward only, stage engine, batch {args.batch_size} (no I/O)", t_b),
        (f"(b') forward only, plain model, batch {args.batch_size} (no I/O)", t_b_plain),
        ("(c) extract-features end to end", t_c),
    ]
    head = (
        f"Stage 1, {args.backbone} ({Path(args.weights).name}), {n} images of {root.name}, "
        f"device {device}, precision {args.precision}; machine: {machine(device)}"
    )
    lines = [head, "", "| way | seconds | images/s | vs (a) |", "|---|---:|---:|---:|"]
    for label, t in rows:
        lines.append(f"| {label} | {t:.1f} | {n / t:.1f} | {t_a / t:.2f}x |")
    lines.append("")
    lines.append(
        f"(c) reaches {100 * t_b / t_c:.0f} % of (b)'s throughput and is "
        f"{t_a / t_c:.2f}x the course's way."
    )
    text = "\n".join(lines)
    print(text)
    if args.markdown_out:
        with open(args.markdown_out, "a") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()
