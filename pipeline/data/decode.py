"""Reading and decoding a dataset's files: size limits before decoding (data.max_pixels),
EXIF orientation, non-regular files refused, masks thresholded."""

from __future__ import annotations

import io
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..core.errors import DataError, ImageTooLarge

if TYPE_CHECKING:
    from .layouts import Item

MASK_THRESHOLD = 128  # a mask pixel is object where its L value is >= this
# bytes a file may have per allowed pixel (8: 16-bit RGBA, uncompressed), plus headers and
# metadata: a longer file is refused unread whatever its header says
BYTES_PER_PIXEL = 8
BYTES_OVERHEAD = 16 << 20

_RETRY = "raise data.max_pixels to use it (the next run retries the file)"


def file_kind(mode: int) -> str:
    """What a non-regular file is, for messages ("a FIFO", "a character device", ...)."""
    kinds = (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    )
    return next((name for test, name in kinds if test(mode)), "not a file")


def max_file_bytes(max_pixels: int) -> int:
    """The longest file accepted for an image of at most `max_pixels` pixels (8 bytes per
    pixel, 16-bit RGBA uncompressed, plus 16 MiB of headers and metadata)."""
    return BYTES_OVERHEAD + BYTES_PER_PIXEL * max_pixels


def read_bytes(path: str | Path, what: str = "file", max_pixels: int | None = None) -> bytes:
    """The bytes of a regular file; DataError naming the file otherwise. A FIFO (whose
    open would block until a writer comes), a device (/dev/zero never ends) or a socket is
    refused: the file is opened non-blocking and checked on the open descriptor (fstat), so
    it cannot be swapped between the check and the read. With `max_pixels`, a file longer
    than max_file_bytes(max_pixels) is refused without being read (ImageTooLarge: a 10 GB
    ".jpg" never reaches memory)."""
    limit = None if max_pixels is None else max_file_bytes(max_pixels)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise DataError(f"{path}: not a regular file ({file_kind(st.st_mode)})")
            size = st.st_size
            if limit is None or size <= limit:
                with os.fdopen(fd, "rb", closefd=False) as f:
                    data = f.read() if limit is None else f.read(limit + 1)  # it may grow
                size = len(data)
        finally:
            os.close(fd)
    except OSError as e:
        raise DataError(f"{path}: cannot read {what} ({e.strerror or _short(e)})") from None
    if limit is not None and size > limit:
        needed = -(-(size - BYTES_OVERHEAD) // BYTES_PER_PIXEL)  # the max_pixels it would pass
        raise ImageTooLarge(
            f"{path}: {what} file of {size} bytes, more than an image within "
            f"data.max_pixels = {max_pixels} can need ({limit} bytes): not "
            f"read; {_RETRY}",
            needed,
        )
    return data


def _open_image(data: bytes) -> Image.Image:
    """The image in `data` opened lazily (its header read, its pixels not decoded), with the
    format plugins Image.open tries, in its order, but without PIL's decompression-bomb
    check, which `max_pixels` replaces (a one-line error naming the file and its size).

    Why not Image.open: above Image.MAX_IMAGE_PIXELS it warns and above twice that it raises
    before telling the size, and the ways around it change process-wide state that other
    threads see: Image.MAX_IMAGE_PIXELS itself, or warnings.catch_warnings (which swaps the
    warning filters of every thread and restores them out of order when two threads nest).
    Images are decoded in thread pools, beside the model and other code, so this asks PIL's
    registered plugins (Image.ID / Image.OPEN, the table Image.open walks) directly: nothing
    global is changed, and a plugin's own checks of frames or tiles still apply."""
    Image.init()  # every plugin registered (once per process; Image.open does the same)
    prefix = data[:16]
    for fmt in list(Image.ID):
        factory, accept = Image.OPEN[fmt]
        ok = accept(prefix) if accept else True
        if not ok or isinstance(ok, str):  # a str is Image.open's "possible format" warning
            continue
        try:
            return factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue  # not this format after all: Image.open goes on to the next one too
    raise UnidentifiedImageError("cannot identify image file")


def check_pixels(
    size: tuple[int, int], name: str | Path, max_pixels: int | None, what: str = "image"
) -> None:
    """ImageTooLarge (a DataError) when `size` (width, height) has more than `max_pixels`
    pixels (None: no limit)."""
    w, h = size
    pixels = w * h
    if max_pixels is not None and pixels > max_pixels:
        raise ImageTooLarge(
            f"{name}: {what} of {w}x{h} pixels ({pixels / 1e6:.3g} megapixels) is larger "
            f"than data.max_pixels = {max_pixels} ({max_pixels / 1e6:.3g} megapixels): not "
            f"decoded; {_RETRY}",
            pixels,
        )


def _decode(
    data: bytes,
    name: str | Path,
    what: str,
    max_pixels: int | None,
    convert: Callable[[Image.Image], Image.Image],
) -> np.ndarray:
    """`convert(im)` of the decoded image as an array, its pixel count checked against
    `max_pixels` from the header first; DataError naming the file when it cannot be used."""
    try:
        with _open_image(data) as im:
            check_pixels(im.size, name, max_pixels, what)
            im.load()
            out = convert(im)
    except Image.DecompressionBombError as e:  # a plugin's check of one frame or tile
        raise DataError(f"{name}: {what} too large to decode safely ({_short(e)})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error) as e:
        raise DataError(f"{name}: corrupt or unreadable {what} ({_short(e)})") from None
    return np.asarray(out)


def decode_image(data: bytes, name: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Encoded image bytes as uint8 RGB (H, W, 3) in the orientation an image viewer shows
    (EXIF orientation applied), whatever the mode (L, RGBA, P, ...). `name` is for errors.
    `max_pixels`: ImageTooLarge, read from the header before decoding, for an image with
    more pixels (None: no limit, e.g. for bytes that passed it when they were stored)."""
    rgb = _decode(
        data, name, "image", max_pixels, lambda im: ImageOps.exif_transpose(im).convert("RGB")
    )
    return rgb.astype(np.uint8, copy=False)


def load_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3) (see decode_image and read_bytes)."""
    return decode_image(read_bytes(path, "image", max_pixels), path, max_pixels)


def load_mask(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """A mask file as bool (H, W): object where the pixel is >= 128 after conversion to L
    (`max_pixels` as for load_image)."""
    data = read_bytes(path, "mask", max_pixels)
    return _decode(data, path, "mask", max_pixels, lambda im: im.convert("L")) >= MASK_THRESHOLD


@dataclass
class LoadedItem:
    """One decoded item: the image file's bytes (stored as they are), its pixels and mask."""

    encoded: bytes
    image: np.ndarray  # uint8 (H, W, 3), viewer orientation
    mask: np.ndarray | None  # bool (H, W), None when the item has no annotation


def load_item(root: str | Path, item: Item, max_pixels: int | None = None) -> LoadedItem:
    """Image (read once: the stored bytes are the decoded bytes) and mask of `item`;
    DataError if either is unreadable, not a regular file, larger than `max_pixels` (then
    ImageTooLarge, found before decoding) or their sizes differ."""
    root = Path(root)
    encoded = read_bytes(root / item.image, "image", max_pixels)
    image = decode_image(encoded, root / item.image, max_pixels)
    mask = None
    if item.mask is not None:
        mask = load_mask(root / item.mask, max_pixels)
        if mask.shape != image.shape[:2]:
            raise DataError(
                f"{root / item.mask}: mask size {mask.shape[1]}x{mask.shape[0]} differs from "
                f"its image's {image.shape[1]}x{image.shape[0]}"
            )
    return LoadedItem(encoded, image, mask)


def _short(e: BaseException) -> str:
    if isinstance(e, UnidentifiedImageError):
        return "not a recognised image format"
    return (str(e).splitlines() or [type(e).__name__])[0][:200]
