"""Datasets on disk: the `obj_seg` and `davis2016` layouts, image/mask decoding, and the
crop/pad "canvas" that makes an image a multiple of the patch size.

Layouts (see docs/interface.md):
- obj_seg:   <root>/<split>/<category>/images/<stem>.jpg, .../annotations/<stem>.png
- davis2016: <root>/JPEGImages/480p/<seq>/<f>.jpg, <root>/Annotations/480p/<seq>/<f>.png,
             split lists in <root>/ImageSets/480p/<split>.txt (the category is the sequence)
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DataError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MASK_THRESHOLD = 128  # a mask pixel is object where its L value is >= this


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
        splits = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
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
                    problems.append(f"{img}: not a readable file (a broken or looping link?)")
                    continue
                mask = ann_dir / f"{img.stem}.png"
                items.append(Item(split, cat_dir.name, img.stem, img.relative_to(root).as_posix(),
                                  mask.relative_to(root).as_posix() if mask.is_file() else None))
    elif layout == "davis2016":
        lst = root / "ImageSets" / "480p" / f"{split}.txt"
        if not lst.is_file():
            raise DataError(f"split '{split}' not found: no split list {lst}")
        seen = set()
        for n, line in enumerate(lst.read_text().splitlines(), 1):
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
                problems.append(f"{img}: listed in {lst.name} line {n} but missing")
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

def decode_image(data: bytes, name: str | Path) -> np.ndarray:
    """Encoded image bytes as uint8 RGB (H, W, 3) in the orientation an image viewer shows
    (EXIF orientation applied), whatever the mode (L, RGBA, P, ...). `name` is for errors."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = ImageOps.exif_transpose(im).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{name}: corrupt or unreadable image ({_short(e)})") from None
    return np.asarray(rgb, dtype=np.uint8)


def read_bytes(path: str | Path, what: str = "file") -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read {what} ({e.strerror or _short(e)})") from None


def load_image(path: str | Path) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3) (see decode_image)."""
    return decode_image(read_bytes(path, "image"), path)


def load_mask(path: str | Path) -> np.ndarray:
    """A mask file as bool (H, W): object where the pixel is >= 128 after conversion to L."""
    data = read_bytes(path, "mask")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            gray = im.convert("L")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: corrupt or unreadable mask ({_short(e)})") from None
    return np.asarray(gray) >= MASK_THRESHOLD


@dataclass
class LoadedItem:
    """One decoded item: the image file's bytes (stored as they are), its pixels and mask."""
    encoded: bytes
    image: np.ndarray  # uint8 (H, W, 3), viewer orientation
    mask: np.ndarray | None  # bool (H, W), None when the item has no annotation


def load_item(root: str | Path, item: Item) -> LoadedItem:
    """Image (read once: the stored bytes are the decoded bytes) and mask of `item`;
    DataError if either is unreadable or their sizes differ."""
    root = Path(root)
    encoded = read_bytes(root / item.image, "image")
    image = decode_image(encoded, root / item.image)
    mask = None
    if item.mask is not None:
        mask = load_mask(root / item.mask)
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
    if box.top >= 0 and box.left >= 0:  # pure crop: a view is enough
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
