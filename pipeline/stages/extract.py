"""Stage 1: images -> frozen-backbone patch features in the feature store (pipeline/store/).

The work is cut into shards (SHARD_SIZE images of one category, in file order). A shard is an
independent, idempotent task: its output name is the hash of its inputs, and it is written
atomically with a receipt of its checksum, so a run can be killed at any instant and resumed,
a damaged shard is recomputed alone, and shards can be handed to a Dask cluster unchanged
(pipeline/executors.py).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.config import Config
from ..core.errors import DataError, StoreError, thread_limits
from ..core.fingerprints import first_problems
from ..core.fsutil import (
    FileHasher,
    atomic_write_json,
    exclusive_lock,
    human_bytes,
    remove_temporaries,
)
from ..core.keys import DatasetRef, FeatureKey
from ..core.owned import claim_folder
from ..core.progress import Progress, plural
from ..data.holdout import holdout_of
from ..executors import execute, scheduler_of
from ..models.devices import config_keys
from ..runconfig import portable_config
from ..store import (
    CACHE_LEGACY,
    ShardTask,
    SplitPlan,
    bad_marker,
    dataset_key,
    done_entry,
    file_hasher,
    index_split,
    locate_in,
    manifest_path,
    read_index,
    read_manifest,
    split_problems,
    store_dir,
    store_lock,
    stored_split,
)
from .base import Context, StageState, StageStatus, as_record, judge_record
from .extract_record import (
    STAGE,
    manifest_damage,
    plans_of,
    selected_splits,
    stage_state,
    store_record,
)

if TYPE_CHECKING:  # the engine (torch) is imported by the functions that compute
    from .extract_engine import Extractor as Extractor
    from .extract_engine import extractor_of as extractor_of
    from .extract_engine import largest_first as largest_first


def __getattr__(name: str) -> object:
    """The engine's names callers take from here (`extractor_of`, ...), imported on use."""
    if name in ("Extractor", "extractor_of", "largest_first"):
        from . import extract_engine

        return getattr(extract_engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- the stage


@dataclass
class ExtractResult:
    n_images: int = 0
    n_errors: int = 0
    seconds: float = 0.0
    cache_bytes: int = 0
    errors: list[str] = field(default_factory=list)
    up_to_date: bool = False

    @property
    def ok(self) -> bool:
        """False when this run could not use some files (known ones are a note, exit 0)."""
        return self.up_to_date or not self.errors

    def lines(self) -> list[tuple[str, bool]]:
        """What the command reports (text, to stderr)."""
        if self.up_to_date:
            out = [(f"{STAGE}: up-to-date", False)]
            if self.n_errors:
                were = "was" if self.n_errors == 1 else "were"
                out.append(
                    (
                        f"note: {plural(self.n_errors, 'file')} {were} skipped when the "
                        "cache was built (rerun with --force to list them)",
                        True,
                    )
                )
            return out
        rate = self.n_images / self.seconds if self.seconds > 0 else 0.0
        out = [
            (
                f"{STAGE}: {plural(self.n_images, 'image')} in {self.seconds:.1f} s "
                f"({rate:.1f} images/s),"
                f" cache {human_bytes(self.cache_bytes)}"
                + (f", {self.n_errors} skipped" if self.n_errors else ""),
                False,
            )
        ]
        if self.errors:
            out += [(f"  skipped: {e}", True) for e in self.errors]
            out.append(
                (
                    f"error: {plural(self.n_errors, 'file')} could not be used (listed "
                    "above); the other images are cached",
                    True,
                )
            )
        return out


def run_extract(
    cfg: Config,
    splits: Iterable[str] = (),
    force: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
    executor: str | None = None,
) -> ExtractResult:
    """Stage 1 for the given splits (all by default): computes the shards that are missing
    or damaged, and each split's manifest (for the features and, with predict.tta = "flip",
    the mirrored features of the predicted splits). Raises PipelineError subclasses for
    problems that stop the stage."""
    t0 = time.perf_counter()
    keys = config_keys(cfg)
    claim_folder(cfg.paths.cache, "paths.cache", CACHE_LEGACY)
    hasher = file_hasher(cfg.paths.cache)
    groups = plans_of(cfg.paths.cache, keys, selected_splits(cfg.data, splits), hasher)
    result = ExtractResult(up_to_date=True)

    def compute(pending: list[ShardTask], n_total: int) -> None:
        _execute(cfg, pending, n_total, result, progress, executor)

    for fkey, plans, label in groups:
        errors = _extract_store(
            cfg.paths.cache, keys.data, fkey, plans, label, hasher, result, force, log, compute
        )
        if not label:  # the mirrored store lists the same unusable files again
            result.errors.extend(errors)
    hasher.save()
    result.n_errors = len(result.errors)
    result.seconds = time.perf_counter() - t0
    if not result.up_to_date:  # an up-to-date run reports no size: no walk over the store
        result.cache_bytes = sum(
            f.stat().st_size
            for fkey, _, _ in groups
            for f in store_dir(cfg.paths.cache, fkey).rglob("*.h5")
        )
    return result


def _extract_store(
    cache: str | Path,
    data: DatasetRef,
    fkey: FeatureKey,
    plans: list[SplitPlan],
    label: str,
    hasher: FileHasher,
    result: ExtractResult,
    force: bool,
    log: Callable[[str], None],
    compute: Callable[[list[ShardTask], int], None],
) -> list[str]:
    """Bring one store's splits up to date (`compute(shards, n_images)` computes the
    missing shards); returns the splits' listed problems."""
    from .extract_engine import assemble_manifest

    problems = {p.split: split_problems(p, hasher) for p in plans}
    hasher.save()
    todo = [p for p in plans if force or problems[p.split]]
    errors: list[str] = []
    sdir = store_dir(cache, fkey)
    unindexed = [
        p for p in plans if read_index(sdir).get(dataset_key(data, p.split)) != p.split_dir.name
    ]
    if not todo:
        if unindexed:  # stored already (e.g. the dataset moved, or a store made before the
            with exclusive_lock(store_lock(sdir), f"feature store {sdir}"):  # index): index it
                for p in unindexed:
                    index_split(sdir, dataset_key(data, p.split), p.split_dir.name)
        for p in plans:
            errors.extend(_listed_errors(p))
        return errors
    result.up_to_date = False
    with exclusive_lock(store_lock(sdir), f"feature store {sdir}"):
        atomic_write_json(sdir / "features.json", fkey.params())
        pending: list[ShardTask] = []
        for p in todo:
            why = "--force" if force else first_problems(problems[p.split])
            log(f"extract-features [{p.split}{label}]: computing ({why})")
            pending += _pending_shards(p, sdir, hasher, force)
        n_total = sum(len(t.items) for t in pending)
        n_cached = sum(len(p.items) for p in todo) - n_total
        log(
            f"extract-features{label}: {plural(len(todo), 'split')}, "
            f"{plural(n_total, 'image')} to extract"
            + (f", {n_cached} already cached" if n_cached else "")
            + f" [{fkey.backbone}, store {sdir}]"
        )
        if pending:
            compute(pending, n_total)
            for p in todo:  # temporaries of killed (e.g. distributed) writers
                remove_temporaries(p.split_dir / "shards")
        for p in todo:
            errors.extend(assemble_manifest(p, hasher).errors)
        for p in plans:
            if p not in todo:
                errors.extend(_listed_errors(p))
            index_split(sdir, dataset_key(data, p.split), p.split_dir.name)
        hasher.save()
    return errors


def _pending_shards(
    plan: SplitPlan, sdir: Path, hasher: FileHasher, force: bool
) -> list[ShardTask]:
    """The shards of `plan` to compute: the missing or damaged ones (their files removed),
    except those linked from another folder of the store; all of them with `force`."""
    from .extract_engine import reuse_shard

    remove_temporaries(plan.split_dir / "shards")
    if force:
        manifest_path(plan.split_dir).unlink(missing_ok=True)
    pending = []
    for t in plan.tasks:
        if force or done_entry(t, hasher) is None:
            t.path.unlink(missing_ok=True)
            t.receipt.unlink(missing_ok=True)
            bad_marker(t.path).unlink(missing_ok=True)
            if force or not reuse_shard(t, sdir, hasher):
                pending.append(t)
    return pending


def _listed_errors(plan: SplitPlan) -> list[str]:
    """The unusable files listed in the split's manifest, which split_problems found current."""
    m, why = read_manifest(plan.split_dir)
    if m is None:  # removed or rewritten by another process since it was checked
        raise StoreError(
            f"{manifest_path(plan.split_dir)}: {why} (changed during this run); "
            "rerun extract-features"
        )
    return m.errors


def _execute(
    cfg: Config,
    tasks: list[ShardTask],
    n_total: int,
    result: ExtractResult,
    progress: bool,
    executor: str | None,
) -> None:
    from .extract_engine import (
        DASK_WORKER_THREADS,
        dask_extract,
        extractor_of,
        largest_first,
        stream_shards,
    )

    bar = Progress(n_total, "extract", enabled=progress)
    lock = threading.Lock()

    def on_done(n_cached: int) -> None:
        with lock:
            result.n_images += n_cached

    sizes = {t.hash: len(t.items) for t in tasks}

    def remote() -> Iterator[tuple[str, tuple]]:
        wcfg = portable_config(cfg)
        portable = [
            dataclasses.replace(
                t,
                data_root=str(Path(t.data_root).resolve()),
                split_dir=str(Path(t.split_dir).resolve()),
            )
            for t in tasks
        ]
        return ((f"extract-{t.hash}", (t, wcfg)) for t in largest_first(portable))

    def local() -> list[tuple[str, int]]:  # progress through the stream's own callbacks
        extractor = extractor_of(cfg)
        with thread_limits("stage 1's decoding and writing"):
            stream_shards(tasks, extractor, cfg.extract.num_workers, on_done, bar.update)
        return []

    try:
        for h, n in execute(
            scheduler_of(cfg.dask.scheduler, executor),
            dask_extract,
            remote,
            local,
            DASK_WORKER_THREADS,
        ):
            on_done(n)
            bar.update(sizes[h])
    finally:
        bar.close()


class ExtractStage:
    """Stage 1 as data: deps the splits' data digests, params the feature key, outs the
    stored splits (shards with checksums and the manifests); its record is the store."""

    in_run = False

    def name(self, _split: str) -> str:
        return STAGE

    def splits(self, ctx: Context, all_splits: bool) -> list[str]:
        """Every split of the dataset (`status`), or those the run needs (`run`)."""
        cfg = ctx.cfg
        if all_splits:
            return selected_splits(cfg.data)
        holdout = holdout_of(cfg.data.train_split, cfg.data.val_cut)
        needed = [cfg.data.train_split, stored_split(ctx.split, holdout), cfg.data.val_split]
        return list(dict.fromkeys(s for s in needed if s))

    def state(self, ctx: Context) -> StageState:
        return self._judged(ctx)[0]

    def _judged(
        self, ctx: Context, splits: list[str] | None = None
    ) -> tuple[StageState, StageStatus]:
        cfg = ctx.cfg
        keys = config_keys(cfg)
        hasher = file_hasher(cfg.paths.cache, ctx.verify)
        groups = plans_of(
            cfg.paths.cache, keys, self.splits(ctx, True) if splits is None else splits, hasher
        )
        fkey, plans, _ = groups[0]
        problems = []  # of the outputs; a missing or outdated manifest is judged from the record
        damaged = set()  # splits whose manifest cannot be read: an outs problem, not a new dep
        for _, ps, label in groups:
            for p in ps:
                whys = split_problems(p, hasher)
                problems += [
                    f"{p.split}{label}: {why}"
                    for why in whys
                    if label or why not in ("no manifest", f"data[{p.split}] changed")
                ]
                if whys and not label and manifest_damage(p):
                    damaged.add(p.split)
                if not whys and locate_in(p.split_dir.parent, keys.data, p.split) != p.split_dir:
                    problems.append(
                        f"{p.split}{label}: stored, not indexed for "
                        f"{cfg.data.root} (e.g. a moved dataset)"
                    )
        hasher.save()
        state = stage_state(plans, fkey, problems)
        found = store_record(cfg.paths.cache, fkey, keys.data, plans)
        rec = None
        if found is not None:
            params, deps = found
            if params == state.params:
                deps.update(
                    {f"data[{p.split}]": p.data_digest for p in plans if p.split in damaged}
                )
            rec = as_record(StageState(STAGE, deps, params))
        return state, judge_record(rec, state)

    def status(self, ctx: Context, splits: list[str] | None = None) -> StageStatus:
        """up to date when every split's store (and mirrored store, with predict.tta = "flip")
        is current and intact, whichever run wrote it. `ctx.verify`: rehash every data file
        and shard (a shard found bad is marked, so that extract-features repairs it)."""
        try:
            return self._judged(ctx, splits)[1]
        except DataError as e:
            return StageStatus(STAGE, "stale", f"dataset problem: {e}")

    def run(self, ctx: Context, force: bool) -> ExtractResult:
        return run_extract(ctx.cfg, self.splits(ctx, False), force=force, progress=True)


def status(cfg: Config, splits: Iterable[str] = (), verify: bool = False) -> StageStatus:
    """Stage 1's status for the given splits (all by default)."""
    return ExtractStage().status(Context.of(cfg, verify=verify), list(splits) or None)
