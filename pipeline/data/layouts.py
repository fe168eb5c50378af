"""The dataset layouts on disk and the listing of a split's items (see docs/interface.md):
- obj_seg:   <root>/<split>/<category>/images/<stem>.jpg, .../annotations/<stem>.png
- davis2016: <root>/JPEGImages/480p/<seq>/<f>.jpg, <root>/Annotations/480p/<seq>/<f>.png,
             split lists in <root>/ImageSets/480p/<split>.txt (the category is the sequence)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import DataError
from ..core.owned import MARKER
from .decode import file_kind, read_bytes

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


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


def list_splits(root: str | Path, layout: str) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    if layout == "obj_seg":
        # a folder of the tool's own (a run or cache folder put under data.root) is no split
        splits = sorted(
            p.name
            for p in root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and not (p / MARKER).is_file()
        )
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
    lister = _LISTERS.get(layout)
    if lister is None:
        raise DataError(f"unknown data layout {layout!r}")
    problems: list[str] = []
    items = lister(root, split, problems)
    if not items and not problems:
        raise DataError(f"split '{split}' of {root} has no images")
    _refuse_duplicate_stems(root, items)
    return items, problems


def _list_obj_seg(root: Path, split: str, problems: list[str]) -> list[Item]:
    """obj_seg: <split>/<category>/images/<stem>.<ext>, masks in .../annotations/<stem>.png."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"split '{split}' not found: {split_dir} is not a folder")
    items: list[Item] = []
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
            items.append(
                Item(
                    split,
                    cat_dir.name,
                    img.stem,
                    img.relative_to(root).as_posix(),
                    mask.relative_to(root).as_posix() if mask.is_file() else None,
                )
            )
    return items


def _list_davis2016(root: Path, split: str, problems: list[str]) -> list[Item]:
    """davis2016: the split list ImageSets/480p/<split>.txt names each image and its mask."""
    lst = root / "ImageSets" / "480p" / f"{split}.txt"
    if not lst.is_file():
        raise DataError(f"split '{split}' not found: no split list {lst}")
    items: list[Item] = []
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
            problems.append(
                f"{img}: listed in {lst.name} line {n} but missing"
                if not img.exists()
                else _not_a_file(img)
            )
            continue
        if rel_mask is not None and not (root / rel_mask).is_file():
            rel_mask = None
        items.append(Item(split, img.parent.name, img.stem, rel_img, rel_mask))
    items.sort(key=lambda it: (it.category, it.stem))
    return items


# each layout's lister: (root, split, problems to add to) -> the split's items
_LISTERS: dict[str, Callable[[Path, str, list[str]], list[Item]]] = {
    "obj_seg": _list_obj_seg,
    "davis2016": _list_davis2016,
}


def _not_a_file(path: Path) -> str:
    """The listing problem of a path that is not a regular file (stat follows links)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return f"{path}: not a readable file (a broken or looping link?)"
    return f"{path}: not a regular file ({file_kind(mode)})"


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
            raise DataError(
                f"{root / other.image} and {root / it.image}: two images with the "
                f"stem '{it.stem}' in category '{it.category}' would write one mask "
                "file; rename one of them"
            )
