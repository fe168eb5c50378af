"""What each stage's result depends on besides its inputs: the parameter declarations that
the stages' fingerprints, the model card and `status` read. One place, below the stages:
the store, the models and the stages import from here, never the other way round.

Keys at their ABSENT_AS value (stages.py) are left out, so that results made before a key
existed stay current.
"""
from __future__ import annotations

from typing import Any

from .core.config import Config
from .core.fingerprints import without_absent
from .core.registry import resolve_layers
from .models.backbones import FEATURE_VERSION, weights_identity
from .models.devices import resolve_precision

FORMAT_VERSION = 3  # the feature store's format: 3 = encoded image bytes, optional masks,
# checksummed shards and manifest (see CHANGELOG.md for what a change recomputes)
TRAIN_IGNORED = {"train.device"}  # config keys that do not change the trained models
PREDICT_PARAMS = ("predict.threshold", "predict.thumbnails")  # the report's, besides inputs


def feature_params(cfg: Config, mirror: bool = False) -> dict[str, Any]:
    """What determines a feature value besides the image: the store's feature key. `mirror`:
    the key of the store of mirrored features (each canvas flipped left-right before the
    backbone), which stage 1 adds for the predicted splits when predict.tta = "flip"."""
    params: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "backbone.name": cfg.backbone.name,
        "backbone.weights": weights_identity(cfg.backbone.weights),
        "backbone.features": FEATURE_VERSION,
        "extract.fit": cfg.extract.fit,
        "extract.precision": resolve_precision(cfg.extract.precision, cfg.extract.device),
        "extract.feature_dtype": cfg.extract.feature_dtype,
    }
    params["backbone.layers"] = resolve_layers(cfg.backbone.name, cfg.backbone.layers)
    params["mirror"] = mirror
    return without_absent(params)  # at 1 / False: stores made before the keys stay valid


def inference_params(cfg: Config) -> dict[str, Any]:
    """The feature settings a consumer of trained models must share with them (the feature
    key without the store's format)."""
    return {k: v for k, v in feature_params(cfg).items() if k != "format"}


def training_params(cfg: Config) -> dict[str, Any]:
    """Every setting that trained models depend on besides their input features: the feature
    settings (so a consumer can tell whether its backbone matches), the training and
    upsampler keys, and the splits. Recorded in the model card, compared by consumers."""
    params = inference_params(cfg)
    for section in ("train", "upsampler"):
        for k, v in getattr(cfg, section).__dict__.items():
            if f"{section}.{k}" not in TRAIN_IGNORED:
                params[f"{section}.{k}"] = v
    params["data.train_split"] = cfg.data.train_split
    params["data.val_split"] = cfg.data.val_split
    return params


def tta_params(cfg: Config) -> dict[str, str]:
    """predict.tta as an entry of a result's fingerprint (predict, segment, export): absent
    at "none", so results made before the key existed stay current."""
    return without_absent({"predict.tta": cfg.predict.tta})


def predict_params(cfg: Config) -> dict[str, Any]:
    """What stage 3's report depends on besides the models and the stored split."""
    return {**{k: cfg.get(k) for k in PREDICT_PARAMS}, **tta_params(cfg)}


def mirrored_splits(cfg: Config, splits: list[str]) -> list[str]:
    """Which of `splits` get mirrored features too: with predict.tta = "flip", every split but
    the training split (training never uses them)."""
    return [s for s in splits if s != cfg.data.train_split] if cfg.predict.tta == "flip" else []
