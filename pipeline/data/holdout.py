"""A validation split cut from the training split by sequence (``data.val_cut``), for a
dataset that has only train and test.

The held-out sequences (categories; a DAVIS category is a sequence) are the ``n`` whose
names have the smallest sha256: deterministic, the same on every machine and in every
listing order, and a sequence's membership depends on the names alone, never on the images.
Every frame of a sequence goes to one side, so no frame of a validation sequence is trained
on. Pure functions; the stages apply them to the training split's listing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

__all__ = ["held_out", "split_by_sequence"]


def _rank(name: str) -> tuple[str, str]:
    return hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest(), name


def held_out(categories: Iterable[str], n: int) -> list[str]:
    """The `n` categories held out for validation, sorted by name. ValueError unless
    0 < n < the number of distinct categories (training keeps at least one)."""
    names = sorted(set(categories))
    if not 0 < n < len(names):
        raise ValueError(
            f"cannot hold out {n} of {len(names)} sequences (between 1 and {len(names) - 1})"
        )
    return sorted(sorted(names, key=_rank)[:n])


def split_by_sequence(categories: Iterable[str], n: int) -> tuple[list[str], list[str]]:
    """(training sequences, validation sequences), each sorted by name."""
    names = sorted(set(categories))
    val = held_out(names, n)
    return [c for c in names if c not in set(val)], val
