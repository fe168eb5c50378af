"""What the tool may write: only inside folders it created, and over files it created.

A folder the tool creates (a run folder `<paths.outputs>/<run>`, `paths.cache`, `segment`'s
`--out`) carries a marker, MARKER. The tool writes only inside a folder that is new, empty
or marked (or made by an earlier version, known by an entry only the tool writes, such as a
run folder's `stages/`); anything else is refused in one line (exit 2) before any work.

Inside a folder where a person may put files of their own (`segment`'s `--out`) and for a
file written anywhere (`export --out`), a Ledger in the marker records, before each write
(write-ahead), the sha256 of what is about to be written. A file may be written or deleted
only if it is new, or its current content is one the ledger recorded, or it is byte-equal to
what would be written. A garbled or missing ledger means "not ours", never "everything is
ours", and `--force` does not lift the rule.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import OwnershipError
from .fsutil import (
    atomic_write_bytes,
    atomic_write_json,
    read_json,
    sha256_bytes,
    sha256_file,
    stat_stamp,
)

MARKER = ".vit-objseg.json"  # the folders the tool creates carry it (data lists none of them)
TOOL = "vit-objseg"
KEEP_HASHES = 2  # per file: the last content written and the one before (a killed write)


def _marker(folder: Path) -> dict | None:
    doc = read_json(Path(folder) / MARKER)
    return doc if isinstance(doc, dict) and doc.get("tool") == TOOL else None


def is_marked(folder: str | Path, legacy: Iterable[str] = ()) -> bool:
    """Whether `folder` carries the marker (or one of the `legacy` entries earlier versions
    of the tool wrote there)."""
    folder = Path(folder)
    return _marker(folder) is not None or any((folder / name).exists() for name in legacy)


def claim_folder(folder: str | Path, what: str, legacy: Iterable[str] = ()) -> Path:
    """Make sure the tool may write inside `folder` (described as `what` in messages): create
    it with a marker when absent; mark an existing empty folder; accept a marked one (or one
    holding a `legacy` entry, which is then marked). OwnershipError (exit 2) otherwise."""
    folder = Path(folder)
    legacy = tuple(legacy)
    if folder.is_dir() and _marker(folder) is not None:
        return refuse_links(folder, what)
    if folder.exists() and not folder.is_dir():
        raise OwnershipError(f"{folder}: {what} is a file, not a folder; choose another path")
    if folder.is_dir():
        garbled = (folder / MARKER).exists()
        earlier = any((folder / n).exists() for n in legacy)  # made by an earlier version
        if not (garbled or earlier) and any(folder.iterdir()):
            raise OwnershipError(
                f"{folder}: {what} exists and was not created by {TOOL} (no {MARKER}); "
                "choose a new folder, or move its files away"
            )
        if garbled and not earlier:
            raise OwnershipError(
                f"{folder / MARKER}: {what}'s marker is damaged, so its files are not known to "
                f"be {TOOL}'s; choose a new folder, or delete the marker if they are"
            )
    atomic_write_json(folder / MARKER, {"tool": TOOL, "version": 1, "files": {}})
    return refuse_links(folder, what)


def refuse_links(folder: Path, what: str) -> Path:
    """`folder` when nothing inside it is a symbolic link, else OwnershipError naming the
    first: the tool never makes links, so one in its folder was put there, and writing
    through it would write outside the folder (the folder itself may be a link)."""
    for dirpath, dirnames, filenames in os.walk(folder):  # links are listed, not followed
        for name in (*dirnames, *filenames):
            path = Path(dirpath) / name
            if path.is_symlink():
                raise OwnershipError(
                    f"{path}: a symbolic link inside {what}, which {TOOL} never makes; writing "
                    "through it could change files elsewhere: remove it (or move the target in)"
                )
    return folder


RUN_LEGACY = ("stages",)  # a run folder made before the marker


def claim_run_dir(run_dir: str | Path) -> Path:
    """claim_folder for a run folder `<paths.outputs>/<run.name>`."""
    return claim_folder(run_dir, f"the folder of run '{Path(run_dir).name}'", RUN_LEGACY)


class Ledger:
    """The files the tool wrote, by content: {key: {"sha256": [...], "stamp": [...]}} in the
    marker of `folder`. Paths given to its methods are as anywhere (relative to the working
    folder); a key is the path relative to `folder`, or absolute for a file outside it.
    `stamp` memoises that the file, as it was then (stat_stamp), had the last hash."""

    def __init__(self, folder: str | Path, writer: str):
        self.folder = Path(folder)
        self.writer = writer  # the command that keeps this ledger, for messages
        self._root = Path(os.path.abspath(self.folder))
        doc = _marker(self.folder) or {}
        files = doc.get("files")
        self.files: dict[str, dict[str, Any]] = {
            k: v
            for k, v in (files.items() if isinstance(files, dict) else ())
            if isinstance(v, dict) and isinstance(v.get("sha256"), list)
        }
        self._lock = threading.Lock()
        self._dirty = False

    def key(self, path: str | Path) -> str:
        """The ledger's key of `path` (relative to the working folder, as everywhere)."""
        full = Path(os.path.abspath(path))
        try:
            return full.relative_to(self._root).as_posix()
        except ValueError:
            return str(full.resolve())

    def path(self, key: str) -> Path:
        return Path(key) if os.path.isabs(key) else self._root / key

    def content_is(self, path: str | Path, sha256: str | None = None) -> bool:
        """Whether the file at `path` exists with content this ledger recorded (`sha256`:
        with that content in particular). Hashes the file only when its stat stamp changed."""
        key = self.key(path)
        entry = self.files.get(key)
        if entry is None:
            return False
        full = self.path(key)
        try:
            stamp = stat_stamp(full.stat())
            if entry.get("stamp") == stamp and entry["sha256"]:
                digest = entry["sha256"][-1]
            else:
                digest = sha256_file(full)
                if digest in entry["sha256"]:
                    with self._lock:
                        entry["stamp"] = stamp
                        entry["sha256"] = [h for h in entry["sha256"] if h != digest] + [digest]
                        self._dirty = True
        except OSError:
            return False
        return digest in entry["sha256"] if sha256 is None else digest == sha256

    def check(self, path: str | Path, data: bytes | None = None) -> None:
        """OwnershipError unless the tool may write `data` to `path` (None: delete it)."""
        full = self.path(self.key(path))
        if not (full.exists() or full.is_symlink()) or self.content_is(full):
            return
        if data is not None and full.is_file() and not full.is_symlink():
            try:
                if full.stat().st_size == len(data) and sha256_file(full) == sha256_bytes(data):
                    return
            except OSError:
                pass
        raise OwnershipError(
            f"{full}: exists and was not written here by {TOOL}'s "
            f"{self.writer}; move or delete it "
            "first (it is never overwritten, --force included)"
        )

    def intend(self, writes: dict[Path, bytes]) -> None:
        """Check every write of `writes` ({path: bytes}) and record the new contents' hashes
        before any is written (write-ahead; saved). OwnershipError names the first refusal."""
        for path, data in writes.items():
            self.check(path, data)
        with self._lock:
            for path, data in writes.items():
                key = self.key(path)
                entry = self.files.setdefault(key, {"sha256": []})
                digest = sha256_bytes(data)
                others = [h for h in entry["sha256"] if h != digest]
                entry["sha256"] = (others + [digest])[-KEEP_HASHES:]
                entry.pop("stamp", None)
            self._dirty = True
        self.save()

    def write(self, path: str | Path, data: bytes) -> None:
        """Record, then write `data` atomically to `path`."""
        self.intend({Path(path): data})
        atomic_write_bytes(self.path(self.key(path)), data)

    def remove(self, path: str | Path) -> bool:
        """Delete the file at `path` if its content is the tool's; True when deleted. A file
        that is not the tool's is left alone."""
        key = self.key(path)
        full = self.path(key)
        if not self.content_is(full):
            return False
        full.unlink(missing_ok=True)
        with self._lock:
            self.files.pop(key, None)
            self._dirty = True
        return True

    def save(self) -> None:
        with self._lock:
            if not self._dirty:
                return
            data = (
                json.dumps(
                    {"tool": TOOL, "version": 1, "files": self.files}, indent=1, sort_keys=True
                )
                + "\n"
            )
            self._dirty = False
        atomic_write_bytes(self.folder / MARKER, data.encode())
