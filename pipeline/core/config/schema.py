"""The config's fields: one dataclass per TOML section, each field with its default (the one
place for them) and what it means; ``Config`` is the whole config. What a value may be is
``rules``; reading a file and ``--set`` is ``load``; writing TOML is ``writing``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["RunCfg", "PathsCfg", "DataCfg", "BackboneCfg", "ExtractCfg", "TrainCfg",
           "UpsamplerCfg", "PredictCfg", "DaskCfg", "Config", "all_keys"]


@dataclass
class RunCfg:
    name: str = "default"
    threads: int = 0  # CPU threads of every stage; 0 = the cores this process may use


@dataclass
class PathsCfg:
    cache: str = "cache"
    outputs: str = "outputs"


@dataclass
class DataCfg:
    root: str = "data/obj_seg"
    layout: str = "obj_seg"
    train_split: str = "train"
    val_split: str = ""  # "" = no validation during training
    test_split: str = "test"  # default split for `predict` and `run`
    # the largest image (width x height, read from the file header before decoding) that
    # stage 1 and segment accept; a bigger one is skipped as a bad image (not in the feature key)
    max_pixels: int = 24_000_000


@dataclass
class BackboneCfg:
    name: str = "dino_vits16"
    weights: str = "pretrained"
    # final blocks concatenated into the features; 0 = the backbone's measured default
    layers: int = 0


@dataclass
class ExtractCfg:
    batch_size: int = 32
    device: str = "auto"
    num_workers: int = 4  # image-decoding threads
    precision: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    feature_dtype: str = "float16"
    # how images are made a multiple of the patch size: centre "crop" | edge "pad"
    fit: str = "crop"
    compile: bool = False  # torch.compile the backbone (CUDA only)


@dataclass
class TrainCfg:
    lr: float = 2e-3  # PAC upsampler learning rate (the contract's example: 5e-4; see README)
    linear_lr: float = 1e-2
    epochs: int = 20  # PAC upsampler epochs
    linear_epochs: int = 30
    batch_size: int = 4
    # random training crop side in pixels (rounded to the patch grid); 0 = whole images
    crop: int = 320
    weight_decay: float = 1e-4
    boundary_weight: float = 0.0  # extra BCE weight on pixels near the mask boundary
    seed: int = 0
    device: str = "auto"


@dataclass
class UpsamplerCfg:
    hidden: int = 16  # channels of the 1x1 conv on the features
    channels: list[int] = field(default_factory=lambda: [4, 4, 4, 1])  # PAC stage outputs
    kernel_size: int = 3
    guide: str = "rgb"  # "rgb" (the course) | "learned" (a small conv net on the image)
    guide_channels: int = 8  # for guide = "learned"
    residual: bool = True  # add the bilinearly upsampled linear-head logits to the output
    normalize: bool = False  # PAC kernel normalisation


@dataclass
class PredictCfg:
    batch_size: int = 8
    device: str = "auto"
    threshold: float = 0.5  # on the object probability
    thumbnails: int = 6  # best / worst images shown in the HTML report
    # "flip": average with the mirrored image's logits (stage 1 stores its features)
    tta: str = "none"


@dataclass
class DaskCfg:
    scheduler: str = ""  # "" = run locally; "local:N" = N local worker processes; "tcp://host:8786"


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


def all_keys() -> list[str]:
    """Every config key, dotted ("train.lr"), in the fields' order."""
    cfg = Config()
    return [f"{s.name}.{f.name}" for s in fields(cfg) for f in fields(getattr(cfg, s.name))]
