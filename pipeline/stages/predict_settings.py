"""What stage 3 reads of the config, built once at its entry points (`run_predict`, the
stage's `state` / `status`) and handed down: nothing below them takes the config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.keys import Keys
from ..core.layout import RunLayout
from ..core.variants import VARIANTS
from ..data.holdout import Holdout, holdout_of
from .thresholds import Calibration, Thresholds

if TYPE_CHECKING:
    from ..core.config import Config


@dataclass(frozen=True)
class PredictSettings:
    """Stage 3's settings: the config's keys, the run folder, the feature cache and the
    predict / dask keys the stage reads."""

    keys: Keys
    run: RunLayout
    cache: str | Path  # paths.cache
    batch_size: int  # predict.batch_size
    device: str  # predict.device, as configured
    scheduler: str  # dask.scheduler ("": here)
    config: dict[str, dict[str, Any]]  # the config as the report records it (Config.to_dict)
    calibration: Calibration  # predict.threshold and the validation split it may be chosen on
    holdout: Holdout | None  # data.val_cut's cut of the training split (None: off)
    chosen: Thresholds | None = None  # the thresholds resolved for the split being predicted

    @classmethod
    def of(cls, cfg: Config) -> PredictSettings:
        """`cfg`'s settings for stage 3 (its keys validated: core.keys.Keys.from_config)."""
        from ..models.devices import config_keys

        return cls(
            config_keys(cfg),
            RunLayout.of(cfg),
            cfg.paths.cache,
            cfg.predict.batch_size,
            cfg.predict.device,
            cfg.dask.scheduler,
            cfg.to_dict(),
            Calibration.from_config(cfg),
            holdout_of(cfg.data.train_split, cfg.data.val_cut),
        )

    @property
    def thresholds(self) -> Thresholds:
        """Per variant, the probability threshold the masks are cut at: the resolved choice
        (`chosen`, stages.thresholds), else the configured number."""
        if self.chosen is not None:
            return self.chosen
        return Thresholds(dict.fromkeys(VARIANTS, float(self.keys.predict.threshold)))

    @property
    def flip(self) -> bool:
        """predict.tta = "flip": each mask averages the image's and its mirror's logits."""
        return self.keys.predict.tta == "flip"

    def portable(self) -> PredictSettings:
        """These settings as Dask workers must see them: the run folder absolute, links
        resolved (a worker's working directory is not the driver's)."""
        outputs = Path(self.run.root.parent).expanduser().resolve()
        return dataclasses.replace(self, run=RunLayout(outputs / self.run.name))
