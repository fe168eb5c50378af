"""The inference path that `predict` (stage 3), `segment` and `export` share, below the stages:
the run's trained models checked against the keys (`checked_models`), the backbone forward
that turns uint8 canvases into features as stage 1 stores them (`BackboneRunner`, the base of
stage 1's `Extractor`), the heads and the threshold (`Predictor`) and the mask file
(`mask_png_bytes`). One path, so that the three give the same mask for the same image.

It takes keys (core.keys) and folders, never the config: the stages, `segment` and `export`
build the keys at their entry and hand them down. Layering: this module imports no stage
module (extract, train, predict) and no run-config record; the stages, `segment` and
`export` import it.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .core.errors import ModelError
from .core.fingerprints import diff_params
from .core.fsutil import file_lock
from .core.hints import command
from .core.keys import FeatureKey, Keys, RefineKey
from .core.layout import RunLayout
from .core.variants import VARIANTS
from .data import Box, from_canvas, to_canvas
from .models.backbones import Backbone, create_backbone
from .models.devices import CpuFanout, autocast_dtype
from .models.heads import TrainedModels, load_models
from .models.variant_logits import VariantSeconds, variant_logits
from .store import CachedItem
from .store.provenance import models_mismatch

# ----------------------------------------------------------------------------- the models


@contextlib.contextmanager
def checked_models(
    run: RunLayout,
    keys: Keys,
    cache: str | Path,
    device: torch.device | str = "cpu",
    as_trained: Callable[[dict], bool] = lambda params: False,
) -> Iterator[TrainedModels]:
    """The trained models of the run `run`, verified, held (a shared lock) against a
    train-head of the same run for the duration, and refused (ModelError naming train-head)
    when they were trained with other settings than `keys` say (or on stored splits in
    `cache` that changed since). `as_trained(params)`: whether the run's recorded config
    trained models with the training params `params` (then the error names `--run`)."""
    mdir = run.models
    if not mdir.is_dir():  # no models: say so without creating the folder for the lock
        load_models(mdir)
    # shared: predicts of several splits, segment and export may read at once
    with file_lock(
        run.lock("models"), f"the models of run '{run.name}' (train-head is running)", shared=True
    ):
        models = load_models(mdir, device)
        why = models_mismatch(cache, keys, models.params, models.deps)
        if why:
            # the run's recorded config trained these models: --run uses them as they are
            as_trained_hint = (
                f", or add `--run {run.name}` to use the run as it was trained"
                if diff_params(models.params, keys.train.params()) and as_trained(models.params)
                else ""
            )
            raise ModelError(
                f"the models in {mdir} were trained with other settings ({why}): "
                f"run `{command('train-head')}` first{as_trained_hint}"
            )
        yield models


# ----------------------------------------------------------------------------- the backbone


class BackboneRunner:
    """A loaded backbone on its device: same-size batches of uint8 canvases -> patch features
    in `extract.feature_dtype`, exactly as stage 1 stores them. Stage 1's `Extractor` adds the
    shard records; `segment` calls `launch` directly and `export` takes the `backbone`."""

    def __init__(
        self,
        key: FeatureKey,
        weights: str,
        device: torch.device,
        batch_size: int,
        compile: bool = False,
    ):
        """The backbone of the features `key` with the weights `weights` (backbone.weights:
        "pretrained", "random" or a file) on `device`, batches of `batch_size`; `compile`:
        torch.compile it (CUDA only)."""
        self.device = device
        self.backbone: Backbone = create_backbone(key.backbone, weights, key.layers).to(self.device)
        self.backbone.optimize_for_inference()
        self.patch = self.backbone.spec.patch_size
        self.fit = key.fit
        self.batch_size = batch_size
        self.amp = autocast_dtype(key.precision, self.device)
        self.out_dtype = np.dtype(key.feature_dtype)
        self.model: Callable[[torch.Tensor], torch.Tensor] = self.backbone
        self.cpu = CpuFanout()
        if compile and self.device.type == "cuda":
            self.model = torch.compile(self.backbone, dynamic=False)

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        """A fresh autocast context for this device and precision (fp32: none)."""
        return (
            torch.autocast(self.device.type, dtype=self.amp)
            if self.amp is not None
            else contextlib.nullcontext()
        )

    @torch.inference_mode()
    def launch(self, canvases: list[np.ndarray], mirror: bool = False) -> Callable[[], np.ndarray]:
        """Start the forward pass of one same-size batch of canvases (uint8 (H, W, 3));
        returns a function giving the features (B, h, w, C) in `extract.feature_dtype`, as
        they are stored. `mirror`: of the canvases flipped left-right (for predict.tta). On
        CUDA the copy back is asynchronous, so the caller can prepare the next batch before
        waiting. Stage 1 and `segment` both compute features here."""
        x = torch.from_numpy(np.ascontiguousarray(np.stack(canvases))).permute(0, 3, 1, 2)
        if mirror:
            x = x.flip(-1)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        if self.device.type == "cpu":
            # one image per single-threaded forward, images spread over the cores (CpuFanout)
            def one(i: int) -> torch.Tensor:
                with torch.inference_mode(), self._autocast():
                    return self.model(x[i : i + 1])

            feats = torch.cat(self.cpu.map(one, x.shape[0]))
        else:
            with self._autocast():
                feats = self.model(x)
        feats = feats.to(torch.float16 if self.out_dtype == np.float16 else torch.float32)
        if self.device.type == "cuda":
            host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
            host.copy_(feats, non_blocking=True)
            done = torch.cuda.Event()
            done.record()

            def fetch() -> np.ndarray:
                done.synchronize()
                return host.numpy()

            return fetch
        out = feats.numpy()
        return lambda: out


# ----------------------------------------------------------------------------- the heads


def _logit(p: float) -> float:
    """A probability threshold as the logit threshold the masks are cut at."""
    return math.log(p / (1 - p))


class Predictor:
    """Trained models on a device: patch features and their image canvases -> full-size
    masks. `predict` (features from the store) and `segment` (features just computed) both
    call `masks`, so the two give the same mask for the same image. `refine`: the settings
    of the refined variants (core.variants.REFINED; None: models.refine's defaults)."""

    def __init__(
        self,
        models: TrainedModels,
        device: torch.device,
        threshold: float | Mapping[str, float],
        refine: RefineKey | None = None,
    ):
        """`threshold`: the probability threshold of every variant, or one per variant."""
        self.models = models
        self.device = device
        per = threshold if isinstance(threshold, Mapping) else dict.fromkeys(VARIANTS, threshold)
        self.logit_thresholds = {v: _logit(float(t)) for v, t in per.items()}
        self.refine = refine
        self.cpu = CpuFanout() if device.type == "cpu" else None

    def masks(
        self,
        features: np.ndarray,
        canvases: np.ndarray,
        boxes: Sequence[Box],
        sizes: Sequence[tuple[int, int]],
        variants: Sequence[str] = VARIANTS,
        mirrored: np.ndarray | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Boolean masks (H, W) at each image's original size, per variant, for one batch of
        same-size canvases: `features` (B, h, w, C) as stage 1 stores them, `canvases` uint8
        (B, H', W', 3), `boxes[i]` where canvas i sits in its image of size `sizes[i]` (H, W).
        `mirrored`: the features of the mirrored canvases (predict.tta = "flip"): each
        variant's logits are averaged with the mirror image's, mirrored back.
        On CPU each image goes through the heads alone in a single-threaded pass
        (CpuFanout): a mask depends neither on the batch nor on the core count."""
        places = list(zip(boxes, sizes, strict=True))
        return [m for m, _ in self.masks_and_levels(features, canvases, places, variants, mirrored)]

    def masks_and_levels(
        self,
        features: np.ndarray,
        canvases: np.ndarray,
        places: Sequence[tuple[Box, tuple[int, int]]],
        variants: Sequence[str] = VARIANTS,
        mirrored: np.ndarray | None = None,
        sweep: Sequence[float] = (),
        timing: VariantSeconds | None = None,
    ) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
        """`masks` (`places[i]`: where canvas i sits, its box, and its image's size), and per
        variant the sweep levels (uint8 (H, W)): for each pixel, how many of the ascending
        probability thresholds `sweep` its object probability exceeds (the pixel is object at
        sweep[k] iff its level > k; compared in logit space exactly as the mask is, so at the
        configured threshold the level gives the mask). No sweep: {}. `timing`: where each
        variant's seconds are added."""
        if self.cpu is not None:
            parts = self.cpu.map(
                lambda j: self._binary(
                    features[j : j + 1],
                    canvases[j : j + 1],
                    variants,
                    None if mirrored is None else mirrored[j : j + 1],
                    sweep,
                    timing,
                ),
                len(places),
            )
            binary = {v: np.concatenate([p[0][v] for p in parts]) for v in variants}
            levels = (
                {v: np.concatenate([p[1][v] for p in parts]) for v in variants} if sweep else {}
            )
        else:
            binary, levels = self._binary(features, canvases, variants, mirrored, sweep, timing)
        return [
            (
                {v: from_canvas(binary[v][j], box, size) for v in variants},
                {v: from_canvas(lv[j], box, size) for v, lv in levels.items()},
            )
            for j, (box, size) in enumerate(places)
        ]

    def _logits(
        self,
        f: torch.Tensor,
        img: torch.Tensor,
        variants: Sequence[str],
        mirrored: torch.Tensor | None = None,
        timing: VariantSeconds | None = None,
    ) -> dict[str, torch.Tensor]:
        """Each variant's logits (B, 1, H', W') at canvas size (models.variant_logits, with
        this predictor's refine settings)."""
        return variant_logits(self.models, f, img, variants, mirrored, self.refine, timing)

    @torch.inference_mode()
    def _binary(
        self,
        features: np.ndarray,
        canvases: np.ndarray,
        variants: Sequence[str],
        mirrored: np.ndarray | None = None,
        sweep: Sequence[float] = (),
        timing: VariantSeconds | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Thresholded logits (B, H', W') at canvas size for each variant, and their sweep
        levels (uint8, same shape; {} without `sweep`)."""

        def tensor(feats: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(feats.astype(np.float32)).permute(0, 3, 1, 2).to(self.device)

        img = torch.from_numpy(np.ascontiguousarray(canvases)).permute(0, 3, 1, 2).to(self.device)
        flip = None if mirrored is None else tensor(mirrored)
        logits = self._logits(tensor(features), img, variants, flip, timing)
        binary = {v: (logits[v][:, 0] > self.logit_thresholds[v]).cpu().numpy() for v in variants}
        if not sweep:
            return binary, {}
        levels = {}
        for v in variants:
            x = logits[v][:, 0].cpu().numpy()
            # `tensor > number` compares in the tensor's dtype: so do these bounds, so a level
            # is > k exactly where the mask at sweep[k] is object (one pass per threshold:
            # 10x faster than torch.bucketize on CPU)
            lv = np.zeros(x.shape, np.uint8)
            for b in np.asarray([_logit(t) for t in sweep], dtype=x.dtype):
                lv += x > b
            levels[v] = lv
        return binary, levels

    def batch_masks(
        self, items: list[CachedItem], mirrored: list[np.ndarray] | None = None
    ) -> list[dict[str, np.ndarray]]:
        """`masks` of every variant for cached items whose canvases share one size
        (`mirrored`: their mirrored features, for predict.tta = "flip")."""
        return [m for m, _ in self.batch_masks_and_levels(items, mirrored)]

    def batch_masks_and_levels(
        self,
        items: list[CachedItem],
        mirrored: list[np.ndarray] | None = None,
        sweep: Sequence[float] = (),
        timing: VariantSeconds | None = None,
    ) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
        """`masks_and_levels` of every variant for cached items whose canvases share one size."""
        return self.masks_and_levels(
            np.stack([it.features for it in items]),
            np.stack([to_canvas(it.image, it.meta.box) for it in items]),
            [(it.meta.box, it.meta.orig_size) for it in items],
            mirrored=None if mirrored is None else np.stack(mirrored),
            sweep=sweep,
            timing=timing,
        )


def mask_png_bytes(mask: np.ndarray) -> bytes:
    """A boolean mask as the 8-bit L PNG that predict and segment write (0 / 255)."""
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()
