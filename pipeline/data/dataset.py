"""Datasets on disk: the `obj_seg` and `davis2016` layouts, image/mask decoding, and the
crop/pad "canvas" that makes an image a multiple of the patch size.

Layouts (see docs/interface.md):
- obj_seg:   <root>/<split>/<category>/images/<stem>.jpg, .../annotations/<stem>.png
- davis2016: <root>/JPEGImages/480p/<seq>/<f>.jpg, <root>/Annotations/480p/<seq>/<f>.png,
             split lists in <root>/ImageSets/480p/<split>.txt (the category is the sequence)
"""
from __future__ import annotations

import io
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..core.errors import DataError, ImageTooLarge
from ..core.owned import MARKER

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MASK_THRESHOLD = 128  # a mask pixel is object where its L value is >= this
# bytes a file may have per allowed pixel (8: 16-bit RGBA, uncompressed), plus headers and
# metadata: a longer file is refused unread whatever its header says
BYTES_PER_PIXEL = 8
BYTES_OVERHEAD = 16 << 20


@dataclass(frozen=True)
class Item:
    """One image of a split and its annotation, with paths relative to the data root."""
    split: str
    category: str
    stem: str
    image: str  # relative to the data root, posix separators
    mask: str | None  # None: no annotation (extracted and predicted, never trained on or scored)

    @property
    def key(self) -> str:
        return f"{self.category}/{self.stem}"


# ----------------------------------------------------------------------------- listing

def list_splits(root: str | Path, layout: str) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    if layout == "obj_seg":
        # a folder of the tool's own (a run or cache folder put under data.root) is no split
        splits = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                        and not (p / MARKER).is_file())
    elif layout == "davis2016":
        sets = root / "ImageSets" / "480p"
        splits = sorted(p.stem for p in sets.glob("*.txt")) if sets.is_dir() else []
    else:
        raise DataError(f"unknown data layout {layout!r}")
    if not splits:
        raise DataError(f"no splits found in {root} for layout {layout!r}")
    return splits


def list_items(root: str | Path, layout: str, split: str) -> tuple[list[Item], list[str]]:
    """The split's items sorted by (category, stem), and one-line problems found by listing
    (an image without a mask). Raises DataError for a missing split or an empty one."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    items: list[Item] = []
    problems: list[str] = []
    if layout == "obj_seg":
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(f"split '{split}' not found: {split_dir} is not a folder")
        for cat_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            img_dir, ann_dir = cat_dir / "images", cat_dir / "annotations"
            if not img_dir.is_dir():
                continue
            for img in sorted(img_dir.iterdir()):
                if img.suffix.lower() not in IMAGE_EXTS or img.name.startswith("."):
                    continue
                if not img.is_file():
                    problems.append(_not_a_file(img))
                    continue
                mask = ann_dir / f"{img.stem}.png"
                items.append(Item(split, cat_dir.name, img.stem, img.relative_to(root).as_posix(),
                                  mask.relative_to(root).as_posix() if mask.is_file() else None))
    elif layout == "davis2016":
        lst = root / "ImageSets" / "480p" / f"{split}.txt"
        if not lst.is_file():
            raise DataError(f"split '{split}' not found: no split list {lst}")
        seen = set()
        # decoded as the file system decodes names (os.fsdecode: undecodable bytes become
        # lone surrogates), so a list of Latin-1 names finds the files those bytes name
        text = os.fsdecode(read_bytes(lst, "split list"))
        for n, line in enumerate(text.splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            rel_img = parts[0].lstrip("/")
            rel_mask = parts[1].lstrip("/") if len(parts) > 1 else None
            img = root / rel_img
            if rel_img in seen:
                continue
            seen.add(rel_img)
            if not img.is_file():
                problems.append(f"{img}: listed in {lst.name} line {n} but missing"
                                if not img.exists() else _not_a_file(img))
                continue
            if rel_mask is not None and not (root / rel_mask).is_file():
                rel_mask = None
            items.append(Item(split, img.parent.name, img.stem, rel_img, rel_mask))
        items.sort(key=lambda it: (it.category, it.stem))
    else:
        raise DataError(f"unknown data layout {layout!r}")
    if not items and not problems:
        raise DataError(f"split '{split}' of {root} has no images")
    _refuse_duplicate_stems(root, items)
    return items, problems


def _not_a_file(path: Path) -> str:
    """The listing problem of a path that is not a regular file (stat follows links)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return f"{path}: not a readable file (a broken or looping link?)"
    return f"{path}: not a regular file ({_file_kind(mode)})"


def _file_kind(mode: int) -> str:
    """What a non-regular file is, for messages ("a FIFO", "a character device", ...)."""
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISDIR, "a folder"))
    return next((name for test, name in kinds if test(mode)), "not a file")


def display_name(name: object) -> str:
    """`name` as text every UTF-8 output accepts. A file name that is not UTF-8 (an old
    Latin-1 archive) reaches Python with each undecodable byte as a lone surrogate
    (os.fsdecode's surrogateescape: os.fsencode gives the bytes back); shown here as U+FFFD.
    Only for showing a name: paths and JSON keep the surrogates (JSON as \\udcXX escapes)."""
    text = str(name)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte
        return text.encode("utf-8", "replace").decode("utf-8")


def _refuse_duplicate_stems(root: Path, items: list[Item]) -> None:
    """Outputs are named <category>/<stem>: two images of one category with one stem (a.jpg,
    a.png) would overwrite each other's mask."""
    seen: dict[tuple[str, str], Item] = {}
    for it in items:
        other = seen.setdefault((it.category, it.stem), it)
        if other is not it:
            raise DataError(f"{root / other.image} and {root / it.image}: two images with the "
                            f"stem '{it.stem}' in category '{it.category}' would write one mask "
                            "file; rename one of them")


# ----------------------------------------------------------------------------- decoding

_RETRY = "raise data.max_pixels to use it (the next run retries the file)"


def max_file_bytes(max_pixels: int) -> int:
    """The longest file accepted for an image of at most `max_pixels` pixels (8 bytes per
    pixel, 16-bit RGBA uncompressed, plus 16 MiB of headers and metadata)."""
    return BYTES_OVERHEAD + BYTES_PER_PIXEL * max_pixels


def read_bytes(path: str | Path, what: str = "file", max_pixels: int | None = None) -> bytes:
    """The bytes of a regular file; DataError naming the file otherwise. A FIFO (whose
    open would block until a writer comes), a device (/dev/zero never ends) or a socket is
    refused: the file is opened non-blocking and checked on the open descriptor (fstat), so
    it cannot be swapped between the check and the read. With `max_pixels`, a file longer
    than max_file_bytes(max_pixels) is refused without being read (ImageTooLarge: a 10 GB
    ".jpg" never reaches memory)."""
    limit = None if max_pixels is None else max_file_bytes(max_pixels)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise DataError(f"{path}: not a regular file ({_file_kind(st.st_mode)})")
            size = st.st_size
            if limit is None or size <= limit:
                with os.fdopen(fd, "rb", closefd=False) as f:
                    data = f.read() if limit is None else f.read(limit + 1)  # it may grow
                size = len(data)
        finally:
            os.close(fd)
    except OSError as e:
        raise DataError(f"{path}: cannot read {what} ({e.strerror or _short(e)})") from None
    if limit is not None and size > limit:
        needed = -(-(size - BYTES_OVERHEAD) // BYTES_PER_PIXEL)  # the max_pixels it would pass
        raise ImageTooLarge(f"{path}: {what} file of {size} bytes, more than an image within "
                            f"data.max_pixels = {max_pixels} can need ({limit} bytes): not "
                            f"read; {_RETRY}", needed)
    return data


def _open_image(data: bytes) -> Image.Image:
    """The image in `data` opened lazily (its header read, its pixels not decoded), with the
    format plugins Image.open tries, in its order, but without PIL's decompression-bomb
    check, which `max_pixels` replaces (a one-line error naming the file and its size).

    Why not Image.open: above Image.MAX_IMAGE_PIXELS it warns and above twice that it raises
    before telling the size, and the ways around it change process-wide state that other
    threads see: Image.MAX_IMAGE_PIXELS itself, or warnings.catch_warnings (which swaps the
    warning filters of every thread and restores them out of order when two threads nest).
    Images are decoded in thread pools, beside the model and other code, so this asks PIL's
    registered plugins (Image.ID / Image.OPEN, the table Image.open walks) directly: nothing
    global is changed, and a plugin's own checks of frames or tiles still apply."""
    Image.init()  # every plugin registered (once per process; Image.open does the same)
    prefix = data[:16]
    for fmt in list(Image.ID):
        factory, accept = Image.OPEN[fmt]
        ok = accept(prefix) if accept else True
        if not ok or isinstance(ok, str):  # a str is Image.open's "possible format" warning
            continue
        try:
            return factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue  # not this format after all: Image.open goes on to the next one too
    raise UnidentifiedImageError("cannot identify image file")


def check_pixels(size: tuple[int, int], name: str | Path, max_pixels: int | None,
                 what: str = "image") -> None:
    """ImageTooLarge (a DataError) when `size` (width, height) has more than `max_pixels`
    pixels (None: no limit)."""
    w, h = size
    pixels = w * h
    if max_pixels is not None and pixels > max_pixels:
        raise ImageTooLarge(
            f"{name}: {what} of {w}x{h} pixels ({pixels / 1e6:.3g} megapixels) is larger "
            f"than data.max_pixels = {max_pixels} ({max_pixels / 1e6:.3g} megapixels): not "
            f"decoded; {_RETRY}", pixels)


def _decode(data: bytes, name: str | Path, what: str, max_pixels: int | None,
            convert: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    """`convert(im)` of the decoded image as an array, its pixel count checked against
    `max_pixels` from the header first; DataError naming the file when it cannot be used."""
    try:
        with _open_image(data) as im:
            check_pixels(im.size, name, max_pixels, what)
            im.load()
            out = convert(im)
    except Image.DecompressionBombError as e:  # a plugin's check of one frame or tile
        raise DataError(f"{name}: {what} too large to decode safely ({_short(e)})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error) as e:
        raise DataError(f"{name}: corrupt or unreadable {what} ({_short(e)})") from None
    return np.asarray(out)


def decode_image(data: bytes, name: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Encoded image bytes as uint8 RGB (H, W, 3) in the orientation an image viewer shows
    (EXIF orientation applied), whatever the mode (L, RGBA, P, ...). `name` is for errors.
    `max_pixels`: ImageTooLarge, read from the header before decoding, for an image with
    more pixels (None: no limit, e.g. for bytes that passed it when they were stored)."""
    rgb = _decode(data, name, "image", max_pixels,
                  lambda im: ImageOps.exif_transpose(im).convert("RGB"))
    return rgb.astype(np.uint8, copy=False)


def load_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3) (see decode_image and read_bytes)."""
    return decode_image(read_bytes(path, "image", max_pixels), path, max_pixels)


def load_mask(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """A mask file as bool (H, W): object where the pixel is >= 128 after conversion to L
    (`max_pixels` as for load_image)."""
    data = read_bytes(path, "mask", max_pixels)
    return _decode(data, path, "mask", max_pixels, lambda im: im.convert("L")) >= MASK_THRESHOLD


@dataclass
class LoadedItem:
    """One decoded item: the image file's bytes (stored as they are), its pixels and mask."""
    encoded: bytes
    image: np.ndarray  # uint8 (H, W, 3), viewer orientation
    mask: np.ndarray | None  # bool (H, W), None when the item has no annotation


def load_item(root: str | Path, item: Item, max_pixels: int | None = None) -> LoadedItem:
    """Image (read once: the stored bytes are the decoded bytes) and mask of `item`;
    DataError if either is unreadable, not a regular file, larger than `max_pixels` (then
    ImageTooLarge, found before decoding) or their sizes differ."""
    root = Path(root)
    encoded = read_bytes(root / item.image, "image", max_pixels)
    image = decode_image(encoded, root / item.image, max_pixels)
    mask = None
    if item.mask is not None:
        mask = load_mask(root / item.mask, max_pixels)
        if mask.shape != image.shape[:2]:
            raise DataError(
                f"{root / item.mask}: mask size {mask.shape[1]}x{mask.shape[0]} differs from "
                f"its image's {image.shape[1]}x{image.shape[0]}")
    return LoadedItem(encoded, image, mask)


def _short(e: BaseException) -> str:
    if isinstance(e, UnidentifiedImageError):
        return "not a recognised image format"
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


# ----------------------------------------------------------------------------- canvas

@dataclass(frozen=True)
class Box:
    """Where the processed canvas (a multiple of the patch size) sits in the original image:
    canvas[y, x] = original[y + top, x + left], edge-replicated where that falls outside
    (`pad`; top/left < 0) and cropped where the canvas is smaller (`crop`; top/left >= 0)."""
    top: int
    left: int
    height: int
    width: int

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.top, self.left, self.height, self.width)


def fit_box(height: int, width: int, patch: int, fit: str) -> Box:
    """The canvas for an image of this size: centre crop to the largest multiple of `patch`
    ("crop", falling back to padding for a side shorter than one patch) or pad symmetrically
    to the next multiple ("pad")."""
    def side(n: int) -> tuple[int, int]:
        m = (n // patch) * patch
        if fit == "pad" or m == 0:
            m = -(-n // patch) * patch
        return (n - m) // 2 if m <= n else -((m - n) // 2), m
    top, h = side(height)
    left, w = side(width)
    return Box(top, left, h, w)


def to_canvas(array: np.ndarray, box: Box) -> np.ndarray:
    """Crop/pad the first two axes of `array` (original size) to the canvas `box`."""
    h, w = array.shape[:2]
    ys = np.clip(np.arange(box.height) + box.top, 0, h - 1)
    xs = np.clip(np.arange(box.width) + box.left, 0, w - 1)
    if 0 <= box.top and box.top + box.height <= h and 0 <= box.left and box.left + box.width <= w:
        # pure crop: a view is enough (a canvas one pixel larger than the image has top or
        # left 0 too: it needs the padding below)
        return array[box.top:box.top + box.height, box.left:box.left + box.width]
    return array[ys][:, xs]


def same_size_batches(boxes: list[Box], batch_size: int) -> list[list[int]]:
    """Indices of `boxes` in batches of at most `batch_size` whose canvases share one size;
    sizes in order of first appearance, indices in order within a size (so the same items
    always form the same batches)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, b in enumerate(boxes):
        groups.setdefault((b.height, b.width), []).append(i)
    return [idx[k:k + batch_size] for idx in groups.values()
            for k in range(0, len(idx), batch_size)]


def canvas_valid(box: Box, orig_hw: tuple[int, int]) -> np.ndarray:
    """bool (height, width): canvas pixels that lie inside the original image."""
    h, w = orig_hw
    ys = np.arange(box.height) + box.top
    xs = np.arange(box.width) + box.left
    return ((ys >= 0) & (ys < h))[:, None] & ((xs >= 0) & (xs < w))[None, :]


def from_canvas(array, box: Box, orig_hw: tuple[int, int]):
    """Inverse of to_canvas for the last two axes of a numpy array or torch tensor
    (..., height, width) -> (..., H, W): cropped borders are filled by edge replication,
    padded borders are dropped."""
    h, w = orig_hw
    ys = np.clip(np.arange(h) - box.top, 0, box.height - 1)
    xs = np.clip(np.arange(w) - box.left, 0, box.width - 1)
    if isinstance(array, np.ndarray):
        return array[..., ys, :][..., xs]
    import torch
    return array.index_select(-2, torch.as_tensor(ys, device=array.device)).index_select(
        -1, torch.as_tensor(xs, device=array.device))
