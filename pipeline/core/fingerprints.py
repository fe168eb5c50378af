"""Content fingerprints of JSON-able parameters and the readable difference of two parameter
sets: what every stage record, the store and the model card share. Torch-free, below
everything that records a result."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from .fsutil import canonical_json


def fingerprint(obj: Any) -> str:
    """A stable short hash of JSON-able data."""
    return hashlib.sha256(canonical_json(obj)).hexdigest()[:16]


def _show(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


# Parameters left out of a fingerprint at one value, so that results made before the key
# existed stay current; their absence means that value (the one place that says which):
# backbone.layers at 1 (params.feature_params), the mirrored-store flag at False (ditto),
# predict.tta at "none" (params.tta_params), the region loss and the upsampler options of
# issue 29 at today's design and data.val_cut at 0 (TrainKey.params). diff_params reads an
# absent key as its value.
ABSENT_AS: dict[str, Any] = {
    "backbone.layers": 1,
    "mirror": False,
    "predict.tta": "none",
    "train.region_loss": "none",
    "train.region_weight": 1.0,
    "upsampler.bandwidth": "fixed",
    "upsampler.upsample": "bilinear",
    "data.val_cut": 0,
}

_NO_VALUE = object()  # an absent key without an ABSENT_AS value


def without_absent(params: dict[str, Any]) -> dict[str, Any]:
    """`params` less the keys at their ABSENT_AS value (how results recorded before a key
    existed stay current)."""
    return {k: v for k, v in params.items() if k not in ABSENT_AS or v != ABSENT_AS[k]}


def _value(params: dict[str, Any], key: str) -> Any:
    return params[key] if key in params else ABSENT_AS.get(key, _NO_VALUE)


def diff_params(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two parameter (or dependency) dicts, in key order.
    A key of ABSENT_AS that one side lacks has its absent-at value there, so a change from
    or to that value reads `key: old -> new`, not "is new" / "dropped"."""
    out = []
    for key in sorted(set(old) | set(new)):
        was, now = _value(old, key), _value(new, key)
        if was is _NO_VALUE:
            out.append(f"{key} is new")
        elif now is _NO_VALUE:
            out.append(f"{key} dropped")
        elif was != now:
            if key.startswith(("data[", "features[", "models")):
                out.append(f"{key} changed")
            else:
                out.append(f"{key}: {_show(was)} -> {_show(now)}")
    return out


def first_problems(problems: Sequence[str], n: int = 3) -> str:
    """The first `n` of `problems` joined, with how many more there are."""
    more = f"; +{len(problems) - n} more" if len(problems) > n else ""
    return "; ".join(problems[:n]) + more
