"""The crop/pad "canvas" that makes an image a multiple of the patch size (`Box`: where
the canvas sits in the image), and back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


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
        return array[box.top : box.top + box.height, box.left : box.left + box.width]
    return array[ys][:, xs]


def same_size_batches(boxes: list[Box], batch_size: int) -> list[list[int]]:
    """Indices of `boxes` in batches of at most `batch_size` whose canvases share one size;
    sizes in order of first appearance, indices in order within a size (so the same items
    always form the same batches)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, b in enumerate(boxes):
        groups.setdefault((b.height, b.width), []).append(i)
    return [
        idx[k : k + batch_size] for idx in groups.values() for k in range(0, len(idx), batch_size)
    ]


def canvas_valid(box: Box, orig_hw: tuple[int, int]) -> np.ndarray:
    """bool (height, width): canvas pixels that lie inside the original image."""
    h, w = orig_hw
    ys = np.arange(box.height) + box.top
    xs = np.arange(box.width) + box.left
    return ((ys >= 0) & (ys < h))[:, None] & ((xs >= 0) & (xs < w))[None, :]


def from_canvas(array: Any, box: Box, orig_hw: tuple[int, int]) -> Any:
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
        -1, torch.as_tensor(xs, device=array.device)
    )
