"""Where `segment`'s time goes on CPU, per image: the heads (linear head + PAC upsampler, the
"pac" variant as segment runs it) against the MobileNetV2 forward, and how both scale with
threads on this machine.

    python benchmarks/heads.py            # one 480x848 obj_seg frame, MobileNetV2 feature shape

Rows: the heads single-threaded with the uint8 guide pyramid (models trained now) and the
float one (models saved before it); the backbone forward per image with 1 and 2 intra-op
threads, and as two concurrent single-threaded streams (what CpuFanout does for the heads).
Best and median: the heads' best of --repeat runs in three interleaved rounds (the best
round and the median round), the backbone's best and median of its runs.
"""

from __future__ import annotations

import statistics
import sys
import threading
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import OBJ_SEG, WEIGHTS, best_and_median, parser, timings  # noqa: E402
from pipeline.core.config import load_config  # noqa: E402
from pipeline.data import fit_box, load_image, to_canvas  # noqa: E402
from pipeline.inference import Predictor  # noqa: E402
from pipeline.models.heads import LinearHead, PacUpsampler, TrainedModels, UpsamplerSpec  # noqa: E402
from pipeline.stages.extract import extractor_of  # noqa: E402


def timed(fn, repeat: int) -> tuple[float, float]:
    """(best, median) seconds of `fn()` after one warm-up call."""
    return best_and_median(timings(fn, repeat))


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--image", default=str(OBJ_SEG / "test"))
    ap.add_argument("--weights", default=str(WEIGHTS))
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--batch", type=int, default=16, help="images per backbone call")
    args = ap.parse_args()

    src = Path(args.image)
    if src.is_dir():
        src = sorted(p for p in src.rglob("*.jpg"))[0]
    cfg = load_config(
        ROOT / "configs" / "default.toml",
        ["backbone.name=mobilenet_v2", f"backbone.weights={args.weights}", "extract.device=cpu"],
    )
    ex = extractor_of(cfg)
    img = load_image(src)
    canvas = np.ascontiguousarray(to_canvas(img, fit_box(*img.shape[:2], ex.patch, ex.fit)))
    torch.set_num_threads(1)
    feats = ex.launch([canvas])()
    c = feats.shape[-1]
    rows = []
    preds = {}
    for pyramid in ("uint8", "float"):
        torch.manual_seed(0)
        spec = UpsamplerSpec(c, ex.patch, residual=True, pyramid=pyramid)
        models = TrainedModels(
            LinearHead(c).eval(), PacUpsampler(spec).eval(), ex.patch, "", {}, {}
        )
        preds[pyramid] = Predictor(models, torch.device("cpu"), 0.5)
    times: dict[str, list[float]] = {k: [] for k in preds}
    for _ in range(3):  # interleaved rounds, so that drifting machine state hits both alike
        for k, pred in preds.items():
            best, med = timed(
                lambda pred=pred: pred._binary(feats, canvas[None], ("pac",)), args.repeat
            )
            times[k].append(best)
    for k, ts in times.items():
        rows.append((f"heads, 1 thread, {k} guide pyramid", min(ts), statistics.median(ts)))

    batch = [canvas] * args.batch
    for threads in (1, 2):
        torch.set_num_threads(threads)
        best, med = timed(lambda: ex.launch(batch)(), max(3, args.repeat // 5))
        rows.append(
            (f"backbone forward, {threads} intra-op thread(s)", best / args.batch, med / args.batch)
        )

    def two_streams() -> None:
        def one() -> None:
            torch.set_num_threads(1)
            ex.launch(batch)()

        ts = [threading.Thread(target=one) for _ in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    best, med = timed(two_streams, max(3, args.repeat // 5))
    rows.append(
        (
            "backbone forward, 2 concurrent 1-thread streams",
            best / (2 * args.batch),
            med / (2 * args.batch),
        )
    )

    print(
        f"{src.name} {canvas.shape[1]}x{canvas.shape[0]}, MobileNetV2 features "
        f"{tuple(feats.shape[1:3])}x{c}; torch {torch.__version__}\n"
    )
    print("| what | best ms/image | median ms/image |\n|---|---:|---:|")
    for label, best, med in rows:
        print(f"| {label} | {best * 1e3:.1f} | {med * 1e3:.1f} |")


if __name__ == "__main__":
    main()
