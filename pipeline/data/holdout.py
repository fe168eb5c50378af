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
from dataclasses import dataclass

from ..core.errors import ConfigError

__all__ = [
    "HELDOUT_SUFFIX",
    "Holdout",
    "held_out",
    "heldout_split",
    "holdout_of",
    "split_by_sequence",
    "validation_split",
]


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


HELDOUT_SUFFIX = "_heldout"  # the derived validation split is "<training split>_heldout"


@dataclass(frozen=True)
class Holdout:
    """``data.val_cut = n`` of the training split `train`: the validation split named
    `split` holds its `n` sequences of smallest sha256, the training split the others."""

    train: str
    n: int

    @property
    def split(self) -> str:
        """The derived validation split's name, as reports and `status` show it."""
        return heldout_split(self.train)

    def parts(self, categories: Iterable[str]) -> tuple[list[str], list[str]]:
        """(training sequences, validation sequences) of the stored training split's
        categories; ConfigError (exit 2, one line) when `n` leaves none to train on."""
        try:
            return split_by_sequence(categories, self.n)
        except ValueError as e:
            raise ConfigError(
                f"bad value for data.val_cut: {self.n}: split '{self.train}': {e}"
            ) from None


def heldout_split(train_split: str) -> str:
    """The name of the validation split cut from `train_split` by data.val_cut."""
    return train_split + HELDOUT_SUFFIX


def holdout_of(train_split: str, val_cut: int) -> Holdout | None:
    """The hold-out of data.val_cut, None when it is 0 (off)."""
    return Holdout(train_split, val_cut) if val_cut else None


def validation_split(train_split: str, val_split: str, val_cut: int) -> str:
    """The validation split: data.val_split, or with data.val_cut the derived one ("" none)."""
    return heldout_split(train_split) if val_cut else val_split
