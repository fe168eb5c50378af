"""The datasets on disk: the layouts and the listing of a split (layouts), reading and
decoding its files (decode), and the crop/pad canvas that makes an image a multiple of the
patch size (canvas)."""

from __future__ import annotations

from .canvas import Box, canvas_valid, fit_box, from_canvas, same_size_batches, to_canvas
from .decode import (
    MASK_THRESHOLD,
    LoadedItem,
    check_pixels,
    decode_image,
    file_kind,
    load_image,
    load_item,
    load_mask,
    max_file_bytes,
    read_bytes,
)
from .layouts import IMAGE_EXTS, Item, display_name, list_items, list_splits

__all__ = [
    "IMAGE_EXTS",
    "MASK_THRESHOLD",
    "Box",
    "Item",
    "LoadedItem",
    "canvas_valid",
    "check_pixels",
    "decode_image",
    "display_name",
    "file_kind",
    "fit_box",
    "from_canvas",
    "list_items",
    "list_splits",
    "load_image",
    "load_item",
    "load_mask",
    "max_file_bytes",
    "read_bytes",
    "same_size_batches",
    "to_canvas",
]
