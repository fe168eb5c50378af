#!/usr/bin/env python
"""Refinement of the PAC (and bilinear) probabilities by pipeline.refine, scored per image as
stage 3 scores masks (J = object IoU, F = DAVIS boundary F, means over images; mIoU from the
summed confusion matrix):

    python benchmarks/refine.py probs --run OUTPUTS/RUN --split val --out P.npz
    python benchmarks/refine.py score P.npz --grid crf.appearance_weight=2,4,8 ...
    python benchmarks/refine.py time [--threads 2]

`probs` runs a trained run's models (read through the pipeline's own loader, checked against
the run's recorded config) on the split's cached features and saves, per image, the canvas,
the annotation, and the PAC and bilinear logits (float16) to one npz, so a parameter sweep
never touches the models again. `score` refines those with each parameter combination of
`--grid` (a refiner's keyword arguments; several `--grid` flags make a product) and prints a
row per combination; `--json` appends the rows to a file. `time` measures seconds per
480 x 854 frame (its 480 x 832 canvas for mobilenet_v2) of each refined variant of stage 3
at the config's [refine] defaults (or of each `--grid` combination) on the CPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core.config import RefineCfg  # noqa: E402
from pipeline.core.keys import RefineKey  # noqa: E402
from pipeline.core.variants import REFINED  # noqa: E402
from pipeline.data.canvas import Box, from_canvas, to_canvas  # noqa: E402
from pipeline.metrics.masks import aggregate, image_stats  # noqa: E402
from pipeline.models.refine import REFINERS as LIBRARY_REFINERS  # noqa: E402
from pipeline.models.refine import refine_logits  # noqa: E402

# pydensecrf's settings in the comparison (its Potts `compat`s as weights)
PYDENSECRF_DEFAULTS = {
    "iterations": 5,
    "appearance_weight": 10.0,
    "appearance_xy": 80.0,
    "appearance_rgb": 13.0,
    "smoothness_weight": 3.0,
    "smoothness_xy": 3.0,
}


def pydensecrf_reference(
    prob: torch.Tensor, image: torch.Tensor, **settings: float
) -> torch.Tensor:
    """The compiled fully connected CRF (pydensecrf2; only where installed, never a
    dependency), on the same unary, for comparison: the weights are its Potts `compat`s
    (its kernels are normalised per pixel, so they do not mean what dense_crf's weights do).
    `settings`: PYDENSECRF_DEFAULTS' keys."""
    unknown = set(settings) - set(PYDENSECRF_DEFAULTS)
    if unknown:
        raise ValueError(f"pydensecrf takes no {', '.join(sorted(unknown))}")
    kw = {**PYDENSECRF_DEFAULTS, **settings}
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    p = prob[0, 0].double().numpy()
    rgb = np.ascontiguousarray(image[0].permute(1, 2, 0).numpy().astype(np.uint8))
    H, W = p.shape
    crf = dcrf.DenseCRF2D(W, H, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(np.stack([1 - p, p]), clip=1e-5)))
    crf.addPairwiseGaussian(sxy=kw["smoothness_xy"], compat=kw["smoothness_weight"])
    crf.addPairwiseBilateral(
        sxy=kw["appearance_xy"],
        srgb=kw["appearance_rgb"],
        rgbim=rgb,
        compat=kw["appearance_weight"],
    )
    q = np.array(crf.inference(int(kw["iterations"])))[1].reshape(H, W)
    return torch.from_numpy(q).float()[None, None]


# the library's refiners (what stage 3's refined variants run), and the compiled reference
REFINERS: dict[str, Callable[..., torch.Tensor]] = {
    **LIBRARY_REFINERS,
    "pydensecrf": pydensecrf_reference,
}


PER_IMAGE = ("canvas", "gt", "pac", "bilinear")  # arrays whose shape may differ between images


def _per_image(name: str, i: int) -> str:
    """The npz entry of image `i`'s array `name` (one entry each: no object arrays, so the
    file loads without unpickling)."""
    return f"{name}_{i:05d}"


def cmd_probs(args: argparse.Namespace) -> None:
    from pipeline.core.layout import RunLayout
    from pipeline.inference import checked_models
    from pipeline.models.devices import config_keys
    from pipeline.models.heads import upsample_logits
    from pipeline.runconfig import read_record
    from pipeline.store import FeatureStore

    cfg, _ = read_record(Path(args.run))
    keys = config_keys(cfg)
    store = FeatureStore.open(cfg.paths.cache, keys.feature, keys.data, args.split)
    rows: dict[str, list] = {
        k: [] for k in ("canvas", "gt", "pac", "bilinear", "box", "size", "name")
    }
    with (
        checked_models(RunLayout(Path(args.run)), keys, cfg.paths.cache, "cpu") as models,
        torch.inference_mode(),
    ):
        for meta in store.items:
            if not meta.annotated:
                continue
            item = store.read(meta.index)
            canvas = np.ascontiguousarray(to_canvas(item.image, meta.box))
            f = torch.from_numpy(item.features.astype(np.float32)).permute(2, 0, 1)[None]
            img = torch.from_numpy(canvas).permute(2, 0, 1)[None]
            base = models.head(f)
            pac = models.upsampler(f, img, base)
            bil = upsample_logits(base, tuple(img.shape[-2:]), "bilinear")
            rows["canvas"].append(canvas)
            rows["gt"].append(np.packbits(item.mask))
            rows["pac"].append(pac[0, 0].numpy().astype(np.float16))
            rows["bilinear"].append(bil[0, 0].numpy().astype(np.float16))
            rows["box"].append(meta.box.as_tuple())
            rows["size"].append(meta.orig_size)
            rows["name"].append(f"{meta.category}/{meta.stem}")
    arrays = {k: np.array(v) for k, v in rows.items() if k not in PER_IMAGE}
    for k in PER_IMAGE:
        arrays.update({_per_image(k, i): a for i, a in enumerate(rows[k])})
    np.savez(args.out, **arrays)
    print(f"{len(rows['name'])} images of {args.run} [{args.split}] -> {args.out}")


def load_probs(path: str) -> dict[str, Any]:
    """What `probs` wrote: the per-image arrays (PER_IMAGE) as lists, the rest as arrays."""
    with np.load(path, allow_pickle=False) as z:
        out: dict[str, Any] = {k: z[k] for k in z.files if k.rpartition("_")[0] not in PER_IMAGE}
        n = len(out["name"])
        out.update({k: [z[_per_image(k, i)] for i in range(n)] for k in PER_IMAGE})
        return out


def parse_grid(specs: list[str]) -> list[tuple[str, dict]]:
    """["crf.a=1,2", "crf.b=3"] -> [("crf", {"a": 1, "b": 3}), ("crf", {"a": 2, "b": 3})]."""
    by_refiner: dict[str, list[tuple[str, list]]] = {}
    for spec in specs:
        key, _, values = spec.partition("=")
        refiner, _, arg = key.partition(".")
        vals = [
            json.loads(v) if not v.startswith("(") else tuple(json.loads(f"[{v[1:-1]}]"))
            for v in values.split(";" if "(" in values else ",")
        ]
        by_refiner.setdefault(refiner, []).append((arg, vals))
    out = []
    for refiner, axes in by_refiner.items():
        if refiner == "none":
            out.append(("none", {}))
            continue
        for combo in itertools.product(*(v for _, v in axes)):
            out.append((refiner, {a: v for (a, _), v in zip(axes, combo, strict=True)}))
    return out


def score(
    data: dict[str, np.ndarray], source: str, refiner: str, kwargs: dict, threshold: float = 0.5
) -> dict:
    stats, seconds = [], 0.0
    for i, name in enumerate(data["name"]):
        logits = torch.from_numpy(data[source][i].astype(np.float32))[None, None]
        prob = torch.sigmoid(logits)
        img = torch.from_numpy(data["canvas"][i]).permute(2, 0, 1)[None]
        t0 = time.process_time()
        if refiner != "none":
            prob = REFINERS[refiner](prob, img, **kwargs)
        seconds += time.process_time() - t0
        box = Box(*(int(v) for v in data["box"][i]))
        size = tuple(int(v) for v in data["size"][i])
        mask = from_canvas((prob[0, 0] > threshold).numpy(), box, size)
        gt = np.unpackbits(data["gt"][i])[: size[0] * size[1]].reshape(size).astype(bool)
        cat, stem = str(name).split("/", 1)
        stats.append(image_stats(mask, gt, cat, stem))
    m = aggregate(stats)
    cats = sorted({s.category for s in stats})
    per_category = {
        c: {
            k: aggregate([s for s in stats if s.category == c])[k] for k in ("j_mean", "boundary_f")
        }
        for c in cats
    }
    return {
        "per_category": per_category,
        "source": source,
        "refiner": refiner,
        "kwargs": kwargs,
        "threshold": threshold,
        "miou": m["miou"],
        "j_mean": m["j_mean"],
        "boundary_f": m["boundary_f"],
        "precision": m["precision"],
        "recall": m["recall"],
        "n_images": m["n_images"],
        "cpu_s_per_image": seconds / len(stats),
    }


def cmd_score(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    data = load_probs(args.probs)
    combos = parse_grid(args.grid) if args.grid else [("none", {})]
    for source in args.source.split(","):
        for threshold in [float(t) for t in args.threshold.split(",")]:
            for refiner, kwargs in combos:
                row = {"probs": args.probs, **score(data, source, refiner, kwargs, threshold)}
                print(
                    f"{source:8s} {refiner:6s} t={threshold:.2f} {json.dumps(kwargs):70s} "
                    f"mIoU {row['miou']:.4f} J {row['j_mean']:.4f} F {row['boundary_f']:.4f}"
                    f" P {row['precision']:.3f} R {row['recall']:.3f} "
                    f"cpu {row['cpu_s_per_image']:.2f} s",
                    flush=True,
                )
                if args.per_category:
                    print(
                        "    "
                        + "  ".join(
                            f"{c} {m['j_mean']:.3f}/{m['boundary_f']:.3f}"
                            for c, m in row["per_category"].items()
                        )
                    )
                if args.json:
                    with open(args.json, "a") as fh:
                        fh.write(json.dumps(row) + "\n")


def _seconds(fn: Callable[[], object], repeat: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of `repeat` calls of `fn`, after one warm-up call."""
    fn()
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def cmd_time(args: argparse.Namespace) -> None:
    """Wall seconds per 480 x 832 frame (the median of `--repeat`), after a warm-up: each
    refined variant of stage 3 (core.variants.REFINED) as stage 3 runs it (refine_logits at
    the config's [refine] defaults) or, with `--grid`, each combination given."""
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (1, 3, 480, 832), dtype=torch.uint8, generator=gen)
    prob = torch.rand((1, 1, 480, 832), generator=gen)
    logits = torch.logit(prob.clamp(1e-5, 1 - 1e-5))
    defaults = RefineKey.of(dict(RefineCfg().__dict__))
    cases: list[tuple[str, dict, Callable[[], object]]]
    if args.grid:
        cases = [
            (refiner, kwargs, partial(REFINERS[refiner], prob, img, **kwargs))
            for refiner, kwargs in parse_grid(args.grid)
        ]
    else:
        cases = [
            (variant, kw, partial(refine_logits, refiner, logits, img, **kw))
            for variant, (_, refiner) in REFINED.items()
            for kw in [defaults.kwargs(refiner)]
        ]
    for label, kwargs, fn in cases:
        wall, cpu = _seconds(fn, args.repeat)
        print(
            f"{label:10s} {json.dumps(kwargs):70s} wall {np.median(wall):.3f} s "
            f"(min {min(wall):.3f})  cpu {np.median(cpu):.3f} s  threads {args.threads}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probs")
    p.add_argument("--run", required=True, help="the run folder (<paths.outputs>/<run.name>)")
    p.add_argument("--split", required=True)
    p.add_argument("--out", required=True)
    s = sub.add_parser("score")
    s.add_argument("probs")
    s.add_argument("--grid", action="append", help='"crf.key=v1,v2" (tuples: "(1,4);(1,8)")')
    s.add_argument("--source", default="pac", help="pac,bilinear")
    s.add_argument("--threshold", default="0.5")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--json", default=None)
    s.add_argument("--per-category", action="store_true", help="also J / F per category")
    t = sub.add_parser("time", help="seconds per 480p frame of each refined variant")
    t.add_argument("--grid", action="append", help="time these combinations instead")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    {"probs": cmd_probs, "score": cmd_score, "time": cmd_time}[args.cmd](args)


if __name__ == "__main__":
    main()
