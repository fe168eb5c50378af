"""The config's fields: one dataclass per TOML section, each field with its default (the one
place for them) and its documentation, declared with ``meta.key``: what it means, what it
allows (the range or choices that ``rules`` enforces) and what a change makes stale;
``Config`` is the whole config.

To add a key: ``name: int = key(default, "What it is.", stale=STALE_TRAINED,
range=Range(lo, hi))`` in its section (a number needs a range, a string with fixed values its
choices); the docs page, ``config show --explain`` and the checks follow. What a value may be is
``rules``; reading a file and ``--set`` is ``load``; writing TOML is ``writing``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..registry import list_backbones, most_layers
from .meta import (
    DASK_HELP,
    DEVICE_HELP,
    NAME_HELP,
    PATH_HELP,
    STALE_ALL,
    STALE_SPEED,
    STALE_TRAINED,
    KeyDoc,
    Range,
    field_doc,
    key,
)
from .schema_refine import RefineCfg
from .schema_train import TrainCfg, UpsamplerCfg

__all__ = [
    "RunCfg",
    "PathsCfg",
    "DataCfg",
    "BackboneCfg",
    "ExtractCfg",
    "TrainCfg",
    "UpsamplerCfg",
    "PredictCfg",
    "RefineCfg",
    "DaskCfg",
    "Config",
    "all_keys",
    "key_docs",
]


@dataclass
class RunCfg:
    name: str = key(
        "default",
        "Name of the run: its models, masks and reports go to `<paths.outputs>/<run.name>/`.",
        stale="nothing is recomputed, but a new name is a fresh run: train-head and predict "
        "are missing there (the feature cache is shared)",
        allowed=NAME_HELP,
        see="runs.md",
    )
    threads: int = key(
        0,
        "CPU threads every stage computes with (torch intra-op threads; stage 1 runs that "
        "many single-threaded forwards side by side); `0` = `OMP_NUM_THREADS` when set, else "
        "the cores this process may use (`os.sched_getaffinity`).",
        stale="nothing: results do not depend on it (stage 1 is bit-identical for any count; "
        "training is deterministic for a fixed count)",
        range=Range(0, 256),
        see="scaling.md#threads-on-shared-machines",
    )


@dataclass
class PathsCfg:
    cache: str = key(
        "cache",
        "Folder of the feature cache (stage 1) and its file-hash memo.",
        stale="extract-features (nothing is cached at the new place)",
        allowed=PATH_HELP,
        see="runs.md#several-datasets-in-one-cache",
    )
    outputs: str = key(
        "outputs",
        "Folder of the runs (models, masks, reports, stage records).",
        stale="like `run.name`: train-head and predict start fresh",
        allowed=PATH_HELP,
        see="outputs.md",
    )


@dataclass
class DataCfg:
    root: str = key(
        "data/obj_seg",
        "The dataset folder.",
        stale="all three stages, but only when the files found there differ: the cache is "
        "keyed by the files' contents, so moving the dataset recomputes nothing",
        allowed=PATH_HELP,
        see="data.md",
    )
    layout: str = key(
        "obj_seg",
        "How `data.root` is laid out.",
        stale="all three stages (another file list)",
        choices=("obj_seg", "davis2016"),
        see="data.md#layouts",
    )
    train_split: str = key(
        "train", "The split that train-head learns from.", stale=STALE_TRAINED, allowed=NAME_HELP
    )
    val_split: str = key(
        "",
        "Optional split scored after each PAC epoch (the validation mIoU in "
        '`metrics.jsonl`); `""` = none.',
        stale=STALE_TRAINED,
        allowed=f'`""`, or {NAME_HELP}, not `data.train_split`',
    )
    val_cut: int = key(
        0,
        "Hold out this many sequences (categories) of `data.train_split` as the validation "
        "split `<train split>_heldout`: the ones whose names have the smallest sha256; "
        'train-head never sees them. `0` = off. Needs `data.val_split = ""`.',
        stale="train-head, predict (never extract-features: the held-out split is read "
        "from the training split's stored features)",
        range=Range(0, 100_000),
        see="data.md#a-validation-split-cut-from-the-training-split",
    )
    test_split: str = key(
        "test",
        "The default split of `predict`, `run` and `status`.",
        stale="predict (another split's result; the others are kept)",
        allowed=NAME_HELP,
    )
    max_pixels: int = key(
        24_000_000,
        "The largest image, in pixels (width x height, read from the file header "
        "before decoding), that stage 1 and `segment` accept; a bigger one is skipped and "
        "reported as one bad image.",
        stale="nothing: it is not part of the feature key; raising it makes the next "
        "extract-features retry only the shards of the images it rejected; lowering it "
        "keeps what is cached",
        range=Range(1, 2**31 - 1),
        see="data.md#files-are-not-trusted",
    )


@dataclass
class BackboneCfg:
    name: str = key(
        "dino_vits16",
        "The frozen backbone the features come from.",
        stale=STALE_ALL,
        choices=tuple(list_backbones()),
        see="backbones.md",
    )
    weights: str = key(
        "pretrained",
        "The backbone's weights: `pretrained` (downloaded), `random`, or the path "
        "of a local checkpoint (known by its content hash).",
        stale=STALE_ALL,
        allowed="`pretrained`, `random` or a file (a path, not empty)",
        see="backbones.md#weights",
    )
    layers: int = key(
        0,
        "How many final layers are concatenated into the features, from 1 to as many as "
        "the backbone has (each backbone's most and default are on the backbones page); 0 = "
        "the backbone's measured default.",
        stale="all three stages (at 1 the feature key is the one of stores made before the "
        "key existed)",
        range=Range(0, most_layers()),
        see="backbones.md",
    )


@dataclass
class ExtractCfg:
    batch_size: int = key(
        32,
        "Images per forward pass on a GPU (on a CPU one image at a time).",
        stale=STALE_SPEED,
        range=Range(1, 4096),
    )
    device: str = key(
        "auto",
        "Device of stage 1 (`auto`: CUDA when there is a GPU).",
        stale="nothing (speed only; but see `extract.precision`)",
        allowed=DEVICE_HELP,
        see="scaling.md#gpu",
    )
    num_workers: int = key(
        4, "Image-decoding threads of stage 1 and `segment`.", stale=STALE_SPEED, range=Range(0, 64)
    )
    precision: str = key(
        "auto",
        "Autocast precision of the backbone (`auto`: bf16 on CUDA, fp32 on CPU).",
        stale="all three stages (a change of the key; the device that `auto` resolved to is "
        "not recorded)",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    feature_dtype: str = key(
        "float16", "How features are stored.", stale=STALE_ALL, choices=("float16", "float32")
    )
    fit: str = key(
        "crop",
        "How an image is made a multiple of the patch size: centre `crop` or edge "
        "`pad` (masks are always written at the image's full size).",
        stale=STALE_ALL,
        choices=("crop", "pad"),
    )
    compile: bool = key(
        False, "Compile the backbone with `torch.compile` (CUDA only).", stale=STALE_SPEED
    )


@dataclass
class PredictCfg:
    batch_size: int = key(
        8,
        "Images per forward of the heads (same-size images are batched).",
        stale=STALE_SPEED,
        range=Range(1, 4096),
    )
    device: str = key(
        "auto",
        "Device of stage 3 (`auto`: CUDA when there is a GPU).",
        stale=STALE_SPEED,
        allowed=DEVICE_HELP,
    )
    threshold: float | str = key(
        0.5,
        'Object probability above which a pixel is object; or `"auto"`: per variant, the '
        "threshold of best mean J on the validation split (`data.val_split` or "
        "`data.val_cut`), from that split's threshold sweep as `predict` recorded it for "
        "these models, never from the split being scored.",
        stale='predict (with `"auto"`: also when the validation split\'s sweep changes), '
        "segment, export",
        range=Range(0, 1, lo_open=True, hi_open=True),
        see="outputs.md#the-threshold-chosen-on-the-validation-split-calibration",
    )
    thumbnails: int = key(
        6,
        "Number of best and of worst images shown in the HTML report.",
        stale="predict",
        range=Range(0, 100),
    )
    tta: str = key(
        "none",
        "Test-time augmentation: `flip` averages each variant's logits with the "
        "mirror image's (stage 1 stores the mirrored features of the predicted splits).",
        stale="extract-features (adds the mirrored features of the predicted splits), "
        "predict, segment, export",
        choices=("none", "flip"),
        see="design.md#feature-layers-and-test-time-augmentation",
    )


@dataclass
class DaskCfg:
    scheduler: str = key(
        "",
        'Where stages 1 and 3 run: `""` in this process, `"local:N"` on N local worker '
        "processes, or a running scheduler's address.",
        stale=STALE_SPEED,
        allowed=DASK_HELP,
        see="scaling.md#dask",
    )


@dataclass
class Config:
    run: RunCfg = field(default_factory=RunCfg)
    paths: PathsCfg = field(default_factory=PathsCfg)
    data: DataCfg = field(default_factory=DataCfg)
    backbone: BackboneCfg = field(default_factory=BackboneCfg)
    extract: ExtractCfg = field(default_factory=ExtractCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    upsampler: UpsamplerCfg = field(default_factory=UpsamplerCfg)
    predict: PredictCfg = field(default_factory=PredictCfg)
    refine: RefineCfg = field(default_factory=RefineCfg)
    dask: DaskCfg = field(default_factory=DaskCfg)

    def get(self, key: str) -> Any:
        """The value of the dotted `key` ("train.lr")."""
        section, name = key.split(".", 1)
        return getattr(getattr(self, section), name)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """{section: {key: value}}, in the fields' order."""
        return dataclasses.asdict(self)

    @property
    def run_dir(self) -> Path:
        """<paths.outputs>/<run.name>."""
        return Path(self.paths.outputs) / self.run.name


def key_docs() -> dict[str, KeyDoc]:
    """Every documented key's KeyDoc, dotted ("train.lr"), in the fields' order. A field
    declared without ``key(...)`` is missing here (tests/test_docs.py names it)."""
    cfg, docs = Config(), {}
    for section in fields(cfg):
        for f in fields(getattr(cfg, section.name)):
            doc = field_doc(f.metadata)
            if doc is not None:
                docs[f"{section.name}.{f.name}"] = doc
    return docs


def all_keys() -> list[str]:
    """Every config key, dotted ("train.lr"), in the fields' order."""
    cfg = Config()
    return [f"{s.name}.{f.name}" for s in fields(cfg) for f in fields(getattr(cfg, s.name))]
