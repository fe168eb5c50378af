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
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import LockError

_CHUNK = 1 << 20


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that the file is either the old or the new content, never a
    mix: a temporary name, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a failed write or fsync (EIO, ENOSPC) names no file: name it
        if e.filename is None:
            e.filename = os.fspath(path)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


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
                raise OSError(errno.EINVAL, "not a regular file (a FIFO, device or socket)",
                              os.fspath(path))
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
    except OSError as e:
        if e.filename is None:
            e.filename = os.fspath(path)
        raise
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def remove_temporaries(folder: Path) -> None:
    """Delete temporary files left by killed writers (never complete files)."""
    if Path(folder).is_dir():
        for p in Path(folder).glob(".*.tmp"):
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
            raise LockError(f"{what} is in use by another process (pid {holder}): wait for it "
                            f"to finish (lock file {path})") from None
        if not shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def exclusive_lock(path: Path, what: str) -> contextlib.AbstractContextManager[None]:
    return file_lock(path, what)


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
