#!/usr/bin/env python
"""The device check: the real commands' code paths on one device, as one JSON object.

    PYTHONPATH=. python benchmarks/gpu_check.py --device cuda --out gpu_check.json
    PYTHONPATH=. python benchmarks/gpu_check.py --quick --device cpu --out /tmp/gc.json  # CI

It calls the pipeline's own stage functions (`run_extract`, `run_train`, `run_predict`,
`run_segment`, `run_export`; stage 1 killed and resumed through `cli.py extract-features` in a
child process), never re-implementations, on `--device` (default: cuda when available) and
writes one JSON object to `--out`, rewritten atomically after each step, so that a run cut off
by a time limit still leaves what it measured. Exit 0 when every check holds and no step
failed, else 1.

Data: `--data DIR`, the obj_seg dataset (default `gpu_data/obj_seg`, else
`../shared/data/obj_seg`), and `--weights FILE`, the MobileNetV2 ImageNet weights (default
`gpu_data/mobilenet_v2_imagenet_features.pt`, else `../shared/weights/...`). `gpu_data/` is
git-ignored and travels with the checkout to a lent machine (CONTRIBUTING.md, "The device
check on a lent machine", says how to fill it). Nothing else is read; scratch files go to a
temporary folder (`--work`), removed at the end unless `--keep-work`.

Two parts:
- checks, with `mobilenet_v2` and the ImageNet weights (a model that must segment something: the
  predicted foreground fraction must lie in 5..95 %): `features_match_fp32` (device features at
  the stage's precision against CPU float32), `masks_match_cpu` (stage 3 on the device against
  stage 3 on CPU, same features and models), `segment_matches_predict` (on the device),
  `export_runs_on_device` (the exported program moved with torch.export's
  `move_to_device_pass` agrees with `segment`), `resume_after_kill` (stage 1 killed after one
  shard has landed, rerun: that shard kept byte for byte, the rest equal to an uninterrupted run
  within the precision's tolerance);
- speed, with `dino_vits16` (random weights unless `--dino-weights FILE`: weights do not change
  speed; the JSON says which) at 480 x 854: the pure forward on device-resident tensors, stage 1
  cold from JPEG files to the finished store (with where its time goes: decode, host-to-device,
  forward, write), train-head on 449 frames, predict and segment. Rates are steady state over
  `--seconds` of work (repeated frames; the stage-1 store is capped at `--max-store-gb`),
  excluding start-up and model load.

`--quick` shrinks everything (frames downscaled 4x, a few images, a tiny training, the smallest
export) so that it runs in CI on 2 CPU cores in under 3 minutes; its figures are not
benchmarks. The check never imports Dask (it blocks the import, as the GPU machine has none).
"""

from __future__ import annotations

import time

T_ENTRY = time.perf_counter()  # before torch is imported

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import add_sets_arg  # noqa: E402

GPU_DATA = ROOT / "gpu_data"  # git-ignored; carried to a lent machine
SHARED = ROOT.parent / "shared"
DATA_CANDIDATES = (GPU_DATA / "obj_seg", SHARED / "data" / "obj_seg")
WEIGHTS_NAME = "mobilenet_v2_imagenet_features.pt"
WEIGHTS_CANDIDATES = (GPU_DATA / WEIGHTS_NAME, SHARED / "weights" / WEIGHTS_NAME)
SCHEMA = 1

# tolerances (see docs/scaling.md, "The device check"): bf16 keeps 8 significant bits
# (relative rounding 2^-9 per operation); through a network the features move by a few per
# cent at most, i.e. a cosine of >= 0.999 per patch (1 - cos ~ err^2 / 2). Masks: a pixel
# flips only where the probability sits at the threshold.
COSINE_MIN = 0.99  # every patch
COSINE_MEAN_MIN = 0.999  # mean over patches
PIXELS_MIN = 0.995  # fraction of equal mask pixels
FOREGROUND = (0.05, 0.95)  # the predicted foreground fraction of a non-degenerate model
TRAIN_FRAMES = 449  # train-head's speed figure: obj_seg frames repeated to 449
SPEED_SIZE = (480, 854)
QUICK_SCALE = 4  # --quick: frames downscaled by this factor (854 x 480 -> 213 x 120)
QUICK_QUALITY = {"train": 8, "test": 4}  # --quick: images per category
QUICK_SPEED = {"train": 16, "test": 32}  # --quick: images in the speed splits
QUICK_BATCH = 8  # --quick: extract.batch_size of the speed part
EXPORT_BATCH = 8  # images per call of the exported program
RESUME_SHARDS = 1  # stage 1 is killed once this many shards have landed


class _NoDask:
    """An import hook that refuses dask and distributed: the GPU machine has neither, so a
    stray import on this path must fail here too."""

    def find_spec(self, name, _path=None, _target=None):
        """ImportError for dask and distributed; None (not found here) for any other."""
        if name.split(".")[0] in ("dask", "distributed"):
            raise ImportError(
                f"{name}: not available to the device check (no Dask on the GPU machine)"
            )


# ----------------------------------------------------------------------------- the JSON


def atomic_write_json(path: Path, obj: dict) -> None:
    """Write `obj` as strict JSON to `path` atomically (fsutil's writer: a reader, or a kill,
    never sees half a file)."""
    from pipeline.core.fsutil import atomic_write_bytes

    atomic_write_bytes(
        path, (json.dumps(obj, indent=1, allow_nan=False, default=str) + "\n").encode()
    )


def _finite(value: Any) -> Any:
    """JSON-safe: non-finite floats become None, floats are rounded to 6 significant digits."""
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class Report:
    """The JSON object, rewritten after every change: figures, `checks` (name -> bool), the
    details behind each check and figure, each step's seconds, and the errors of failed steps."""

    def __init__(self, path: Path | None):
        self.path = path
        self.data: dict[str, Any] = {
            "schema": SCHEMA,
            "complete": False,
            "checks": {},
            "details": {},
            "steps": {},
            "errors": {},
        }
        self.write()

    def set(self, **values: Any) -> None:
        self.data.update(values)
        self.write()

    def detail(self, name: str, **values: Any) -> None:
        self.data["details"].setdefault(name, {}).update(values)
        self.write()

    def check(self, name: str, ok: bool, **why: Any) -> None:
        self.data["checks"][name] = bool(ok)
        self.detail(name, **why)
        print(
            f"[gpu_check] check {name}: {'PASS' if ok else 'FAIL'} {_finite(why)}",
            file=sys.stderr,
            flush=True,
        )

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time one step; an exception is recorded (last lines of its traceback) and the run
        goes on with the next step."""
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            yield
        except Exception as e:  # noqa: BLE001 - recorded, and the next step runs
            self.data["errors"][name] = f"{type(e).__name__}: {e}\n" + "".join(
                traceback.format_exc().splitlines(True)[-12:]
            )
            print(
                f"[gpu_check] {name} FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True
            )
        finally:
            s = time.perf_counter() - t0
            self.data["steps"][name] = s
            print(f"[gpu_check] {name}: {s:.1f} s", file=sys.stderr, flush=True)
            self.write()

    @property
    def ok(self) -> bool:
        return not self.data["errors"] and all(self.data["checks"].values())

    def write(self) -> None:
        if self.path is not None:
            atomic_write_json(self.path, _finite(self.data))


# ----------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--device",
        default=None,
        help="cuda, cuda:N or cpu (default: cuda when available, else cpu)",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="the obj_seg dataset (default: gpu_data/obj_seg, else ../shared/data/obj_seg)",
    )
    p.add_argument(
        "--weights",
        type=Path,
        default=None,
        help=f"MobileNetV2 ImageNet weights (default: gpu_data/{WEIGHTS_NAME}, else "
        "../shared/weights/...)",
    )
    p.add_argument(
        "--dino-weights",
        default="random",
        help="dino_vits16 weights for the speed part (a file; default random: "
        "weights do not change speed)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes: a smoke test of every path (CI), not a benchmark",
    )
    p.add_argument("--out", type=Path, default=None, help="the JSON file (default: stdout only)")
    p.add_argument(
        "--work", type=Path, default=None, help="scratch folder (default: a new temporary folder)"
    )
    p.add_argument("--keep-work", action="store_true", help="keep the scratch folder")
    p.add_argument(
        "--seconds", type=float, default=None, help="work per speed figure (default 20; --quick 1)"
    )
    p.add_argument(
        "--max-store-gb",
        type=float,
        default=12.0,
        help="cap on the stage-1 speed store (disk), default 12",
    )
    add_sets_arg(p, "extra config override for the speed part, e.g. extract.num_workers=16")
    p.add_argument(
        "--skip", action="append", default=[], choices=("checks", "speed"), help="leave out a part"
    )
    args = p.parse_args(argv)
    if args.seconds is None:
        args.seconds = 1.0 if args.quick else 20.0
    for s in args.sets:
        if "=" not in s:
            p.error(f"--set {s!r}: expected KEY=VALUE")
    return args


def _first_existing(given: Path | None, candidates: tuple[Path, ...], what: str) -> Path:
    if given is not None:
        if not given.exists():
            raise SystemExit(f"gpu_check: {what} {given} does not exist")
        return given
    for c in candidates:
        if c.exists():
            return c
    raise SystemExit(
        f"gpu_check: no {what} found at {' or '.join(map(str, candidates))}; "
        "see CONTRIBUTING.md, the device check"
    )


# ----------------------------------------------------------------------------- data


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _frames(root: Path, split: str) -> list[tuple[str, Path, Path]]:
    """(category, image, mask) of an obj_seg split, in order."""
    out = []
    for img in sorted((root / split).glob("*/images/*.jpg")):
        out.append(
            (img.parent.parent.name, img, img.parent.parent / "annotations" / f"{img.stem}.png")
        )
    return out


def _downscaled(src: Path, dst: Path, scale: int, mask: bool) -> None:
    from PIL import Image

    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        size = (max(1, im.width // scale), max(1, im.height // scale))
        small = im.resize(size, Image.Resampling.NEAREST if mask else Image.Resampling.BILINEAR)
        if mask:
            small.save(dst)
        else:
            small.convert("RGB").save(dst, quality=90)


def quality_data(src: Path, work: Path, quick: bool) -> Path:
    """The data of the checks: obj_seg itself, or (--quick) the first few frames per category
    downscaled."""
    if not quick:
        return src
    dst = work / "quality_data"
    for split, n in QUICK_QUALITY.items():
        seen: dict[str, int] = {}
        for cat, img, mask in _frames(src, split):
            if seen.get(cat, 0) >= n:
                continue
            seen[cat] = seen.get(cat, 0) + 1
            _downscaled(img, dst / split / cat / "images" / img.name, QUICK_SCALE, False)
            _downscaled(mask, dst / split / cat / "annotations" / mask.name, QUICK_SCALE, True)
    return dst


def repeated_split(src: Path, dst: Path, split: str, n: int, per_category: int = 256) -> None:
    """An obj_seg split of `n` images: src's frames (all splits) cycled, linked, in categories
    of `per_category` images."""
    frames = _frames(src, "train") + _frames(src, "test")
    for k in range(n):
        cat, img, mask = frames[k % len(frames)]
        folder = dst / split / f"r{k // per_category:04d}"
        stem = f"{k:06d}_{cat}_{img.stem}"
        _link(img, folder / "images" / f"{stem}.jpg")
        _link(mask, folder / "annotations" / f"{stem}.png")


def segment_inputs(data: Path, split: str, dst: Path, limit: int | None = None) -> Path:
    """The split's images as `<dst>/<category>/<stem>.jpg` (segment's input folder; its
    masks land at `<out>/<category>/<stem>.png`, as predict's do)."""
    for k, (cat, img, _) in enumerate(_frames(data, split)):
        if limit is not None and k >= limit:
            break
        _link(img, dst / cat / img.name)
    return dst


# ----------------------------------------------------------------------------- helpers


def device_info(device) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        "host": platform.node(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gb=props.total_memory / 1e9,
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        info["name"] = platform.processor() or platform.machine()
    return info


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device) -> tuple[float, str]:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9, "torch.cuda.max_memory_allocated"
    return (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "ru_maxrss of this process",
    )


def backbone_runner(cfg, device=None):
    """The stage's backbone forward (pipeline.inference.BackboneRunner, or stage 1's Extractor
    in versions before that module)."""
    try:
        from pipeline.models.devices import config_keys, resolve_device
    except ImportError:  # before the keys (BackboneRunner took the config)
        try:
            from pipeline.inference import BackboneRunner
        except ImportError:
            from pipeline.stages.extract import Extractor as BackboneRunner
        return BackboneRunner(cfg, device)
    from pipeline.inference import BackboneRunner

    return BackboneRunner(
        config_keys(cfg).feature,
        cfg.backbone.weights,
        device or resolve_device(cfg.extract.device),
        cfg.extract.batch_size,
        cfg.extract.compile,
    )


def store_of(cfg):
    """The folder of the config's feature store."""
    from pipeline.models.devices import config_keys
    from pipeline.store import store_dir

    return store_dir(cfg.paths.cache, config_keys(cfg).feature)


def make_config(sets: list[str]):
    from pipeline.core.config import load_config

    return load_config(ROOT / "configs" / "default.toml", sets)


def base_sets(work: Path, name: str, data: Path, device: str) -> list[str]:
    return [
        f"data.root={data}",
        "data.layout=obj_seg",
        f"paths.cache={work / name / 'cache'}",
        f"paths.outputs={work / name / 'outputs'}",
        f"extract.device={device}",
        f"train.device={device}",
        f"predict.device={device}",
        "predict.thumbnails=2",
    ]


def read_mask(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im) > 127


def compare_masks(a_dir: Path, b_dir: Path, rels: list[str]) -> dict[str, Any]:
    """Pixel agreement and byte-identical files of the masks `rels` under two folders."""
    equal = total = identical = 0
    fg = 0
    for rel in rels:
        a, b = a_dir / rel, b_dir / rel
        identical += a.read_bytes() == b.read_bytes()
        ma, mb = read_mask(a), read_mask(b)
        if ma.shape != mb.shape:
            raise AssertionError(f"{rel}: mask sizes differ {ma.shape} vs {mb.shape}")
        equal += int((ma == mb).sum())
        total += ma.size
        fg += int(ma.sum())
    return {
        "masks": len(rels),
        "identical_files": identical,
        "pixel_agreement": equal / max(1, total),
        "foreground_fraction": fg / max(1, total),
    }


def cosine_per_patch(a, b) -> tuple[float, float]:
    """(min, mean) cosine similarity of corresponding feature vectors (..., C)."""
    import numpy as np

    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)
    return float(cos.min()), float(cos.mean())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Timers:
    """Seconds and calls per name, summed over threads (`patch` wraps a module attribute and
    undoes it on exit)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()
        self._undo: list[Callable[[], None]] = []

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds
            self.calls[name] = self.calls.get(name, 0) + 1

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.add(name, time.perf_counter() - t0)

        return timed

    def patch(self, owner: Any, attr: str, name: str) -> bool:
        fn = getattr(owner, attr, None)
        if fn is None:
            return False
        setattr(owner, attr, self.wrap(name, fn))
        self._undo.append(lambda: setattr(owner, attr, fn))
        return True

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


@contextlib.contextmanager
def stage1_timers(timers: Timers) -> Iterator[list[str]]:
    """Where stage 1's time goes, measured inside the real stage: decode (thread-seconds over
    the decoding threads), canvas (main thread), launch (main thread: stacking, host-to-device
    copy and the forward's launch; on CPU the whole forward), fetch (main thread waiting for
    the device and the copy back), write (the writer thread: HDF5 shard and receipt)."""
    import pipeline.stages.extract_engine as ex

    runner_cls: Any
    try:
        from pipeline.inference import BackboneRunner

        runner_cls = BackboneRunner
    except ImportError:
        runner_cls = ex.Extractor
    found = []
    for owner, attr, name in (
        (ex, "decode", "decode"),
        (ex, "to_canvas", "canvas"),
        (ex, "write_shard", "write"),
    ):
        if timers.patch(owner, attr, name):
            found.append(name)
    launch = runner_cls.launch

    def timed_launch(self, *a, **k):
        t0 = time.perf_counter()
        fetch = launch(self, *a, **k)
        timers.add("launch", time.perf_counter() - t0)
        return timers.wrap("fetch", fetch)

    runner_cls.launch = timed_launch
    try:
        yield found + ["launch", "fetch"]
    finally:
        runner_cls.launch = launch
        timers.undo()


# ----------------------------------------------------------------------------- the checks

QUIET: dict[str, Any] = {"log": lambda line: None, "progress": False}


def run_checks(
    rep: Report, args: argparse.Namespace, device, data: Path, weights: Path, work: Path
) -> None:
    from pipeline.stages.extract import run_extract
    from pipeline.stages.train import run_train

    r: Any  # each stage's result
    qdata = quality_data(data, work, args.quick)
    training = (
        ["train.epochs=1", "train.linear_epochs=10", "train.crop=64"]
        if args.quick
        else ["train.epochs=4"]
    )
    sets = [
        *base_sets(work, "quality", qdata, str(device)),
        "backbone.name=mobilenet_v2",
        f"backbone.weights={weights}",
        *training,
    ]
    cfg = make_config(sets)
    rep.detail(
        "quality_config",
        backbone="mobilenet_v2",
        weights=str(weights),
        data=str(qdata),
        sets=sets[4:],
    )

    with rep.step("quality_extract"):
        r = run_extract(cfg, **QUIET)
        rep.detail("quality_config", images=r.n_images, extract_s=r.seconds)
    with rep.step("features_match_fp32"):
        check_features(rep, cfg, sets, qdata, device)
    with rep.step("quality_train"):
        r = run_train(cfg, **QUIET)
        rep.detail("quality_config", train_s=r.seconds)
    state: dict[str, Any] = {}  # what a later step needs of an earlier one (absent: it failed)
    with rep.step("masks_match_cpu"):
        state["rels"] = check_masks(rep, cfg, sets, work)
    seg_in = segment_inputs(qdata, cfg.data.test_split, work / "quality" / "segment_in")
    seg_out = work / "quality" / "segment_out"
    with rep.step("segment_matches_predict"):
        check_segment(rep, cfg, seg_in, seg_out, state["rels"])
    with rep.step("export_runs_on_device"):
        check_export(rep, cfg, args, seg_in, seg_out, work, device)
    with rep.step("resume_after_kill"):
        resume_after_kill(rep, cfg, sets, work)


def check_features(rep: Report, cfg, sets: list[str], qdata: Path, device) -> None:
    """The device's features of a few test images against fp32 on the CPU, per patch."""
    import numpy as np
    import torch

    from pipeline.data import decode_image, fit_box, read_bytes, to_canvas

    paths = [img for _, img, _ in _frames(qdata, "test")][:4]
    canvases = []
    for path in paths:
        image = decode_image(read_bytes(path), path)
        h, w = image.shape[:2]
        canvases.append(to_canvas(image, fit_box(h, w, 16, cfg.extract.fit)))
    dev = backbone_runner(cfg, device)
    cpu = backbone_runner(
        make_config([*sets, "extract.device=cpu", "extract.precision=fp32"]), torch.device("cpu")
    )
    got = np.concatenate([dev.launch([c])() for c in canvases]).astype(np.float32)
    want = np.concatenate([cpu.launch([c])() for c in canvases]).astype(np.float32)
    lo, mean = cosine_per_patch(got, want)
    del dev, cpu
    rep.check(
        "features_match_fp32",
        lo >= COSINE_MIN and mean >= COSINE_MEAN_MIN,
        precision=str(cfg.extract.precision),
        images=len(paths),
        cosine_min=lo,
        cosine_mean=mean,
        max_abs_diff=float(np.abs(got - want).max()),
        require=f"cosine >= {COSINE_MIN} every patch, mean >= {COSINE_MEAN_MIN}",
    )


def check_masks(rep: Report, cfg, sets: list[str], work: Path) -> list[str]:
    """Stage 3's masks on the device against a copy of the run predicted on the CPU; returns
    the masks' paths relative to the predictions folder."""
    from pipeline.stages.predict import run_predict

    pred_dir = cfg.run_dir / "predictions" / cfg.data.test_split
    run_predict(cfg, cfg.data.test_split, **QUIET)
    rels = sorted(str(p.relative_to(pred_dir)) for p in pred_dir.rglob("*.png"))
    cpu_out = work / "quality" / "outputs_cpu"
    shutil.copytree(cfg.run_dir, cpu_out / cfg.run.name, symlinks=True)
    cfg_cpu = make_config([*sets, f"paths.outputs={cpu_out}", "predict.device=cpu"])
    run_predict(cfg_cpu, cfg.data.test_split, force=True, **QUIET)
    cpu_dir = cfg_cpu.run_dir / "predictions" / cfg.data.test_split
    check_agreement(rep, "masks_match_cpu", pred_dir, cpu_dir, rels, f"foreground in {FOREGROUND}")
    return rels


def check_agreement(
    rep: Report, name: str, want: Path, got: Path, rels: list[str], also: str
) -> None:
    """Check `name`: the masks `rels` under `got` agree with those under `want` on at least
    PIXELS_MIN of their pixels, with a plausible foreground share."""
    cmp = compare_masks(want, got, rels)
    fg = cmp["foreground_fraction"]
    rep.check(
        name,
        cmp["pixel_agreement"] >= PIXELS_MIN and FOREGROUND[0] <= fg <= FOREGROUND[1],
        **cmp,
        require=f"pixel agreement >= {PIXELS_MIN}, {also}",
    )


def check_segment(rep: Report, cfg, seg_in: Path, seg_out: Path, rels: list[str]) -> None:
    """segment's masks of the test images against stage 3's."""
    from pipeline.commands.segment import run_segment

    pred_dir = cfg.run_dir / "predictions" / cfg.data.test_split
    run_segment(cfg, [seg_in], seg_out, overlays=False, progress=False)
    check_agreement(
        rep, "segment_matches_predict", pred_dir, seg_out, rels, "byte-identical files reported"
    )


def check_export(
    rep: Report, cfg, args: argparse.Namespace, seg_in: Path, seg_out: Path, work: Path, device
) -> None:
    """The exported program on the device against segment's masks."""
    from pipeline.commands.export import run_export

    out = work / "quality" / "model.pt2"
    size = 32 if args.quick else None  # the smallest example: 2 x 2 patches
    r = run_export(cfg, out, height=size, width=size)
    agreement, n = export_agreement(out, seg_in, seg_out, cfg, device)
    rep.check(
        "export_runs_on_device",
        agreement >= PIXELS_MIN,
        images=n,
        pixel_agreement=agreement,
        export_s=r.seconds,
        bytes=r.bytes,
        moved_with="torch.export.passes.move_to_device_pass",
        require=f"prob > threshold equals segment's mask on >= {PIXELS_MIN}",
    )


def export_agreement(path: Path, seg_in: Path, seg_out: Path, cfg, device) -> tuple[float, int]:
    """The exported program, loaded and moved to `device` the documented way, on each input's
    canvas: the fraction of canvas pixels where prob > threshold equals segment's mask."""
    import numpy as np
    import torch
    import torch.export.passes

    from pipeline.data import decode_image, fit_box, read_bytes, to_canvas

    program = torch.export.passes.move_to_device_pass(torch.export.load(path), device).module()
    groups: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    for img in sorted(seg_in.rglob("*.jpg")):
        image = decode_image(read_bytes(img), img)
        box = fit_box(image.shape[0], image.shape[1], 16, cfg.extract.fit)
        mask = to_canvas(read_mask(seg_out / img.relative_to(seg_in).with_suffix(".png")), box)
        groups.setdefault((box.height, box.width), []).append((to_canvas(image, box), mask))
    equal = total = n = 0
    for pairs in groups.values():
        for k in range(0, len(pairs), EXPORT_BATCH):
            chunk = pairs[k : k + EXPORT_BATCH]
            x = torch.from_numpy(np.stack([c for c, _ in chunk])).permute(0, 3, 1, 2)
            with torch.no_grad():
                prob = program(x.contiguous().to(device))[:, 0].float().cpu().numpy()
            masks = np.stack([m for _, m in chunk])
            equal += int(((prob > cfg.predict.threshold) == masks).sum())
            total += masks.size
            n += len(chunk)
    return equal / max(1, total), n


RESUME_CHILD = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import pipeline.stages.extract_engine as ex
real, marker, k = ex.write_shard, Path(sys.argv[2]), int(sys.argv[3])
landed = []
def write_then_stop(*a, **kw):
    entry = real(*a, **kw)
    landed.append(entry)
    if len(landed) >= k:  # k shards are complete on disk: wait here to be killed
        marker.write_text(str(len(landed)))
        time.sleep(3600)
    return entry
ex.write_shard = write_then_stop
import cli
cli.cli.main(sys.argv[4:], prog_name="cli.py")
"""


def compare_shards(shards: dict[str, Path], refs: dict[str, Path]) -> tuple[int, float, float]:
    """How many of `shards` equal the reference shard of their name byte for byte, and the
    lowest and mean per-patch cosine of the features of the others."""
    import h5py

    identical = 0
    lo, mean_sum, n_feat = 1.0, 0.0, 0
    for name, path in shards.items():
        ref = refs.get(name)
        if ref is None:
            continue
        if sha256(ref) == sha256(path):
            identical += 1
            continue
        with h5py.File(path, "r") as a, h5py.File(ref, "r") as b:
            for key in a:
                lo_k, mean_k = cosine_per_patch(a[key]["features"][()], b[key]["features"][()])
                lo, mean_sum, n_feat = min(lo, lo_k), mean_sum + mean_k, n_feat + 1
    return identical, lo, mean_sum / n_feat if n_feat else 1.0


def resume_after_kill(rep: Report, cfg, sets: list[str], work: Path) -> None:
    """`cli.py extract-features` in a child process, stopped once RESUME_SHARDS shards are
    complete and SIGKILLed there; then run_extract resumes. The landed shards must be kept
    byte for byte, and every shard must equal the uninterrupted store's (byte for byte, or
    within the precision's tolerance)."""
    from pipeline.stages.extract import run_extract

    kill_cache = work / "quality" / "cache_kill"
    kcfg = make_config([*sets, f"paths.cache={kill_cache}"])
    split = cfg.data.train_split
    marker = work / "quality" / "killed_after"
    argv = [
        sys.executable,
        "-c",
        RESUME_CHILD,
        str(ROOT),
        str(marker),
        str(RESUME_SHARDS),
        "extract-features",
        "--split",
        split,
        *[a for s in [*sets, f"paths.cache={kill_cache}"] for a in ("--set", s)],
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    child = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    assert child.stderr is not None
    deadline = time.monotonic() + 600
    while not marker.exists():
        if child.poll() is not None:
            raise RuntimeError(
                f"the stage-1 child ended (exit {child.returncode}) before "
                f"{RESUME_SHARDS} shard(s) landed: {child.stderr.read()[-2000:]}"
            )
        if time.monotonic() > deadline:
            child.kill()
            raise RuntimeError("the stage-1 child wrote no shard in 600 s")
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stderr.close()
    # shards are named by their content's hash wherever the store keeps the split: matched
    # by name (the kill store holds this split alone, the reference store all splits)
    landed = {p.name: sha256(p) for p in sorted(store_of(kcfg).rglob("*.h5"))}
    run_extract(kcfg, [split], log=lambda line: None, progress=False)
    after = {p.name: p for p in sorted(store_of(kcfg).rglob("*.h5"))}
    refs = {p.name: p for p in store_of(cfg).rglob("*.h5")}
    total = len(after)
    kept = all(name in after and sha256(after[name]) == h for name, h in landed.items())
    same_names = total > 0 and set(after) <= set(refs)
    identical, lo, mean = compare_shards(after, refs)
    rep.check(
        "resume_after_kill",
        kept
        and same_names
        and len(landed) >= RESUME_SHARDS
        and 0 < len(landed) < total
        and lo >= COSINE_MIN
        and mean >= COSINE_MEAN_MIN,
        shards_total=total,
        shards_landed_before_kill=len(landed),
        landed_kept=kept,
        shards_as_uninterrupted=same_names,
        identical_to_uninterrupted=identical,
        cosine_min_of_others=lo,
        cosine_mean_of_others=mean,
    )


# ----------------------------------------------------------------------------- speed


def run_speed(rep: Report, args: argparse.Namespace, device, data: Path, work: Path) -> None:
    from pipeline.stages.predict import run_predict
    from pipeline.stages.train import run_train

    src = speed_frames(args, data, work)
    sdata = work / "speed_data"
    training = (
        [
            "train.epochs=1",
            "train.linear_epochs=2",
            "train.crop=64",
            f"extract.batch_size={QUICK_BATCH}",
        ]
        if args.quick
        else []
    )
    sets = [
        *base_sets(work, "speed", sdata, str(device)),
        "backbone.name=dino_vits16",
        f"backbone.weights={args.dino_weights}",
        *training,
        *args.sets,
    ]
    cfg = make_config(sets)
    height, width = (
        (SPEED_SIZE[0] // QUICK_SCALE, SPEED_SIZE[1] // QUICK_SCALE) if args.quick else SPEED_SIZE
    )
    rep.set(
        backbone="dino_vits16",
        image_size=[height, width],
        speed_weights=(
            args.dino_weights
            if args.dino_weights != "random"
            else "random (no DINO checkpoint given; weights do not change speed)"
        ),
        precision=str(cfg.extract.precision),
        batch_size=cfg.extract.batch_size,
    )
    rep.detail("speed_config", sets=sets[4:], seconds_per_figure=args.seconds)

    state = {"forward_rate": 0.0}
    with rep.step("forward"):
        state["forward_rate"] = speed_forward(rep, args, cfg, device, height, width)
    forward_rate = state["forward_rate"]

    feature_bytes = (height // 16) * (width // 16) * 384 * 2 + 80_000  # + JPEG, mask
    n_stage1 = int(max(32, forward_rate * args.seconds) if forward_rate else 256)
    cap = int(args.max_store_gb * 1e9 / feature_bytes)
    rep.detail("stage1", images_wanted=n_stage1, store_cap_images=cap)
    n_stage1 = min(n_stage1, cap)
    if args.quick:
        n_stage1 = QUICK_SPEED["test"]
    n_train = QUICK_SPEED["train"] if args.quick else TRAIN_FRAMES
    repeated_split(src, sdata, cfg.data.train_split, n_train)
    repeated_split(src, sdata, cfg.data.test_split, n_stage1)

    with rep.step("stage1"):
        speed_stage1(rep, cfg, forward_rate)
    with rep.step("train_head"):
        r = run_train(cfg, **QUIET)
        rep.set(train_head_s=r.seconds)
        rep.detail(
            "train_head",
            frames=n_train,
            epochs=cfg.train.epochs,
            linear_epochs=cfg.train.linear_epochs,
        )
    with rep.step("predict"):
        r = run_predict(cfg, cfg.data.test_split, **QUIET)
        rep.set(predict_images_per_s=r.n_images / r.seconds if r.seconds else None)
        rep.detail(
            "predict",
            images=r.n_images,
            seconds=r.seconds,
            note="masks and the JSON / Markdown / HTML reports written; model load included",
        )
    with rep.step("segment"):
        n_seg = (
            n_stage1 if args.quick else min(n_stage1, max(64, int(forward_rate * args.seconds / 2)))
        )
        speed_segment(rep, cfg, sdata, work, n_seg)


def speed_frames(args: argparse.Namespace, data: Path, work: Path) -> Path:
    """The frames the speed splits link to: `data`'s, or with --quick a few downscaled once."""
    if not args.quick:
        return data
    src = work / "speed_frames"
    for split in ("train", "test"):
        for cat, img, mask in _frames(data, split)[:8]:
            _downscaled(img, src / split / cat / "images" / img.name, QUICK_SCALE, False)
            _downscaled(mask, src / split / cat / "annotations" / mask.name, QUICK_SCALE, True)
    return src


def speed_forward(
    rep: Report, args: argparse.Namespace, cfg, device, height: int, width: int
) -> float:
    """The backbone's forward rate (images/s) on device-resident batches; its model load
    time and, on CUDA, the copies to and from the device."""
    import torch

    t0 = time.perf_counter()
    runner = backbone_runner(cfg, device)  # the first: imports timm, allocates
    first_load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    runner = backbone_runner(cfg, device)  # as the stages load it: subtracted from them
    load_s = time.perf_counter() - t0
    patch = runner.patch
    h, w = height // patch * patch, width // patch * patch  # extract.fit = crop
    b = cfg.extract.batch_size
    x = torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, device=device)
    n, seconds = timed_loop(functools.partial(forward, runner, x), device, args.seconds, b)
    rep.set(forward_images_per_s=n / seconds, model_load_s=load_s, first_model_load_s=first_load_s)
    rep.detail(
        "forward",
        images=n,
        seconds=seconds,
        canvas=[h, w],
        what="runner.model under the stage's autocast on device-resident uint8 "
        "batches, inference_mode",
    )
    rep.detail("where_time_goes", forward_ms_per_image=1e3 * seconds / n)
    if device.type == "cuda":  # host-to-device and back, one batch, as launch copies
        feats = forward(runner, x).to(torch.float16)
        host = x.cpu()
        n_copy, s_copy = timed_loop(lambda: h2d(host, device), device, min(2.0, args.seconds), b)
        n_back, s_back = timed_loop(lambda: d2h(feats), device, min(2.0, args.seconds), b)
        rep.detail(
            "where_time_goes",
            h2d_ms_per_image=1e3 * s_copy / n_copy,
            d2h_ms_per_image=1e3 * s_back / n_back,
        )
        del feats
    del runner, x
    return n / seconds


def speed_stage1(rep: Report, cfg, forward_rate: float) -> None:
    """Stage 1 on the test split after a warm-up on the train split, instrumented: its rate
    against the forward's, the write rate, where each image's time goes."""
    from pipeline.stages.extract import run_extract

    run_extract(cfg, [cfg.data.train_split], **QUIET)  # warm-up: kernels, caches
    load_s = rep.data.get("model_load_s") or 0.0  # measured by the forward step
    timers = Timers()
    before = {p: p.stat().st_size for p in store_of(cfg).rglob("*.h5")}
    with stage1_timers(timers) as measured:
        r = run_extract(cfg, [cfg.data.test_split], **QUIET)
    seconds = max(1e-9, r.seconds - load_s)
    mb = sum(p.stat().st_size for p in store_of(cfg).rglob("*.h5") if p not in before) / 1e6
    rate = r.n_images / seconds
    rep.set(
        stage1_images_per_s=rate,
        stage1_vs_forward=rate / forward_rate if forward_rate else None,
        write_mb_per_s=mb / max(1e-9, timers.seconds.get("write", 0.0)),
    )
    per_image = {
        f"{k}_ms_per_image": 1e3 * v / max(1, r.n_images) for k, v in timers.seconds.items()
    }
    rep.detail(
        "stage1",
        images=r.n_images,
        wall_s=r.seconds,
        model_load_s=load_s,
        store_mb=mb,
        instrumented=measured,
        decode_threads=cfg.extract.num_workers,
        thread_seconds=timers.seconds,
        calls=timers.calls,
        **per_image,
        note="decode and write are summed over their threads; launch and fetch are "
        "the main thread's: fetch is the wait for the device and the copy "
        "back, so a main thread mostly in fetch is device-bound",
    )
    rep.detail(
        "where_time_goes",
        stage1_decode_ms_per_image=per_image.get("decode_ms_per_image"),
        stage1_write_ms_per_image=per_image.get("write_ms_per_image"),
        stage1_launch_ms_per_image=per_image.get("launch_ms_per_image"),
        stage1_fetch_wait_ms_per_image=per_image.get("fetch_ms_per_image"),
    )


def speed_segment(rep: Report, cfg, sdata: Path, work: Path, n_seg: int) -> None:
    """segment on the first `n_seg` test images, overlays included, model load subtracted."""
    from pipeline.commands.segment import run_segment

    seg_in = work / "speed" / "segment_in"
    for k, img in enumerate(sorted((sdata / cfg.data.test_split).glob("*/images/*.jpg"))):
        if k >= n_seg:
            break
        _link(img, seg_in / img.parent.parent.name / img.name)
    load_s = rep.data.get("model_load_s") or 0.0
    r = run_segment(cfg, [seg_in], work / "speed" / "segment_out", progress=False)
    seconds = max(1e-9, r.seconds - load_s)
    rep.set(segment_images_per_s=r.n_written / seconds)
    rep.detail("segment", images=r.n_written, wall_s=r.seconds, model_load_s=load_s, overlays=True)


def forward(runner, x):
    import torch

    with torch.inference_mode(), runner._autocast():
        return runner.model(x)


def h2d(host, device):
    """One batch to the device as BackboneRunner.launch copies it (pinned, non-blocking)."""
    return host.pin_memory().to(device, non_blocking=True)


def d2h(feats):
    """Features back to pinned host memory, as BackboneRunner.launch copies them."""
    import torch

    out = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
    return out.copy_(feats, non_blocking=True)


def timed_loop(fn: Callable[[], Any], device, seconds: float, per_call: int) -> tuple[int, float]:
    """Calls of `fn` (each `per_call` images) after two warm-up calls, for at least `seconds`;
    returns (images, seconds)."""
    for _ in range(2):
        fn()
    synchronize(device)
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += per_call
        if n % (8 * per_call) == 0 or time.perf_counter() - t0 > seconds:
            synchronize(device)
            if time.perf_counter() - t0 >= seconds:
                break
    return n, time.perf_counter() - t0


# ----------------------------------------------------------------------------- main


def process_age_s() -> float | None:
    """Seconds since this process started (Linux: /proc), so start-up includes the
    interpreter's own."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.meta_path.insert(0, _NoDask())
    data = _first_existing(args.data, DATA_CANDIDATES, "obj_seg dataset")
    weights = _first_existing(args.weights, WEIGHTS_CANDIDATES, "MobileNetV2 weights")
    rep = Report(args.out)
    rep.set(
        command=" ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        quick=args.quick,
        data=str(data),
        date=time.strftime("%Y-%m-%d %H:%M:%S %z"),
    )
    import torch

    import pipeline.stages.extract  # noqa: F401  (the pipeline imported: part of start-up)
    from pipeline.models.devices import resolve_device

    device = resolve_device(args.device or "auto")
    torch.empty(1, device=device)  # the CUDA context
    synchronize(device)
    age = process_age_s()
    rep.set(
        device=device_info(device),
        startup_s=(age if age is not None else time.perf_counter() - T_ENTRY),
    )
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    rep.detail("run", work=str(work))
    try:
        if "checks" not in args.skip:
            run_checks(rep, args, device, data, weights, work)
        if "speed" not in args.skip:
            run_speed(rep, args, device, data, work)
    finally:
        gb, how = peak_memory_gb(device)
        rep.set(
            peak_memory_gb=gb,
            peak_memory_of=how,
            complete=True,
            ok=rep.ok,
            total_s=time.perf_counter() - T_ENTRY,
        )
        if not args.keep_work and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(_finite(rep.data), indent=1, allow_nan=False, default=str))
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
