"""The keys the stages' results are addressed by: small frozen objects built once from the
config at the boundary (`Keys.from_config`, where the stage and command entry points turn a
Config into what the layers below take) and validated there, never as a side effect of a
lookup. Torch-free: "auto" precision is resolved by the caller (models.devices.config_keys)
and passed in.

- `FeatureKey`: what determines a stored feature value besides the image (the store's key);
- `TrainKey`: every setting trained models depend on besides their input features;
- `PredictKey`: what stage 3's report depends on besides the models and the stored split
  (with `RefineKey`, the refiners' settings);
- `DatasetRef`: the dataset a split is read from (the store's index is keyed by it).

Keys at their ABSENT_AS value (core.fingerprints) are left out of the parameters, so that
results made before a key existed stay current. The format versions live here too.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BackboneError
from .fingerprints import fingerprint, without_absent
from .fsutil import FileHasher
from .registry import resolve_layers
from .variants import CANDIDATE, REFINED

if TYPE_CHECKING:
    from .config import Config

FORMAT_VERSION = 3  # the feature store's format: 3 = encoded image bytes, optional masks,
# checksummed shards and manifest (see CHANGELOG.md for what a change recomputes)

# The version of the features a backbone computes from given weights: part of the feature
# cache's key, bumped whenever the computation changes (so that old caches are recomputed).
# 1: timm's forward_features (dynamic_img_size: antialiased resize of the position embeddings)
# 2: DINO-faithful position embeddings (official bicubic rule with the +0.1 offset, no antialias)
FEATURE_VERSION = 2

TRAIN_IGNORED = {"train.device"}  # config keys that do not change the trained models
TRAIN_SECTIONS = ("train", "upsampler")  # the config sections trained models depend on


# ----------------------------------------------------------------------------- weights

_WEIGHTS_HASHER = FileHasher(None)  # the weights files' digests, memoised in the process


def weights_file(weights: str) -> tuple[Path, os.stat_result]:
    """The local weights file `weights` names and its stat (links followed), or a one-line
    BackboneError saying what is there instead: nothing, a folder, or something that is not
    a regular file (a FIFO or a device, which are never opened: reading a FIFO would wait
    for a writer, a device could be endless)."""
    path = Path(weights).expanduser()
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise BackboneError(
            f"weights file not found: {weights} (backbone.weights is "
            '"pretrained", "random" or a local checkpoint path)'
        ) from None
    if stat.S_ISDIR(st.st_mode):
        raise BackboneError(
            f"backbone.weights: {weights} is a folder, not a weights file "
            "(give the checkpoint file inside it)"
        )
    if not stat.S_ISREG(st.st_mode):
        raise BackboneError(
            f"backbone.weights: {weights} is not a regular file (a FIFO or "
            "device); give a checkpoint file"
        )
    return path, st


def weights_identity(weights: str) -> str:
    """ "pretrained" | "random" | "sha256:<hex>" of a local file (memoised in the process by
    path and stat stamp: fsutil.FileHasher)."""
    if weights in ("pretrained", "random"):
        return weights
    path, _ = weights_file(weights)
    return "sha256:" + _WEIGHTS_HASHER.digest(path)


# ----------------------------------------------------------------------------- the keys


@dataclass(frozen=True)
class FeatureKey:
    """What determines a feature value besides the image: the feature store's key.
    `mirror`: the key of the store of mirrored features (each canvas flipped left-right
    before the backbone), which stage 1 adds for the predicted splits when predict.tta =
    "flip"."""

    backbone: str
    weights: str  # weights_identity of backbone.weights
    layers: int  # backbone.layers resolved (0: the backbone's default)
    fit: str
    precision: str  # extract.precision resolved ("auto": by the device)
    feature_dtype: str
    mirror: bool = False

    def params(self) -> dict[str, Any]:
        """The key as the store records it (features.json) and hashes it."""
        params: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "backbone.name": self.backbone,
            "backbone.weights": self.weights,
            "backbone.features": FEATURE_VERSION,
            "extract.fit": self.fit,
            "extract.precision": self.precision,
            "extract.feature_dtype": self.feature_dtype,
            "backbone.layers": self.layers,
            "mirror": self.mirror,
        }
        return without_absent(params)  # at 1 / False: stores made before the keys stay valid

    def inference_params(self) -> dict[str, Any]:
        """The feature settings a consumer of trained models must share with them (the key
        without the store's format)."""
        return {k: v for k, v in self.params().items() if k != "format"}

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.params())

    @property
    def folder(self) -> str:
        """The name of the store's folder: `<backbone>-<fingerprint>`."""
        return f"{self.backbone}-{self.fingerprint[:12]}"

    def mirrored(self, mirror: bool = True) -> FeatureKey:
        """The key of the store of mirrored features (`mirror`), or of the plain ones."""
        return replace(self, mirror=mirror)


def _frozen(value: Any) -> Any:
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def _thawed(value: Any) -> Any:
    return [_thawed(v) for v in value] if isinstance(value, tuple) else value


@dataclass(frozen=True)
class TrainKey:
    """Every setting trained models depend on besides their input features: the feature
    settings (so a consumer can tell whether its backbone matches), the training and
    upsampler keys (less TRAIN_IGNORED), and the splits. Recorded in the model card,
    compared by its consumers."""

    feature: FeatureKey
    settings: tuple[tuple[str, Any], ...]  # ("train.lr", 0.002), ... (lists as tuples)
    train_split: str
    val_split: str  # "": no validation during training
    val_cut: int = 0  # data.val_cut: sequences of train_split held out (data.holdout)

    def params(self) -> dict[str, Any]:
        """The key as the model card records it (data.val_cut absent at 0: models trained
        before the key stay current)."""
        params = self.feature.inference_params()
        params.update((k, _thawed(v)) for k, v in self.settings)
        params["data.train_split"] = self.train_split
        params["data.val_split"] = self.val_split
        params["data.val_cut"] = self.val_cut
        return without_absent(params)  # keys of ABSENT_AS: models trained before stay valid

    @property
    def splits(self) -> list[str]:
        """The stored splits training reads: the training split, and the validation one."""
        return [self.train_split] + ([self.val_split] if self.val_split else [])


@dataclass(frozen=True)
class RefineKey:
    """The refiners' settings (the config's [refine] section): per refiner of
    core.variants.REFINED ("crf", "guided"), its keyword arguments to models.refine
    (`refine.crf_iterations` is dense_crf's `iterations`)."""

    settings: tuple[tuple[str, Any], ...] = ()  # (key within [refine], value), sorted

    @classmethod
    def of(cls, section: dict[str, Any]) -> RefineKey:
        """The key of a [refine] section's {key: value}."""
        return cls(tuple(sorted(section.items())))

    def kwargs(self, refiner: str) -> dict[str, Any]:
        """`refiner`'s keyword arguments ({"iterations": 5, ...} for "crf")."""
        prefix = f"{refiner}_"
        return {k[len(prefix) :]: v for k, v in self.settings if k.startswith(prefix)}

    def params(self, refiner: str | None = None) -> dict[str, Any]:
        """The settings as config keys ("refine.crf_iterations": 5), of one refiner or all."""
        return {
            f"refine.{k}": v
            for k, v in self.settings
            if refiner is None or k.startswith(f"{refiner}_")
        }


@dataclass(frozen=True)
class PredictKey:
    """What stage 3's report depends on besides the models and the stored split; `tta` is
    part of every result's fingerprint (predict, segment, export), and so are the settings
    of the candidate's refiner when the candidate is a refined variant (mask_params)."""

    threshold: float | str  # "auto": chosen on the validation split (stages.thresholds)
    thumbnails: int
    tta: str  # predict.tta: "none" | "flip"
    refine: RefineKey = RefineKey()

    def tta_params(self) -> dict[str, str]:
        """predict.tta as an entry of a result's fingerprint: absent at "none", so results
        made before the key existed stay current."""
        return without_absent({"predict.tta": self.tta})

    def mask_params(self) -> dict[str, Any]:
        """What the candidate's mask depends on besides the models, the features and the
        threshold (segment's and export's fingerprints): the test-time augmentation and,
        for a refined candidate, its refiner's settings (none while the candidate is pac,
        so segment and export results stay current)."""
        refined = REFINED.get(CANDIDATE)
        return {**self.tta_params(), **(self.refine.params(refined[1]) if refined else {})}

    def params(self) -> dict[str, Any]:
        """What stage 3's record holds as its params: stage 3 writes every variant, so all
        the refiners' settings."""
        return {
            "predict.threshold": self.threshold,
            "predict.thumbnails": self.thumbnails,
            **self.tta_params(),
            **self.refine.params(),
        }


@dataclass(frozen=True)
class DatasetRef:
    """The dataset the splits are read from: its folder (as configured), its layout, and
    the largest image stage 1 accepts (data.max_pixels: not part of any key)."""

    root: str
    layout: str
    max_pixels: int | None = None


@dataclass(frozen=True)
class Keys:
    """The keys of one config, built once at the boundary."""

    feature: FeatureKey
    train: TrainKey
    predict: PredictKey
    data: DatasetRef

    @classmethod
    def from_config(cls, cfg: Config, precision: str) -> Keys:
        """`cfg`'s keys (`precision`: extract.precision resolved), the one place a config
        becomes keys. A weights file that is not there, an unknown backbone or a
        backbone.layers it does not offer is a one-line error here, before any store or
        model is looked for."""
        weights = weights_identity(cfg.backbone.weights)
        feature = FeatureKey(
            cfg.backbone.name,
            weights,
            resolve_layers(cfg.backbone.name, cfg.backbone.layers),
            cfg.extract.fit,
            precision,
            cfg.extract.feature_dtype,
        )
        settings = tuple(
            (f"{section}.{k}", _frozen(v))
            for section in TRAIN_SECTIONS
            for k, v in getattr(cfg, section).__dict__.items()
            if f"{section}.{k}" not in TRAIN_IGNORED
        )
        train = TrainKey(
            feature, settings, cfg.data.train_split, cfg.data.val_split, cfg.data.val_cut
        )
        predict = PredictKey(
            cfg.predict.threshold,
            cfg.predict.thumbnails,
            cfg.predict.tta,
            RefineKey.of(dict(cfg.refine.__dict__)),
        )
        return cls(
            feature, train, predict, DatasetRef(cfg.data.root, cfg.data.layout, cfg.data.max_pixels)
        )

    def mirrored_splits(self, splits: Sequence[str]) -> list[str]:
        """Which of `splits` get mirrored features too: with predict.tta = "flip", every
        split but the training split (training never uses them)."""
        if self.predict.tta != "flip":
            return []
        return [s for s in splits if s != self.train.train_split]
