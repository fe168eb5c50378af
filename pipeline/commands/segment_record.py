"""`<out>/.segment.json`: what `segment` computed each mask from, so that a rerun recomputes
only the images (or settings) that changed."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..core.fingerprints import fingerprint
from ..core.fsutil import atomic_write_json, read_json, sha256_file, stat_stamp
from ..core.keys import Keys
from ..core.owned import Ledger

if TYPE_CHECKING:
    from .segment_inputs import Source

RECORD_FILE = ".segment.json"
RECORD_VERSION = 1


def settings_fingerprint(keys: Keys, models_fp: str, threshold: float) -> str:
    """What a mask depends on besides its image: the models, the feature settings (backbone,
    weights, canvas fit, precision, feature dtype), the threshold of the pac masks (as
    resolved: with predict.threshold = "auto", the one chosen on the validation split), the
    test-time augmentation (absent at "none", so masks made before the key stay current) and a
    refined candidate's refiner settings (none for pac: PredictKey.mask_params)."""
    return fingerprint(
        {
            "models": models_fp,
            "features": keys.feature.inference_params(),
            "threshold": threshold,
            **keys.predict.mask_params(),
        }
    )


class SegmentRecord:
    """`<out>/.segment.json`: {mask path: {sha256 and stat stamp of the source, settings
    fingerprint, sha256 of the mask and of the overlay (None: none written)}}, written
    atomically before the files it describes (write-ahead, once per batch), so a run killed at
    any point loses at most the masks in flight. Entries of other inputs segmented into the
    same folder are kept."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / RECORD_FILE
        data = read_json(self.path)
        masks = (
            data.get("masks")
            if isinstance(data, dict) and data.get("version") == RECORD_VERSION
            else None
        )
        self.masks: dict[str, dict] = masks if isinstance(masks, dict) else {}
        self._dirty = False

    def is_current(self, src: Source, ledger: Ledger, settings: str, overlays: bool) -> bool:
        """Whether the mask (and overlay, when asked for) of `src` are on disk as recorded and
        were computed from its current content with `settings`. The source is compared by
        sha256, read only when its stat stamp changed (a touched file is not recomputed)."""
        entry = self.masks.get(src.rel)
        if not isinstance(entry, dict) or entry.get("settings") != settings:
            return False
        if not (
            isinstance(entry.get("mask"), str)
            and ledger.content_is(ledger.folder / src.rel, entry["mask"])
        ):
            return False
        if overlays and not (
            isinstance(entry.get("overlay"), str)
            and ledger.content_is(ledger.folder / src.overlay_rel, entry["overlay"])
        ):
            return False
        try:
            stamp = stat_stamp(src.path.stat())
            if entry.get("stamp") == stamp:
                return True
            if sha256_file(src.path) != entry.get("sha256"):
                return False
        except OSError:
            return False  # unreadable now: the run reports it
        entry["stamp"] = stamp
        self._dirty = True
        return True

    def put(self, rel: str, entry: dict) -> None:
        self.masks[rel] = entry
        self._dirty = True

    def drop(self, rel: str) -> None:
        if self.masks.pop(rel, None) is not None:
            self._dirty = True

    def save(self) -> None:
        if self._dirty:
            atomic_write_json(self.path, {"version": RECORD_VERSION, "masks": self.masks})
            self._dirty = False
