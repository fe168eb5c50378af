"""`segment`: masks for any image files or folders with the trained models of the configured
run. No annotations, no training data and no feature store are needed, and nothing is cached.

The computation is stage 1's and stage 3's own: images are decoded as stage 1 decodes them
(EXIF orientation applied) and put on the same canvas (`fit_box`, `extract.fit`), the
backbone runs through `BackboneRunner.launch` (stage 1's forward: the features in the dtype the
store keeps, float16 by default), and the heads and the threshold are `Predictor.masks`. So on CPU
an image that is also in a cached split gets the same mask, byte for byte, as `predict`.

Outputs under `<out>` (default `<outputs>/<run>/segment/`): for a folder argument the mask at
`<path relative to that folder>` with suffix `.png`, for a file argument at `<stem>.png`;
overlays at `overlays/<same path>.jpg`. `<out>/.segment.json` records, per mask, the source
file's sha256 and the settings it was computed with, so a rerun recomputes only images that
changed (or all of them, when the models or settings did).

Layering: this module uses the shared inference path (pipeline/inference.py) and imports no
stage module; no stage imports it.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..core.config import Config
from ..core.errors import DataError, thread_limits
from ..core.fsutil import atomic_write_bytes, lock_path, sha256_bytes, stat_stamp
from ..core.keys import RefineKey
from ..core.layout import RunLayout
from ..core.owned import Ledger, claim_folder, claim_run_dir
from ..core.progress import Progress
from ..core.variants import CANDIDATE
from ..data import decode_image, fit_box, read_bytes, same_size_batches, to_canvas
from ..inference import BackboneRunner, Predictor, TrainedModels, checked_models, mask_png_bytes
from ..models.devices import config_keys, resolve_device
from ..report.panels import mask_panel, outline_width
from ..runconfig import reproduces
from ..stages.base import Lock
from ..stages.thresholds import Calibration, resolve_thresholds
from ..streaming import Decoded, Undecodable, Writer, stream
from .segment_inputs import OVERLAY_DIR, Source, find_sources, refuse_inputs_as_outputs
from .segment_record import RECORD_FILE, SegmentRecord, settings_fingerprint

if TYPE_CHECKING:
    import torch

__all__ = [
    "OVERLAY_DIR",
    "RECORD_FILE",
    "SegmentResult",
    "Source",
    "find_sources",
    "overlay_jpeg",
    "run_segment",
    "settings_fingerprint",
]

CHUNK = 64  # images decoded ahead of the model per step (two steps in flight)
OVERLAY_QUALITY = 90
JPEG_MAX_SIDE = 65500  # libjpeg's limit on an overlay's width and height


# ----------------------------------------------------------------------------- one image


@dataclass
class Identity:
    """What `.segment.json` records of a decoded image's source file."""

    sha256: str
    stamp: list[int]


def _decode(
    src: Source, patch: int, fit: str, max_pixels: int, overlays: bool = False
) -> Decoded[Source, Identity] | Undecodable[Source]:
    """Read and decode one image as stage 1 does; an unreadable one (not a regular file,
    larger than `max_pixels` = data.max_pixels, corrupt, or, with `overlays`, a side longer
    than a JPEG overlay can have) carries its error."""
    try:
        st = src.path.stat()  # before reading: a change while reading shows up next run
        data = read_bytes(src.path, "image", max_pixels)
        image = decode_image(data, src.path, max_pixels)
    except DataError as e:
        return Undecodable(src, str(e))
    except OSError as e:  # stat of a broken link, a link loop
        return Undecodable(src, f"{src.path}: cannot read image ({e.strerror or type(e).__name__})")
    h, w = image.shape[:2]
    if overlays and max(h, w) > JPEG_MAX_SIDE:
        return Undecodable(
            src,
            f"{src.path}: {w}x{h} pixels: an overlay (JPEG) has at most "
            f"{JPEG_MAX_SIDE} pixels a side; segment it with --no-overlays",
        )
    return Decoded(
        src, image, fit_box(h, w, patch, fit), Identity(sha256_bytes(data), stat_stamp(st))
    )


def overlay_jpeg(image: np.ndarray, mask: np.ndarray) -> bytes:
    """The image with the mask's object tinted and outlined and the background dimmed (the
    report's mask panels), at full size, as JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(mask_panel(image, mask, outline_width(mask.shape))).save(
        buf, format="JPEG", quality=OVERLAY_QUALITY
    )
    return buf.getvalue()


def _encode(d: Decoded[Source, Identity], mask: np.ndarray, overlays: bool) -> dict[str, bytes]:
    """The files of one image: {path relative to the output folder: bytes}."""
    files = {d.source.rel: mask_png_bytes(mask)}
    if overlays:
        files[d.source.overlay_rel] = overlay_jpeg(d.image, mask)
    return files


# ----------------------------------------------------------------------------- the run


@dataclass
class SegmentResult:
    out_dir: Path
    n_written: int = 0
    n_current: int = 0  # masks already up to date, not recomputed
    errors: list[str] = field(default_factory=list)  # one line per image or folder skipped
    seconds: float = 0.0  # the whole command's time
    # from the first image's decoding (the models loaded) to the last mask written: the rate
    images_seconds: float = 0.0


@dataclass(frozen=True)
class SegmentSettings:
    """What the work below run_segment reads of the config, taken from it once."""

    device: torch.device  # predict.device: the heads'
    threshold: float  # the pac masks' (predict.threshold, "auto" resolved in run_segment)
    tta: bool  # predict.tta == "flip"
    max_pixels: int  # data.max_pixels
    decode_threads: int  # extract.num_workers
    overlays: bool
    force: bool
    progress: bool
    refine: RefineKey | None = None  # [refine]: what a refined candidate is refined with


def run_segment(
    cfg: Config,
    paths: Sequence[str | Path],
    out_dir: str | Path | None = None,
    overlays: bool = True,
    force: bool = False,
    progress: bool = True,
    warn: Callable[[str], None] = lambda line: None,
) -> SegmentResult:
    """Masks for the images under `paths` with the run's trained models (ModelError naming
    train-head when they are missing or were trained with other settings than `cfg`'s).
    Images whose mask is current are skipped unless `force`; an unreadable image is skipped,
    reported through `warn(line)` and listed in `errors`, and its earlier outputs are removed
    (when the tool wrote them: see pipeline/core/owned.py)."""
    t0 = time.perf_counter()
    layout = RunLayout.of(cfg)
    out_dir = Path(out_dir) if out_dir is not None else layout.segment
    sources, problems = find_sources(paths, out_dir)
    refuse_inputs_as_outputs(sources, out_dir)
    result = SegmentResult(out_dir, errors=list(problems))
    keys = config_keys(cfg)
    settings = SegmentSettings(
        resolve_device(cfg.predict.device),
        float("nan"),  # resolved below, with the models (stages.thresholds)
        cfg.predict.tta == "flip",
        cfg.data.max_pixels,
        cfg.extract.num_workers,
        overlays,
        force,
        progress,
        keys.predict.refine,
    )
    runner = functools.partial(
        BackboneRunner,
        keys.feature,
        cfg.backbone.weights,
        device=resolve_device(cfg.extract.device),
        batch_size=cfg.extract.batch_size,
        compile=cfg.extract.compile,
    )
    as_trained = functools.partial(reproduces, cfg)
    with checked_models(layout, keys, cfg.paths.cache, settings.device, as_trained) as models:
        if out_dir == layout.segment:
            claim_run_dir(layout.root)
        claim_folder(out_dir, "the --out folder", (RECORD_FILE,))
        for line in problems:
            warn(line)
        cal = Calibration.from_config(cfg)
        chosen = resolve_thresholds(layout, cal, None, models.fingerprint).values[CANDIDATE]
        settings = dataclasses.replace(settings, threshold=chosen)
        fp = settings_fingerprint(keys, models.fingerprint, chosen)
        _segment_into(out_dir, sources, models, runner, settings, fp, result, warn)
    result.seconds = time.perf_counter() - t0
    return result


def _segment_into(
    out_dir: Path,
    sources: list[Source],
    models: TrainedModels,
    runner: Callable[[], BackboneRunner],
    settings: SegmentSettings,
    fp: str,
    result: SegmentResult,
    warn: Callable[[str], None],
) -> None:
    """Under `out_dir`'s lock: the masks of the `sources` not current there (all with
    settings.force), the backbone (`runner()`) loaded only when there is one to compute;
    `fp`: the settings fingerprint the record keeps with each mask."""
    with Lock(lock_path(out_dir, "segment"), f"segment into {out_dir}").held():
        record = SegmentRecord(out_dir)
        ledger = Ledger(out_dir, "segment")
        todo = [
            s
            for s in sources
            if settings.force or not record.is_current(s, ledger, fp, settings.overlays)
        ]
        result.n_current = len(sources) - len(todo)
        try:
            if todo:
                predictor = Predictor(models, settings.device, settings.threshold, settings.refine)
                with thread_limits("segment's decoding and writing"):
                    streamer = _Stream(settings, runner(), predictor, ledger, record, fp)
                    streamer.run(todo, result, warn)
        finally:
            record.save()
            ledger.save()


def _chunks(items: list, n: int) -> Iterator[list]:
    for k in range(0, len(items), n):
        yield items[k : k + n]


@dataclass
class _Stream:
    """The images to segment through the streaming engine (pipeline/streaming.py): decode
    ahead in a thread pool (two chunks in flight), run same-size batches through the backbone
    and the heads, encode the batch's files, record them (write-ahead: the record and the
    ledger first), then write them in background threads."""

    settings: SegmentSettings
    extractor: BackboneRunner
    predictor: Predictor
    ledger: Ledger
    record: SegmentRecord
    fp: str  # the settings fingerprint recorded with each mask

    def run(self, todo: list[Source], result: SegmentResult, warn: Callable[[str], None]) -> None:
        """Segment `todo`, counting into `result`; an undecodable image goes to `warn`."""
        bar = Progress(len(todo), "segment", enabled=self.settings.progress)

        def written(_: None) -> None:
            result.n_written += 1
            bar.update(1)

        def process(_chunk: list[Source], decoded: Iterator, writer: Writer[None]) -> None:
            images = list(decoded)
            for bad in (d for d in images if isinstance(d, Undecodable)):
                result.errors.append(bad.error)
                warn(bad.error)
                self.forget(bad.source)
                bar.update(1)
            good = [d for d in images if isinstance(d, Decoded)]
            for batch in same_size_batches([d.box for d in good], self.extractor.batch_size):
                self.segment([good[i] for i in batch], writer)

        t0 = time.perf_counter()
        try:
            stream(
                _chunks(todo, max(CHUNK, self.extractor.batch_size)),
                lambda chunk: chunk,
                self.decode,
                process,
                written,
                decode_threads=self.settings.decode_threads,
                write_threads=2,
                lookahead=2,
                max_writes=2 * self.extractor.batch_size,
            )
        finally:
            result.images_seconds = time.perf_counter() - t0
            bar.close()

    def decode(self, src: Source) -> Decoded[Source, Identity] | Undecodable[Source]:
        s = self.settings
        return _decode(src, self.extractor.patch, self.extractor.fit, s.max_pixels, s.overlays)

    def forget(self, src: Source) -> None:
        """The outputs of an earlier version of an image now unreadable go (only what the
        tool wrote)."""
        self.record.drop(src.rel)
        self.ledger.remove(self.ledger.folder / src.rel)
        self.ledger.remove(self.ledger.folder / src.overlay_rel)

    def masks(self, items: list[Decoded[Source, Identity]]) -> list[np.ndarray]:
        """The masks of one same-size batch (stage 1's features, stage 3's heads)."""
        canvases = [to_canvas(d.image, d.box) for d in items]
        feats = self.extractor.launch(canvases)()
        mirrored = self.extractor.launch(canvases, mirror=True)() if self.settings.tta else None
        masks = self.predictor.masks(
            feats,
            np.stack(canvases),
            [d.box for d in items],
            [d.image.shape[:2] for d in items],
            variants=(CANDIDATE,),
            mirrored=mirrored,
        )
        return [m[CANDIDATE] for m in masks]

    def segment(self, items: list[Decoded[Source, Identity]], writer: Writer[None]) -> None:
        """One batch: its masks encoded, recorded (write-ahead), then handed to the writers."""
        overlays, out_dir = self.settings.overlays, self.ledger.folder
        files = writer.map(
            lambda dm: _encode(dm[0], dm[1], overlays), zip(items, self.masks(items), strict=True)
        )
        self.ledger.intend({out_dir / rel: data for f in files for rel, data in f.items()})
        for d, f in zip(items, files, strict=True):
            self.record.put(
                d.source.rel,
                {
                    "sha256": d.meta.sha256,
                    "stamp": d.meta.stamp,
                    "settings": self.fp,
                    "mask": sha256_bytes(f[d.source.rel]),
                    "overlay": sha256_bytes(f[d.source.overlay_rel]) if overlays else None,
                },
            )
            if not overlays:
                self.ledger.remove(out_dir / d.source.overlay_rel)
        self.record.save()
        for f in files:
            writer.submit(self.write, f)

    def write(self, files: dict[str, bytes]) -> None:
        for rel, data in files.items():
            atomic_write_bytes(self.ledger.folder / rel, data)
