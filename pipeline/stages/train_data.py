"""Stage 2's training data: per-image tensors of a stored split (features, canvas image,
mask), the linear head's soft patch targets, random patch-aligned crops and the boundary band
of the PAC upsampler's loss."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import StoreError
from ..data import canvas_valid, to_canvas
from ..store import FeatureStore

# decoded training images kept in memory (JPEG decoding per crop is slow)
IMAGE_MEMO_BYTES = 4 << 30


def patch_targets(mask: np.ndarray, valid: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Soft patch targets from a canvas mask (Hc, Wc): each patch's target is the fraction of
    its in-image pixels that are object; its weight is the fraction of it inside the image
    (0 for a patch made only of padding)."""
    h, w = mask.shape[0] // patch, mask.shape[1] // patch
    m = (mask & valid)[: h * patch, : w * patch].reshape(h, patch, w, patch).sum(axis=(1, 3))
    v = valid[: h * patch, : w * patch].reshape(h, patch, w, patch).sum(axis=(1, 3))
    target = np.where(v > 0, m / np.maximum(v, 1), 0.0).astype(np.float32)
    return target, (v / float(patch * patch)).astype(np.float32)


# ----------------------------------------------------------------------------- data


class TrainData:
    """Per-image training tensors of the annotated images of a stored split, read lazily
    (decoded images are kept in memory up to IMAGE_MEMO_BYTES)."""

    def __init__(self, store: FeatureStore, patch: int):
        self.store = store
        self.patch = patch
        self.indices = store.annotated()
        self.targets: list[tuple[np.ndarray, np.ndarray]] = []
        for i in self.indices:
            meta = store.items[i]
            mask = to_canvas(self._mask(i), meta.box)
            self.targets.append(patch_targets(mask, canvas_valid(meta.box, meta.orig_size), patch))
        self._images: dict[int, torch.Tensor] = {}
        self._image_bytes = 0

    def __len__(self) -> int:
        return len(self.indices)

    def _mask(self, i: int) -> np.ndarray:
        """The annotation of stored item i, one of `indices`."""
        mask = self.store.mask(i)
        if mask is None:  # annotated() lists it: the store changed under us
            raise StoreError(
                f"{self.store.split_dir}: item {i} has lost its annotation; rerun extract-features"
            )
        return mask

    def feature_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std over all patches of all images (float64 sums)."""
        n, s1, s2 = 0, 0.0, 0.0
        for i in self.indices:
            raw = self.store.features(i)
            f = raw.astype(np.float64).reshape(-1, raw.shape[-1])
            n += f.shape[0]
            s1 = s1 + f.sum(0)
            s2 = s2 + (f * f).sum(0)
        mean = s1 / n
        std = np.sqrt(np.maximum(s2 / n - mean * mean, 0.0))
        return torch.from_numpy(mean).float(), torch.from_numpy(std).float()

    def features(self, k: int) -> torch.Tensor:
        """(1, C, h, w) float32 of the k-th training image."""
        feats = self.store.features(self.indices[k]).astype(np.float32)
        return torch.from_numpy(feats).permute(2, 0, 1)[None]

    def _canvas_image(self, k: int) -> torch.Tensor:
        img = self._images.get(k)
        if img is None:
            i = self.indices[k]
            canvas = to_canvas(self.store.image(i), self.store.items[i].box)
            img = torch.from_numpy(np.array(canvas)).permute(2, 0, 1)[None]
            if self._image_bytes + img.numel() <= IMAGE_MEMO_BYTES:
                self._images[k] = img
                self._image_bytes += img.numel()
        return img

    def full(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """features (1,C,h,w), canvas image uint8 (1,3,Hc,Wc), mask and valid (1,1,Hc,Wc)
        float."""
        i = self.indices[k]
        meta = self.store.items[i]
        box = meta.box
        canvas_mask = np.ascontiguousarray(to_canvas(self._mask(i), box))
        mask = torch.from_numpy(canvas_mask)[None, None].float()
        valid = torch.from_numpy(canvas_valid(box, meta.orig_size))[None, None].float()
        return self.features(k), self._canvas_image(k), mask, valid


Sample = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # TrainData.full


def random_crop(sample: Sample, patch: int, crop: int, rng: np.random.Generator) -> Sample:
    """A crop of `crop` pixels (rounded down to whole patches) at a random patch position."""
    feats, image, mask, valid = sample
    h, w = feats.shape[-2:]
    cp = max(1, crop // patch) if crop > 0 else max(h, w)
    ch, cw = min(cp, h), min(cp, w)
    y = int(rng.integers(0, h - ch + 1))
    x = int(rng.integers(0, w - cw + 1))
    sl = (slice(y * patch, (y + ch) * patch), slice(x * patch, (x + cw) * patch))
    return (
        feats[..., y : y + ch, x : x + cw],
        image[..., sl[0], sl[1]],
        mask[..., sl[0], sl[1]],
        valid[..., sl[0], sl[1]],
    )


def boundary_band(mask: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """1 where a pixel lies within `radius` of the mask boundary, else 0."""
    k = 2 * radius + 1
    dil = F.max_pool2d(mask, k, stride=1, padding=radius)
    ero = -F.max_pool2d(-mask, k, stride=1, padding=radius)
    return (dil - ero).clamp(0, 1)
