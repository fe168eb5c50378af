"""`cache list` and `cache gc`: the feature stores of a cache, who uses them, and removing
those no live run uses (in the way of `dvc gc`).

A run uses a store when it is registered there (train-head and predict register the run
whose models or reports they make: `<store>/runs/<hash>.json`), or when its model card,
stage records or reports name the content fingerprint of one of the store's splits. A run is
live while its folder exists. `cache gc` removes whole stores that no live run uses, and the
folders of a used store that neither the index nor a live run names (a dataset's superseded
content); nothing else, and only inside a cache folder the tool made.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.config import Config
from ..core.errors import LockError, OwnershipError
from ..core.fsutil import exclusive_lock, read_json
from ..core.layout import RunLayout, run_dirs
from ..core.owned import is_marked
from ..models.card import read_card
from ..store import (
    CACHE_LEGACY,
    FEATURES,
    INDEX_FILE,
    RUNS_DIR,
    read_index,
    read_manifest,
    store_lock,
)


@dataclass
class SplitFolder:
    """One stored split: its folder, split name, images, fingerprint and who indexes it."""

    path: Path
    split: str
    n_images: int
    fingerprint: str | None  # None: no readable manifest (an interrupted extraction)
    datasets: list[str] = field(default_factory=list)  # index keys naming it


@dataclass
class StoreInfo:
    """One feature store: its settings, split folders, size and the runs that use it."""

    path: Path
    params: dict[str, Any]
    folders: list[SplitFolder]
    bytes: int
    runs: list[Path] = field(default_factory=list)  # live runs using it
    gone: list[str] = field(default_factory=list)  # registered runs whose folder is gone

    @property
    def used(self) -> bool:
        return bool(self.runs)


def _size(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
    return total


def _named_fingerprints(run_dir: Path) -> set[str]:
    """The split fingerprints a run's model card, stage records and reports name."""
    names: set[str] = set()

    def deps(doc: Any) -> None:
        if isinstance(doc, dict):
            names.update(v for v in doc.values() if isinstance(v, str))

    run = RunLayout(run_dir)
    card, _ = read_card(run.models)
    if card is not None:
        deps(card.get("deps"))
    for rec in sorted(run.stages.glob("*.json")) if run.stages.is_dir() else []:
        doc = read_json(rec)
        if isinstance(doc, dict):
            deps(doc.get("deps"))
    for report in run.reports():
        doc = read_json(report)
        if isinstance(doc, dict):
            deps(doc.get("fingerprints"))
    return names


def stores(cfg: Config) -> list[StoreInfo]:
    """Every store of cfg.paths.cache, with the live runs (registered ones, and those under
    cfg.paths.outputs) that use it."""
    return _survey(Path(cfg.paths.cache), Path(cfg.paths.outputs))[0]


def _survey(cache: Path, outputs: Path) -> tuple[list[StoreInfo], set[str]]:
    """The stores of `cache` with the live runs using them (`stores`), and every split
    fingerprint that a live run names."""
    root = cache / FEATURES
    dirs = (
        sorted(
            d
            for d in root.iterdir()  # a link is not a store of the tool's
            if not d.is_symlink() and (d / "features.json").is_file()
        )
        if root.is_dir() and not root.is_symlink()
        else []
    )
    registered: dict[Path, list[str]] = {}
    for d in dirs:
        entries = sorted((d / RUNS_DIR).glob("*.json")) if (d / RUNS_DIR).is_dir() else []
        registered[d] = [
            doc["run"]
            for doc in map(read_json, entries)
            if isinstance(doc, dict) and isinstance(doc.get("run"), str)
        ]
    live = {Path(r) for runs in registered.values() for r in runs if Path(r).is_dir()}
    live |= {d.resolve() for d in run_dirs(outputs)}
    named = {run: _named_fingerprints(run) for run in sorted(live)}
    out = []
    for d in dirs:
        params = read_json(d / "features.json")
        index = read_index(d)
        folders = []
        for sub in sorted(
            p for p in d.iterdir() if p.is_dir() and not p.is_symlink() and p.name != RUNS_DIR
        ):
            m, _ = read_manifest(sub)
            folders.append(
                SplitFolder(
                    sub,
                    m.split if m is not None else sub.name,
                    m.n_images if m is not None else 0,
                    m.fingerprint if m is not None else None,
                    sorted(k for k, v in index.items() if v == sub.name),
                )
            )
        fps = {f.fingerprint for f in folders if f.fingerprint}
        runs = sorted(
            {Path(r) for r in registered[d] if Path(r).is_dir()}
            | {run for run, fp in named.items() if fp & fps}
        )
        gone = sorted(r for r in registered[d] if not Path(r).is_dir())
        out.append(
            StoreInfo(d, params if isinstance(params, dict) else {}, folders, _size(d), runs, gone)
        )
    return out, set().union(*named.values())


def garbage(cache: Path, outputs: Path) -> list[tuple[Path, int, str]]:
    """What `cache gc` removes: (path, bytes, why) of unused stores, and of split folders of
    used stores that neither the index nor a live run names."""
    out = []
    infos, named_by_live = _survey(cache, outputs)
    for info in infos:
        if not info.used:
            out.append((info.path, info.bytes, "no live run uses it"))
            continue
        for f in info.folders:
            if not f.datasets and f.fingerprint not in named_by_live:
                out.append((f.path, _size(f.path), "superseded: no index entry or run names it"))
    return out


def collect_garbage(cfg: Config, remove: bool) -> tuple[list[tuple[Path, int, str]], list[str]]:
    """garbage() of cfg's cache and outputs, removed when `remove` (each store under its
    lock: one being written is skipped and named). Returns (what is or would be removed,
    what was skipped and why)."""
    cache = Path(cfg.paths.cache)
    todo = garbage(cache, Path(cfg.paths.outputs))
    if not remove or not todo:
        return todo, []
    if not is_marked(cache, CACHE_LEGACY):
        raise OwnershipError(
            f"{cache}: not a cache folder made by vit-objseg (paths.cache); nothing removed"
        )
    done, skipped = [], []
    for path, size, why in todo:
        store = path if (path / "features.json").is_file() else path.parent
        try:
            with exclusive_lock(store_lock(store), f"feature store {store}"):
                if path == store:
                    (store / "features.json").unlink()  # first: a half-removed store is none
                    (store / INDEX_FILE).unlink(missing_ok=True)
                else:
                    (path / "manifest.json").unlink(missing_ok=True)
                shutil.rmtree(path, ignore_errors=True)
            done.append((path, size, why))
        except LockError as e:
            skipped.append(str(e))
    return done, skipped
