"""`segment`'s inputs: the images named by its PATHS (files, or folders searched recursively)
and where each one's mask and overlay go under the output folder."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import DataError, OwnershipError
from ..core.owned import is_marked
from ..data import IMAGE_EXTS
from ..store import CACHE_LEGACY
from .segment_record import RECORD_FILE

OVERLAY_DIR = "overlays"
TOOL_FOLDER_SIGNS = (RECORD_FILE, *CACHE_LEGACY)  # folders of earlier versions


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


def _inode_key(path: str | Path) -> tuple[int, int] | None:
    """The (device, inode) of `path`, following links; None when it cannot be read."""
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
        key = _inode_key(dirpath)
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
    skip = {k for k in (_inode_key(out_dir),) if k is not None}  # never segment our own outputs
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


def refuse_inputs_as_outputs(sources: Sequence[Source], out_dir: Path) -> None:
    """OwnershipError (before any work) when a mask or overlay path is one of the inputs."""
    inputs = {os.path.realpath(s.path) for s in sources}
    keys = {k for k in map(_inode_key, (s.path for s in sources)) if k is not None}
    for s in sources:
        for rel in (s.rel, s.overlay_rel):
            target = out_dir / rel
            if os.path.realpath(target) in inputs or _inode_key(target) in keys:
                raise OwnershipError(
                    f"{target}: an output path is one of the images to segment "
                    f"({s.path}); choose another --out folder"
                )
