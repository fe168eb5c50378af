"""The identities a user's cache and runs are addressed by, pinned: the store and split folder
names, the feature parameters each store records, the model card's parameters and every
recorded stage's parameters and dependencies, for a fixed config on the generated data (read
from the files the stages wrote: the test calls no pipeline function, so it holds through any
refactor). A refactor that changes any of
them would make every store or model a user has stale; this test fails first.

The expected values are tests/data/pinned_identities.json. Regenerate it only for an intended
change of what is stored (with a CHANGELOG entry): PIN_IDENTITIES=write pytest this file. The
split folders carry a digest of the generated images' bytes, so a new Pillow JPEG encoder
changes them too (then regenerate and say so)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PINNED = Path(__file__).parent / "data" / "pinned_identities.json"


def _portable(obj: Any, base: Path, root: Path) -> Any:
    """`obj` with the test's temporary paths replaced by placeholders."""
    text = json.dumps(obj, sort_keys=True)
    for path, name in (
        (root.resolve(), "<data>"),
        (base.resolve(), "<base>"),
        (root, "<data>"),
        (base, "<base>"),
    ):
        text = text.replace(str(path), name)
    return json.loads(text)


def _record(path: Path) -> dict[str, Any]:
    rec = json.loads(path.read_text())
    return {"params": rec.get("params"), "deps": sorted(rec.get("deps", {}))}


def identities(base: Path, root: Path, cfg) -> dict[str, Any]:
    features = base / "cache" / "features"
    stores = sorted(p for p in features.iterdir() if p.is_dir() and not p.name.startswith("."))
    run = base / "outputs" / cfg.run.name
    card = json.loads((run / "models" / "models.json").read_text())
    out = {
        "stores": {s.name: json.loads((s / "index.json").read_text())["splits"] for s in stores},
        "feature_params": {s.name: json.loads((s / "features.json").read_text()) for s in stores},
        "records": {p.name: _record(p) for p in sorted((run / "stages").glob("*.json"))},
        "model_card": {k: v for k, v in card.items() if k in ("card_version", "params")},
    }
    return _portable(out, base, root)


def test_identities_are_unchanged(trained):
    found = identities(*trained)
    if os.environ.get("PIN_IDENTITIES") == "write":
        PINNED.parent.mkdir(exist_ok=True)
        PINNED.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
    expected = json.loads(PINNED.read_text())
    for key in expected:
        assert found[key] == expected[key], key
    assert set(found) == set(expected)
