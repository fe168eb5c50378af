"""What stage 1 must produce for a split (`plan_split`): its shards, each an independent,
idempotent task whose file name carries the hash of everything that determines its content
(the feature key, the image and mask files' sha256), and whether the stored split is that
(`split_problems`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..core.fingerprints import fingerprint
from ..core.fsutil import FileHasher, read_json
from ..core.keys import FORMAT_VERSION, DatasetRef, FeatureKey
from ..data import Item, list_items
from .index import pre_index_folder, split_folder, store_dir
from .manifest import ShardEntry, check_shard, read_manifest

SHARD_SIZE = 64  # images per shard: the unit of resumption and of distributed work


@dataclass
class ShardTask:
    """Everything a worker needs to compute one shard (picklable)."""

    data_root: str
    split_dir: str
    file: str  # relative to split_dir
    hash: str
    items: list[Item]
    attrs: dict = field(default_factory=dict)
    max_pixels: int | None = None  # data.max_pixels (not part of the hash: see ShardEntry.retry)

    @property
    def path(self) -> Path:
        return Path(self.split_dir) / self.file

    @property
    def mirror(self) -> bool:
        """Whether the shard holds mirrored features (canvases flipped left-right)."""
        return bool(self.attrs.get("mirror", False))

    @property
    def receipt(self) -> Path:
        return self.path.with_suffix(".json")


@dataclass
class SplitPlan:
    """What stage 1 must produce for a split, derived from the data files and the key."""

    split: str
    split_dir: Path
    items: list[Item]
    problems: list[str]
    data_digest: str
    feature_key: str
    tasks: list[ShardTask]
    max_pixels: int | None = None


def plan_split(
    cache: str | Path, fkey: FeatureKey, data: DatasetRef, split: str, hasher: FileHasher
) -> SplitPlan:
    """The shards of `split` of the dataset `data` in the store of `fkey` under `cache`.
    Reads the data folder (file digests are memoised)."""
    root = Path(data.root)
    items, problems = list_items(root, data.layout, split)
    key = fkey.fingerprint
    ids = [
        (
            it.image,
            hasher.digest(root / it.image),
            it.mask,
            hasher.digest(root / it.mask) if it.mask else None,
        )
        for it in items
    ]
    digest = fingerprint([ids, problems])
    sdir = store_dir(cache, fkey)
    split_dir = sdir / split_folder(split, digest)
    if not split_dir.is_dir():  # a store made before the index holds this very data?
        m, _ = read_manifest(pre_index_folder(sdir, split))
        if m is not None and m.data_digest == digest and m.feature_key == key:
            split_dir = pre_index_folder(sdir, split)
    by_cat: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_cat.setdefault(it.category, []).append(i)
    tasks = []
    for cat, idx in by_cat.items():
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in cat)
        for k in range(0, len(idx), SHARD_SIZE):
            chunk = idx[k : k + SHARD_SIZE]
            h = fingerprint([key, [ids[i] for i in chunk]])
            tasks.append(
                ShardTask(
                    str(root),
                    str(split_dir),
                    f"shards/{safe}-{k // SHARD_SIZE:04d}-{h}.h5",
                    h,
                    [items[i] for i in chunk],
                    {
                        "feature_key": key,
                        "split": split,
                        "shard_hash": h,
                        "format": FORMAT_VERSION,
                        **({"mirror": 1} if fkey.mirror else {}),
                    },
                    data.max_pixels,
                )
            )
    return SplitPlan(split, split_dir, items, problems, digest, key, tasks, data.max_pixels)


def read_receipt(task: ShardTask) -> ShardEntry | None:
    obj = read_json(task.receipt)
    try:
        entry = ShardEntry.from_json(obj) if isinstance(obj, dict) else None
    except (KeyError, TypeError, ValueError):
        return None
    if entry is None or entry.file != task.file or entry.hash != task.hash:
        return None
    return entry


def done_entry(task: ShardTask, hasher: FileHasher | None) -> ShardEntry | None:
    """The shard's receipt when the shard is complete and intact, else None (recompute)."""
    entry = read_receipt(task)
    if entry is None or check_shard(Path(task.split_dir), entry, hasher, task.max_pixels):
        return None
    return entry


def split_problems(plan: SplitPlan, hasher: FileHasher) -> list[str]:
    """Why the stored split is not what the plan asks for ([] = current and intact)."""
    m, why = read_manifest(plan.split_dir)
    if m is None:
        return [why]
    if m.feature_key != plan.feature_key or m.split != plan.split:
        return ["manifest of another split or feature key"]
    if m.data_digest != plan.data_digest:
        return [f"data[{plan.split}] changed"]
    out = []
    listed = {s.file for s in m.shards}
    expected = {t.file for t in plan.tasks}
    out += [f"manifest does not list shard {f}" for f in sorted(expected - listed)]
    out += [f"manifest lists unknown shard {f}" for f in sorted(listed - expected)]
    for s in m.shards:
        if s.file in expected:
            problem = check_shard(plan.split_dir, s, hasher, plan.max_pixels)
            if problem:
                out.append(problem)
    return out
