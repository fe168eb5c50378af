"""Stage 1's record and what judging it needs, without computing anything: the stores a
run's splits fill, their plans, and the record read from the store they describe."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..core.config import DataCfg
from ..core.fingerprints import first_problems
from ..core.fsutil import FileHasher, read_json
from ..core.keys import DatasetRef, FeatureKey, Keys
from ..data import list_splits
from ..store import FEATURES, SplitPlan, locate_in, plan_split, read_manifest, store_dir
from .base import StageState

STAGE = "extract-features"


def selected_splits(data: DataCfg, splits: Iterable[str] = ()) -> list[str]:
    """`splits`, or every split of the dataset when none are given."""
    splits = list(splits)
    return splits or list_splits(data.root, data.layout)


def store_groups(keys: Keys, splits: list[str]) -> list[tuple[FeatureKey, list[str], str]]:
    """(feature key, splits, label) of each store stage 1 fills: the features of `splits`
    and, with predict.tta = "flip", the mirrored features of the predicted ones."""
    groups = [(keys.feature, splits, "")]
    mirrored = keys.mirrored_splits(splits)
    if mirrored:
        groups.append((keys.feature.mirrored(), mirrored, " mirrored"))
    return groups


def plans_of(
    cache: str | Path, keys: Keys, splits: list[str], hasher: FileHasher
) -> list[tuple[FeatureKey, list[SplitPlan], str]]:
    return [
        (fkey, [plan_split(cache, fkey, keys.data, s, hasher) for s in names], label)
        for fkey, names, label in store_groups(keys, splits)
    ]


def manifest_damage(plan: SplitPlan) -> str:
    """Why the manifest in the plan's folder cannot be read ("" when it can or is absent)."""
    m, why = read_manifest(plan.split_dir)
    return "" if m is not None or why == "no manifest" else why


def store_record(
    cache: str | Path, fkey: FeatureKey, data: DatasetRef, plans: list[SplitPlan]
) -> tuple[dict, dict[str, str | None]] | None:
    """Stage 1's record for these splits, (params, deps), read from the store it describes
    (its features.json and the splits' manifests; shared by every run using the cache).
    Without a store for `fkey`, the record of the store with the same splits made last
    (so that `status` names the settings that changed), or None."""

    def record(sdir: Path) -> tuple[dict, dict[str, str | None]] | None:
        params = read_json(sdir / "features.json")
        if not isinstance(params, dict):
            return None
        deps: dict[str, str | None] = {}
        for p in plans:  # the folder the index names for this dataset's split (or holds it)
            split_dir = locate_in(sdir, data, p.split)
            if split_dir is None and p.split_dir.parent == sdir:
                split_dir = p.split_dir
            m, _ = read_manifest(split_dir) if split_dir is not None else (None, "")
            if m is not None:
                deps[f"data[{p.split}]"] = m.data_digest
        return (params, deps) if deps else None

    sdir = store_dir(cache, fkey)
    own = record(sdir) if sdir.is_dir() else None
    if own is not None:
        return own
    features = Path(cache) / FEATURES
    others = (
        [d for d in features.glob("*/features.json") if d.parent != sdir]
        if features.is_dir()
        else []
    )
    for f in sorted(others, key=lambda f: f.stat().st_mtime, reverse=True):
        other = record(f.parent)
        if other is not None and bool(other[0].get("mirror")) == fkey.mirror:
            return other
    return None


def stage_state(plans: list[SplitPlan], fkey: FeatureKey, problems: list[str]) -> StageState:
    return StageState(
        STAGE,
        {f"data[{p.split}]": p.data_digest for p in plans},
        fkey.params(),
        first_problems(problems),
    )
