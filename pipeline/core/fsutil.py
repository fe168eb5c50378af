"""Files that can be trusted: atomic writes, JSON that is either valid or absent, locks that
the OS releases when a process dies, and sha256 checksums memoised like DVC's state db (keyed
by a stat stamp that `cp -p` cannot fake, like git's index)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import LockError

_CHUNK = 1 << 20


def temporary_name(path: Path, kind: str = "") -> Path:
    """The name a writer of `path` gives its temporary: hidden, next to `path` (so that the
    rename stays on one file system), unique to the process and thread, ending in .tmp (what
    remove_temporaries deletes). `kind`: a second temporary of the same writer (".old")."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}{kind}.tmp")


def _name_error(e: OSError, path: Path) -> None:
    if e.filename is None:  # a failed write or fsync (EIO, ENOSPC) names no file: name it
        e.filename = os.fspath(path)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path next to `path` for the caller to write; on a clean exit the file is
    fsynced and renamed to `path`, so that `path` is either the old or the new content, never
    a mix. The temporary is gone on any exit (a killed writer's is remove_temporaries')."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        _name_error(e, path)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (atomic_file)."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


@contextlib.contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """A new empty temporary folder next to `path` for the caller to fill; on a clean exit it
    takes `path`'s place (an old folder is renamed aside first, then removed: a reader finds
    the old or the new folder complete, or for an instant none). The temporaries are gone on
    any exit (a killed writer's are remove_temporaries')."""
    path = Path(path)
    tmp, old = temporary_name(path), temporary_name(path, ".old")
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            path.rename(old)
        tmp.rename(path)
    finally:
        for p in (tmp, old):
            if p.exists():
                shutil.rmtree(p, ignore_errors=True)


def canonical_json(obj: Any) -> bytes:
    """The JSON bytes that checksums are computed over (sorted keys, no whitespace)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any | None:
    """The parsed content of a JSON file, or None when it is absent or not valid JSON (a
    damaged record is treated as no record: its stage is recomputed, never trusted)."""
    try:
        return json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError, IsADirectoryError):
        return None


def sha256_file(path: Path) -> str:
    """sha256 hex digest of a regular file. OSError naming the file when it cannot be read
    (an error of a read, e.g. EIO, carries no file name of its own) and when it is not a
    regular file: opened non-blocking and checked on the descriptor, so a FIFO cannot block
    the open and a device (/dev/zero) is never read endlessly."""
    h = hashlib.sha256()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:  # closes fd
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(
                    errno.EINVAL, "not a regular file (a FIFO, device or socket)", os.fspath(path)
                )
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
    except OSError as e:
        if e.filename is None:
            e.filename = os.fspath(path)
        raise
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def remove_temporaries(folder: Path, of: Iterable[str] | None = None) -> None:
    """Delete the temporary files and folders (temporary_name) that killed writers left in
    `folder`, never complete ones: all of them, or only those of the names in `of`. Only where
    no live writer is at work: the caller holds the lock of what it cleans."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    mine = (
        None
        if of is None
        else re.compile("|".join(rf"\.{re.escape(n)}\.\d+\.\d+(\.old)?\.tmp" for n in of))
    )
    for p in folder.glob(".*.tmp"):
        if mine is not None and not mine.fullmatch(p.name):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


@contextlib.contextmanager
def file_lock(path: Path, what: str, shared: bool = False) -> Iterator[None]:
    """Hold a flock on `path` (exclusive, or shared with other readers) for the duration;
    LockError naming the holder's pid when another process holds it incompatibly. The OS
    releases it when the process dies, so a killed run never leaves a stale lock."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise LockError(
                f"{what} is in use by another process (pid {holder}): wait for it "
                f"to finish (lock file {path})"
            ) from None
        if not shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def exclusive_lock(path: Path, what: str) -> contextlib.AbstractContextManager[None]:
    return file_lock(path, what)


# The hidden folder that holds the flock files of the folder it is in (a run folder, a
# segment --out folder, the stores' parent `<cache>/features`). Lock files are never deleted:
# a process that opened a deleted one would hold a lock no other process can see, so two
# writers could run at once. They are empty or hold the last holder's pid.
LOCKS = ".locks"


def lock_path(folder: str | Path, name: str) -> Path:
    """The flock file `name` of `folder`: `<folder>/.locks/<name>.lock`."""
    return Path(folder) / LOCKS / f"{name}.lock"


def stat_stamp(st: os.stat_result) -> list[int]:
    """What identifies a file's content without reading it, as git's index does: size, mtime,
    ctime (which no user-space call can set back, so `cp -p`, `rsync -t` and `tar x` cannot
    fake it), inode and device."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class FileHasher:
    """sha256 of files, memoised on disk by path and stat_stamp (like DVC's state db and
    git's index), so that checking a large dataset or cache for changes reads only the files
    that changed. `verify`: ignore the memo (rehash everything; the memo is refreshed).
    `writable`: whether save() may write the memo (False: read-only, e.g. a folder the tool
    has not created)."""

    def __init__(self, memo_path: str | Path | None, verify: bool = False, writable: bool = True):
        self.memo_path = Path(memo_path) if memo_path else None
        self.verify = verify
        self.writable = writable
        self._memo: dict[str, list] = {}
        self._dirty = False
        self._lock = threading.Lock()
        if self.memo_path is not None:
            memo = read_json(self.memo_path)
            if isinstance(memo, dict):
                self._memo = memo

    def digest(self, path: str | Path) -> str:
        """sha256 hex digest of the file (OSError when it cannot be read)."""
        path = Path(path)
        stamp = stat_stamp(path.stat())
        key = str(path.resolve())
        with self._lock:
            hit = self._memo.get(key)
        if not self.verify and isinstance(hit, list) and len(hit) == 2 and hit[0] == stamp:
            return hit[1]
        digest = sha256_file(path)
        with self._lock:
            self._memo[key] = [stamp, digest]
            self._dirty = True
        return digest

    def save(self) -> None:
        """Persist the memo (best effort: it is only an optimisation)."""
        if not (self.memo_path and self._dirty and self.writable):
            return
        with self._lock:
            data = json.dumps(self._memo, separators=(",", ":")).encode()
            self._dirty = False
        with contextlib.suppress(OSError):
            atomic_write_bytes(self.memo_path, data)


def human_bytes(n: float) -> str:
    """`n` bytes as B, KiB, MiB or GiB with one decimal."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
