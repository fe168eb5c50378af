"""Stage 2's checkpoints: written atomically after every epoch with a checksum, the one before
kept, read back without unpickling; a killed training resumes from the newest intact one."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..core.fsutil import atomic_write_bytes, sha256_bytes

CHECKPOINT = "checkpoint.pt"
# the one before: the last good state if the newest is damaged
CHECKPOINT_PREV = "checkpoint.prev.pt"


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_checkpoint(mdir: Path, obj: dict) -> None:
    """Rotate the newest checkpoint to CHECKPOINT_PREV, then write the new one and its
    checksum; a kill at any point leaves at least one intact checkpoint or none."""
    cur, prev = mdir / CHECKPOINT, mdir / CHECKPOINT_PREV
    if cur.is_file() and _checksum_path(cur).is_file():
        os.replace(cur, prev)
        os.replace(_checksum_path(cur), _checksum_path(prev))
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    atomic_write_bytes(cur, data)
    atomic_write_bytes(_checksum_path(cur), sha256_bytes(data).encode())


def load_checkpoint(
    mdir: Path, fp: str, device: torch.device | str, log: Callable[[str], None]
) -> dict | None:
    """The newest intact checkpoint of this training (same fingerprint), read without
    unpickling; damaged ones are discarded with a note."""
    for name in (CHECKPOINT, CHECKPOINT_PREV):
        path = mdir / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        try:
            ok = _checksum_path(path).read_text().strip() == sha256_bytes(data)
        except FileNotFoundError:
            ok = False
        ck = None
        if ok:
            try:
                ck = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError):
                ck = None
        if not isinstance(ck, dict):
            log(f"train-head: note: {path} is damaged; discarded")
            path.unlink(missing_ok=True)
            _checksum_path(path).unlink(missing_ok=True)
            continue
        if ck.get("fingerprint") == fp:
            return ck
    return None


def remove_checkpoints(mdir: Path) -> None:
    for name in (CHECKPOINT, CHECKPOINT_PREV):
        (mdir / name).unlink(missing_ok=True)
        _checksum_path(mdir / name).unlink(missing_ok=True)
