"""Whether trained models still match what the keys ask for: the training params their card
records and the stored splits they were trained on (their content fingerprints), without
loading a model or torch (what `status` asks)."""

from __future__ import annotations

from pathlib import Path

from ..core.fingerprints import diff_params
from ..core.keys import Keys
from ..data.holdout import holdout_of
from .selection import selected_fingerprint


def models_mismatch(cache: str | Path, keys: Keys, params: dict, deps: dict) -> str:
    """Why models trained with `params` on the stored splits `deps` are not the ones the
    keys ask for ("" when they are): other training settings, or a stored split (of the
    dataset keys.data in the cache folder `cache`, as data.val_cut cuts it) that has changed
    since training."""
    diff = diff_params(params, keys.train.params())
    if diff:
        return "; ".join(diff[:4]) + (f" (+{len(diff) - 4} more)" if len(diff) > 4 else "")
    holdout = holdout_of(keys.train.train_split, keys.train.val_cut)
    for dep, fp in deps.items():
        split = dep[len("features[") : -1]
        now = selected_fingerprint(cache, keys.feature, keys.data, split, holdout)
        if now is not None and now != fp:
            return f"features[{split}] changed since training"
    return ""
