"""The run folder `<paths.outputs>/<run.name>`, described once (as the store describes its own
layout): every path of a run comes from RunLayout, and `is_run` says what a run folder is.

    config.toml                 the config the run was trained with (`--run NAME`)
    models/                     the trained heads and their card (stage 2)
    metrics.jsonl               stage 2's history, one JSON object per epoch
    loss_curves.{svg,pdf,png}   stage 2's drawing of it
    stages/<stage>.json         each recording stage's record (stages/base.py)
    stages/.outs_hashes.json    the stat memo of predict's output checksums
    stages/predict_<split>_units/   predict's per-shard work units
    predictions/<split>/<category>/<stem>.png   predict's masks
    report_<split>.{json,md,html}, report_<split>_files/   predict's reports
    segment/                    `segment`'s default --out folder
    model.pt2                   `export`'s default file
    .locks/<name>.lock          the flock files of the stages writing it
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .fsutil import lock_path

if TYPE_CHECKING:
    from .config import Config

RUN_CONFIG = "config.toml"
MODELS = "models"
STAGES = "stages"
HISTORY = "metrics.jsonl"
LOSS_CURVES = "loss_curves"  # the stem: loss_curves.svg, .pdf, .png
PREDICTIONS = "predictions"
SEGMENT = "segment"
EXPORT = "model.pt2"
OUTS_HASHES = ".outs_hashes.json"


class _InRun:
    """A fixed path of the run folder (a RunLayout attribute): root / name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, layout: RunLayout, owner: object = None) -> Path:
        return layout.root / self.name


@dataclass(frozen=True)
class RunLayout:
    """Where each file of the run in `root` (`<paths.outputs>/<run.name>`) lives."""

    root: Path

    @classmethod
    def of(cls, cfg: Config) -> RunLayout:
        """The layout of the configured run (cfg.run_dir)."""
        return cls(cfg.run_dir)

    @property
    def name(self) -> str:
        return self.root.name

    # the run's fixed files and folders
    config = _InRun(RUN_CONFIG)
    models = _InRun(MODELS)
    history = _InRun(HISTORY)
    loss_curves = _InRun(LOSS_CURVES)  # the stem: the suffix is the format's
    stages = _InRun(STAGES)

    def record(self, stage: str) -> Path:
        """A stage's record: stages/<stage>.json."""
        return self.stages / f"{stage}.json"

    @property
    def outs_hashes(self) -> Path:
        return self.stages / OUTS_HASHES

    def units(self, split: str) -> Path:
        """predict's per-shard work units of `split`."""
        return self.stages / f"predict_{split}_units"

    def predictions(self, split: str) -> Path:
        return self.root / PREDICTIONS / split

    def report(self, split: str, suffix: str = ".json") -> Path:
        """report_<split>.json (or .md, .html)."""
        return self.root / f"report_{split}{suffix}"

    def report_files(self, split: str) -> Path:
        """The folder of the HTML report's figures and thumbnails."""
        return self.root / f"report_{split}_files"

    def reports(self) -> list[Path]:
        """The JSON reports the run holds (report_<split>.json of every split), sorted."""
        return sorted(p for p in self.root.glob("report_*.json") if not p.name.startswith("."))

    segment = _InRun(SEGMENT)
    export = _InRun(EXPORT)

    def lock(self, name: str) -> Path:
        return lock_path(self.root, name)

    def rel(self, path: Path) -> str:
        """`path` relative to the run folder, as records name it (posix)."""
        return path.relative_to(self.root).as_posix()

    def is_run(self) -> bool:
        """Whether the folder is a run's: it holds stage records or models."""
        return self.stages.is_dir() or self.models.is_dir()


def run_dirs(outputs: Path) -> list[Path]:
    """The run folders under `outputs`, sorted by name (none when it is absent)."""
    outputs = Path(outputs)
    if not outputs.is_dir():
        return []
    return sorted(d for d in outputs.iterdir() if d.is_dir() and RunLayout(d).is_run())
