"""A small generated dataset (shapes of distinct colour and texture on textured backgrounds)
in either layout: the fixture of the tests and the data of `cli.py demo`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES = {  # category -> (object colour, background colour)
    "disc": ((220, 60, 40), (40, 90, 160)),
    "block": ((250, 210, 40), (30, 120, 60)),
}


def _sample(
    rng: np.random.Generator, category: str, h: int, w: int
) -> tuple[np.ndarray, np.ndarray]:
    obj_col, bg_col = (np.array(c, np.float32) for c in CATEGORIES[category])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # background: its colour, diagonal stripes of random phase and low-amplitude noise
    phase = rng.uniform(0, 2 * np.pi)
    stripes = 0.5 + 0.5 * np.sin((xx + yy) / 6.0 + phase)
    bg = bg_col * (0.75 + 0.35 * stripes[..., None])
    # object: a disc or a rotated rectangle of random size and position, checker-textured
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    r = rng.uniform(0.18, 0.3) * min(h, w)
    if category == "disc":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    else:
        t = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
        v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
        mask = (np.abs(u) <= r) & (np.abs(v) <= 0.6 * r)
    checker = ((xx // 5 + yy // 5) % 2)[..., None]
    obj = obj_col * (0.8 + 0.25 * checker)
    img = np.where(mask[..., None], obj, bg) + rng.normal(0, 6, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8), mask


def make_dataset(
    root: str | Path,
    layout: str = "obj_seg",
    splits: dict[str, int] | None = None,
    size: tuple[int, int] = (160, 224),
    seed: int = 0,
) -> Path:
    """Write a dataset under `root` with `splits[split]` images per category per split, of
    `size` = (height, width). Returns `root`. Deterministic for a given seed."""
    root = Path(root)
    splits = splits or {"train": 8, "test": 4}
    rng = np.random.default_rng(seed)
    h, w = size
    for split, n in splits.items():
        lines = []
        for category in CATEGORIES:
            for i in range(n):
                img, mask = _sample(rng, category, h, w)
                stem = f"{i:05d}"
                if layout == "obj_seg":
                    img_path = root / split / category / "images" / f"{stem}.jpg"
                    mask_path = root / split / category / "annotations" / f"{stem}.png"
                else:
                    seq = f"{category}-{split}"
                    img_path = root / "JPEGImages" / "480p" / seq / f"{stem}.jpg"
                    mask_path = root / "Annotations" / "480p" / seq / f"{stem}.png"
                    lines.append(
                        f"/{img_path.relative_to(root).as_posix()} "
                        f"/{mask_path.relative_to(root).as_posix()}"
                    )
                img_path.parent.mkdir(parents=True, exist_ok=True)
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(img_path, quality=92)
                Image.fromarray((mask * 255).astype(np.uint8)).save(mask_path)
        if layout == "davis2016":
            sets = root / "ImageSets" / "480p"
            sets.mkdir(parents=True, exist_ok=True)
            (sets / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root
