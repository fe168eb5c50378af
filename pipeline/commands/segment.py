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

import functools
import io
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.config import Config
from ..core.errors import DataError, OwnershipError, thread_limits
from ..core.fingerprints import fingerprint
from ..core.fsutil import (
    atomic_write_bytes,
    atomic_write_json,
    lock_path,
    read_json,
    sha256_bytes,
    sha256_file,
    stat_stamp,
)
from ..core.keys import Keys
from ..core.layout import RunLayout
from ..core.owned import Ledger, claim_folder, claim_run_dir, is_marked
from ..core.progress import Progress
from ..core.variants import CANDIDATE
from ..data import (
    IMAGE_EXTS,
    decode_image,
    fit_box,
    read_bytes,
    same_size_batches,
    to_canvas,
)
from ..inference import BackboneRunner, Predictor, checked_models, mask_png_bytes
from ..models.devices import config_keys, resolve_device
from ..report.panels import mask_panel, outline_width
from ..runconfig import reproduces
from ..stages.base import Lock
from ..store import CACHE_LEGACY
from ..streaming import Decoded, Undecodable, Writer, stream

RECORD_FILE = ".segment.json"
RECORD_VERSION = 1
OVERLAY_DIR = "overlays"
CHUNK = 64  # images decoded ahead of the model per step (two steps in flight)
OVERLAY_QUALITY = 90
TOOL_FOLDER_SIGNS = (RECORD_FILE, *CACHE_LEGACY)  # folders of earlier versions
JPEG_MAX_SIDE = 65500  # libjpeg's limit on an overlay's width and height


def default_out_dir(cfg: Config) -> Path:
    return RunLayout.of(cfg).segment


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Source:
    """One image to segment and where its mask goes, relative to the output folder."""

    path: Path
    rel: str  # posix, suffix .png

    @property
    def overlay_rel(self) -> str:
        return f"{OVERLAY_DIR}/{self.rel[: -len('.png')]}.jpg"


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTS


def _dir_key(path: str | Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _images_in(folder: Path, skip: set[tuple[int, int]], problems: list[str]) -> Iterator[Path]:
    """Image files under `folder`, recursively and sorted; hidden files and folders and the
    folders in `skip` are left out. Linked folders are followed once (a link loop ends)."""
    seen: set[tuple[int, int]] = set()

    def unreadable(e: OSError) -> None:
        problems.append(f"{e.filename}: cannot list folder ({e.strerror or type(e).__name__})")

    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=unreadable):
        key = _dir_key(dirpath)
        if key is None or key in seen or key in skip:
            dirnames[:] = []
            continue
        seen.add(key)
        # hidden folders, and the tool's own (earlier --out folders, run folders, caches):
        # masks and overlays are never segmented again
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".") and not is_marked(Path(dirpath) / d, TOOL_FOLDER_SIGNS)
        )
        for name in sorted(filenames):
            if _is_image_name(name):
                yield Path(dirpath) / name


def find_sources(paths: Sequence[str | Path], out_dir: Path) -> tuple[list[Source], list[str]]:
    """The images named by `paths` (files, or folders searched recursively) with their mask
    paths, and one-line problems found while listing (an unreadable folder). DataError for a
    path that does not exist, for no image at all, and for two images that would write one
    mask (a.jpg and a.png in one folder, two file arguments with one stem), naming both."""
    skip = {k for k in (_dir_key(out_dir),) if k is not None}  # never segment our own outputs
    by_rel: dict[str, Source] = {}
    problems: list[str] = []

    def add(src: Source) -> None:
        other = by_rel.setdefault(src.rel, src)
        if other is not src and os.path.realpath(other.path) != os.path.realpath(src.path):
            raise DataError(
                f"{other.path} and {src.path} would both write {out_dir / src.rel}; "
                "rename one or segment them with different --out folders"
            )

    for p in map(Path, paths):
        if p.is_dir():
            for img in _images_in(p, skip, problems):
                add(Source(img, img.relative_to(p).with_suffix(".png").as_posix()))
        elif p.exists() or p.is_symlink():
            add(Source(p, f"{p.stem}.png"))
        else:
            raise DataError(f"{p}: no such file or folder")
    if not by_rel and not problems:
        raise DataError(
            f"no images ({', '.join(IMAGE_EXTS)}) found in {', '.join(map(str, paths))}"
        )
    return sorted(by_rel.values(), key=lambda s: s.rel), problems


# ----------------------------------------------------------------------------- the record


def settings_fingerprint(keys: Keys, models_fp: str) -> str:
    """What a mask depends on besides its image: the models, the feature settings (backbone,
    weights, canvas fit, precision, feature dtype), the threshold and the test-time
    augmentation (absent at "none", so masks made before the key stay current)."""
    return fingerprint(
        {
            "models": models_fp,
            "features": keys.feature.inference_params(),
            "threshold": keys.predict.threshold,
            **keys.predict.tta_params(),
        }
    )


class SegmentRecord:
    """`<out>/.segment.json`: {mask path: {sha256 and stat stamp of the source, settings
    fingerprint, sha256 of the mask and of the overlay (None: none written)}}, written
    atomically before the files it describes (write-ahead, once per batch), so a run killed at
    any point loses at most the masks in flight. Entries of other inputs segmented into the
    same folder are kept."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / RECORD_FILE
        data = read_json(self.path)
        masks = (
            data.get("masks")
            if isinstance(data, dict) and data.get("version") == RECORD_VERSION
            else None
        )
        self.masks: dict[str, dict] = masks if isinstance(masks, dict) else {}
        self._dirty = False

    def is_current(self, src: Source, ledger: Ledger, settings: str, overlays: bool) -> bool:
        """Whether the mask (and overlay, when asked for) of `src` are on disk as recorded and
        were computed from its current content with `settings`. The source is compared by
        sha256, read only when its stat stamp changed (a touched file is not recomputed)."""
        entry = self.masks.get(src.rel)
        if not isinstance(entry, dict) or entry.get("settings") != settings:
            return False
        if not (
            isinstance(entry.get("mask"), str)
            and ledger.content_is(ledger.folder / src.rel, entry["mask"])
        ):
            return False
        if overlays and not (
            isinstance(entry.get("overlay"), str)
            and ledger.content_is(ledger.folder / src.overlay_rel, entry["overlay"])
        ):
            return False
        try:
            stamp = stat_stamp(src.path.stat())
            if entry.get("stamp") == stamp:
                return True
            if sha256_file(src.path) != entry.get("sha256"):
                return False
        except OSError:
            return False  # unreadable now: the run reports it
        entry["stamp"] = stamp
        self._dirty = True
        return True

    def put(self, rel: str, entry: dict) -> None:
        self.masks[rel] = entry
        self._dirty = True

    def drop(self, rel: str) -> None:
        if self.masks.pop(rel, None) is not None:
            self._dirty = True

    def save(self) -> None:
        if self._dirty:
            atomic_write_json(self.path, {"version": RECORD_VERSION, "masks": self.masks})
            self._dirty = False


# ----------------------------------------------------------------------------- the work


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


def refuse_inputs_as_outputs(sources: Sequence[Source], out_dir: Path) -> None:
    """OwnershipError (before any work) when a mask or overlay path is one of the inputs."""

    def identity(path: Path) -> tuple[int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_dev, st.st_ino

    inputs = {os.path.realpath(s.path) for s in sources}
    keys = {k for k in map(identity, (s.path for s in sources)) if k is not None}
    for s in sources:
        for rel in (s.rel, s.overlay_rel):
            target = out_dir / rel
            if os.path.realpath(target) in inputs or identity(target) in keys:
                raise OwnershipError(
                    f"{target}: an output path is one of the images to segment "
                    f"({s.path}); choose another --out folder"
                )


@dataclass
class SegmentResult:
    out_dir: Path
    n_written: int = 0
    n_current: int = 0  # masks already up to date, not recomputed
    errors: list[str] = field(default_factory=list)  # one line per image or folder skipped
    seconds: float = 0.0  # the whole command's time
    # from the first image's decoding (the models loaded) to the last mask written: the rate
    images_seconds: float = 0.0


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
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(cfg)
    sources, problems = find_sources(paths, out_dir)
    refuse_inputs_as_outputs(sources, out_dir)
    result = SegmentResult(out_dir, errors=list(problems))
    device = resolve_device(cfg.predict.device)
    keys = config_keys(cfg)
    with checked_models(
        RunLayout.of(cfg), keys, cfg.paths.cache, device, functools.partial(reproduces, cfg)
    ) as models:
        if out_dir == default_out_dir(cfg):
            claim_run_dir(cfg.run_dir)
        claim_folder(out_dir, "the --out folder", (RECORD_FILE,))
        for line in problems:
            warn(line)
        with Lock(lock_path(out_dir, "segment"), f"segment into {out_dir}").held():
            settings = settings_fingerprint(keys, models.fingerprint)
            record = SegmentRecord(out_dir)
            ledger = Ledger(out_dir, "segment")
            todo = [
                s for s in sources if force or not record.is_current(s, ledger, settings, overlays)
            ]
            result.n_current = len(sources) - len(todo)
            try:
                if todo:
                    predictor = Predictor(models, device, cfg.predict.threshold)
                    with thread_limits("segment's decoding and writing"):
                        runner = BackboneRunner(
                            keys.feature,
                            cfg.backbone.weights,
                            resolve_device(cfg.extract.device),
                            cfg.extract.batch_size,
                            cfg.extract.compile,
                        )
                        _stream(
                            cfg,
                            todo,
                            runner,
                            predictor,
                            ledger,
                            overlays,
                            settings,
                            record,
                            result,
                            progress,
                            warn,
                        )
            finally:
                record.save()
                ledger.save()
    result.seconds = time.perf_counter() - t0
    return result


def _chunks(items: list, n: int) -> Iterator[list]:
    for k in range(0, len(items), n):
        yield items[k : k + n]


def _stream(
    cfg: Config,
    todo: list[Source],
    extractor: BackboneRunner,
    predictor: Predictor,
    ledger: Ledger,
    overlays: bool,
    settings: str,
    record: SegmentRecord,
    result: SegmentResult,
    progress: bool,
    warn: Callable[[str], None],
) -> None:
    """Through the streaming engine (pipeline/streaming.py): decode ahead in a thread pool
    (two chunks in flight), run same-size batches through the backbone and the heads, encode
    the batch's files, record them (write-ahead: the record and the ledger first), then write
    them in background threads."""
    out_dir = ledger.folder
    tta = cfg.predict.tta == "flip"
    bar = Progress(len(todo), "segment", enabled=progress)

    def decode(src: Source) -> Decoded[Source, Identity] | Undecodable[Source]:
        return _decode(src, extractor.patch, extractor.fit, cfg.data.max_pixels, overlays)

    def write(files: dict[str, bytes]) -> None:
        for rel, data in files.items():
            atomic_write_bytes(out_dir / rel, data)

    def written(_: None) -> None:
        result.n_written += 1
        bar.update(1)

    def process(_chunk: list[Source], decoded: Iterator, writer: Writer[None]) -> None:
        good: list[Decoded[Source, Identity]] = []
        for d in decoded:
            if isinstance(d, Decoded):
                good.append(d)
                continue
            result.errors.append(d.error)
            warn(d.error)
            record.drop(d.source.rel)  # the outputs of an earlier version of this image go
            ledger.remove(out_dir / d.source.rel)  # (only what the tool wrote)
            ledger.remove(out_dir / d.source.overlay_rel)
            bar.update(1)
        for batch in same_size_batches([d.box for d in good], extractor.batch_size):
            items = [good[i] for i in batch]
            canvases = [to_canvas(d.image, d.box) for d in items]
            feats = extractor.launch(canvases)()
            mirrored = extractor.launch(canvases, mirror=True)() if tta else None
            masks = predictor.masks(
                feats,
                np.stack(canvases),
                [d.box for d in items],
                [d.image.shape[:2] for d in items],
                variants=(CANDIDATE,),
                mirrored=mirrored,
            )
            files = writer.map(
                lambda dm: _encode(dm[0], dm[1][CANDIDATE], overlays),
                zip(items, masks, strict=True),
            )
            ledger.intend({out_dir / rel: data for f in files for rel, data in f.items()})
            for d, f in zip(items, files, strict=True):
                record.put(
                    d.source.rel,
                    {
                        "sha256": d.meta.sha256,
                        "stamp": d.meta.stamp,
                        "settings": settings,
                        "mask": sha256_bytes(f[d.source.rel]),
                        "overlay": sha256_bytes(f[d.source.overlay_rel]) if overlays else None,
                    },
                )
                if not overlays:
                    ledger.remove(out_dir / d.source.overlay_rel)
            record.save()
            for f in files:
                writer.submit(write, f)

    t0 = time.perf_counter()
    try:
        stream(
            _chunks(todo, max(CHUNK, extractor.batch_size)),
            lambda chunk: chunk,
            decode,
            process,
            written,
            decode_threads=cfg.extract.num_workers,
            write_threads=2,
            lookahead=2,
            max_writes=2 * extractor.batch_size,
        )
    finally:
        result.images_seconds = time.perf_counter() - t0
        bar.close()
