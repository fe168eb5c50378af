"""The thresholds the masks are cut at, per variant: ``predict.threshold`` itself, or with
``predict.threshold = "auto"`` the ones chosen (metrics.calibration: best mean J) on the
validation split's threshold sweep as stage 3 recorded it for this run, never on the split
being scored.

The validation split is ``data.val_split``, or with ``data.val_cut`` the sequences held out
of the training split (``<train>_heldout``, data.holdout). Its sweep is a dependency like any
other: it counts only when ``predict[<val>]`` was recorded with the current models, the
current stored features of the validation split and the same ``predict.tta``, and its report
is the file that stage wrote (its sha256 as recorded); its content fingerprint
(``calibration.sweep_fingerprint``) is the dependency's value. The validation split itself is
predicted with a number (``VAL_THRESHOLD``: its sweep does not depend on it, the choice reads
the fixed grid only). Shared by predict, segment and export; below `Calibration.from_config`
nothing reads the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core.config.rules import AUTO
from ..core.errors import CalibrationMissing, ConfigError
from ..core.fingerprints import ABSENT_AS
from ..core.fsutil import sha256_file
from ..core.hints import command
from ..core.jsondoc import Damaged, read_doc
from ..core.layout import RunLayout
from ..core.variants import VARIANTS
from ..data.holdout import validation_split
from ..metrics.calibration import OBJECTIVE, choose_thresholds, sweep_fingerprint
from ..metrics.masks import sweep_thresholds
from .base import load_record

if TYPE_CHECKING:
    from ..core.config import Config

__all__ = [
    "VAL_THRESHOLD",
    "Calibration",
    "Thresholds",
    "predict_stage_name",
    "refuse_scoring_the_validation_split",
    "resolve_thresholds",
    "sweep_dependency",
    "val_sweep",
]

VAL_THRESHOLD = 0.5  # what the repair command predicts the validation split with
OBJECTIVE_TEXT = (
    "the variant's mean J (per-image object IoU) on the validation split, over "
    "the thresholds 0.05 ... 0.95; ties to the one nearest 0.5"
)


def predict_stage_name(split: str) -> str:
    """Stage 3's name for `split` (the name of its record)."""
    return f"predict[{split}]"


@dataclass(frozen=True)
class Calibration:
    """What the thresholds depend on: ``predict.threshold`` (a number or "auto"), the
    validation split it is chosen on ("" none) and ``predict.tta``."""

    threshold: float | str
    val_split: str
    tta: str

    @classmethod
    def from_config(cls, cfg: Config) -> Calibration:
        """The calibration settings of `cfg` (the one place they are read from a config)."""
        val = validation_split(cfg.data.train_split, cfg.data.val_split, cfg.data.val_cut)
        return cls(cfg.predict.threshold, val, cfg.predict.tta)

    @property
    def auto(self) -> bool:
        return self.threshold == AUTO

    @property
    def dep(self) -> str:
        """The dependency's name in a stage's deps: ``sweep[<val split>]``."""
        return f"sweep[{self.val_split}]"

    def repair_command(self) -> str:
        """The command that makes the validation sweep."""
        return command(
            "predict", "--split", self.val_split, "--set", f"predict.threshold={VAL_THRESHOLD}"
        )


@dataclass(frozen=True)
class Thresholds:
    """Per variant, the probability threshold its masks are cut at, and where it came from:
    ``split`` None for a configured number, else the validation split that chose it."""

    values: dict[str, float]
    split: str | None = None
    fingerprint: str | None = None  # of the validation sweep read (auto)

    @property
    def auto(self) -> bool:
        return self.split is not None

    @property
    def sweep(self) -> tuple[float, ...]:
        """The report's sweep thresholds: the grid and every threshold used."""
        return tuple(sorted({x for t in self.values.values() for x in sweep_thresholds(t)}))

    def describe(self) -> str:
        """One line for the report's settings: "0.5", or the values and where chosen."""
        if not self.auto:
            return ", ".join(sorted({f"{t:g}" for t in self.values.values()}))
        return f"auto, chosen on {self.split}: " + ", ".join(
            f"{v} {t:g}" for v, t in self.values.items()
        )

    def to_json(self) -> dict[str, Any]:
        """report_<split>.json's ``calibration``."""
        if not self.auto:
            return {"mode": "fixed", "thresholds": dict(self.values), "split": None}
        return {
            "mode": AUTO,
            "thresholds": dict(self.values),
            "split": self.split,
            "objective": OBJECTIVE,
            "objective_text": OBJECTIVE_TEXT,
            "sweep_fingerprint": self.fingerprint,
            "source": f"report_{self.split}.json",
        }


def refuse_scoring_the_validation_split(cal: Calibration, split: str) -> None:
    """ConfigError (exit 2) when "auto" would choose the threshold on `split` itself."""
    if cal.auto and split == cal.val_split:
        raise ConfigError(
            f"predict.threshold = auto chooses the threshold on the validation split "
            f"'{split}', the split being predicted: predict it with a number "
            f"(--set predict.threshold={VAL_THRESHOLD}), the other splits with auto"
        )


def _recorded_problem(
    rec: dict, cal: Calibration, models_fp: str | None, features_fp: str | None
) -> str:
    """Why the validation split's record is not one of these models, features and TTA."""
    val = cal.val_split
    deps, params = rec.get("deps", {}), rec["params"]
    if models_fp is None or deps.get("models") != models_fp:
        return f"split '{val}' predicted with other models"
    if features_fp is not None and deps.get(f"features[{val}]") != features_fp:
        return f"split '{val}' predicted from other stored features"
    tta = params.get("predict.tta", ABSENT_AS["predict.tta"])
    if tta != cal.tta:
        return f"split '{val}' predicted with predict.tta = {tta}"
    return ""


def val_sweep(
    run: RunLayout, cal: Calibration, models_fp: str | None, features_fp: str | None
) -> tuple[Thresholds | None, str]:
    """The auto thresholds chosen on the validation split's recorded sweep, and "", or None
    and why they cannot be (missing, made with other models, features or TTA, changed).
    `features_fp`: the validation split's stored features now, which its record must name
    (None: not checked; segment and export need no feature cache)."""
    val = cal.val_split
    rec = load_record(run.root, predict_stage_name(val))
    if rec is None:
        return None, f"split '{val}' not predicted by this run"
    why = _recorded_problem(rec, cal, models_fp, features_fp)
    if why:
        return None, why
    path = run.report(val)
    outs = rec.get("outs")
    try:
        if not isinstance(outs, dict) or outs.get(run.rel(path)) != sha256_file(path):
            return None, f"{path.name} is not the report predict wrote"
        report = read_doc(path)
        if not isinstance(report, dict):
            return None, f"{path.name} is not a report"
        chosen = choose_thresholds(report, VARIANTS)
        return Thresholds(chosen, val, sweep_fingerprint(report, VARIANTS)), ""
    except OSError:
        return None, f"{path.name} missing"
    except (Damaged, ValueError, KeyError, TypeError) as e:
        return None, f"{path.name}: {e}"


def resolve_thresholds(
    run: RunLayout,
    cal: Calibration,
    split: str | None,
    models_fp: str | None,
    features_fp: str | None = None,
) -> Thresholds:
    """The thresholds to cut `split`'s masks at (`split` None: images of no split, as
    segment and export): the configured number for every variant, or the auto choice
    (ConfigError when `split` is the validation split, CalibrationMissing naming the command
    when its sweep is missing or out of date). `features_fp`: as val_sweep."""
    if not cal.auto:
        return Thresholds(dict.fromkeys(VARIANTS, float(cal.threshold)))
    if split is not None:
        refuse_scoring_the_validation_split(cal, split)
    found, why = val_sweep(run, cal, models_fp, features_fp)
    if found is None:
        raise CalibrationMissing(
            f"predict.threshold = auto: no usable threshold sweep of the validation split "
            f"({why}); run `{cal.repair_command()}` first"
        )
    return found


def sweep_dependency(
    run: RunLayout,
    cal: Calibration,
    split: str,
    models_fp: str | None,
    features_fp: str | None,
) -> tuple[str | None, str]:
    """Stage 3's dependency ``cal.dep`` for `split` with "auto": the validation sweep's
    content fingerprint and "", or None and why it is unusable (the split being predicted is
    the validation split; the sweep is missing or out of date). `features_fp`: as val_sweep."""
    if split == cal.val_split:
        return None, (
            "is the split being predicted: predict it with a number "
            f"(--set predict.threshold={VAL_THRESHOLD})"
        )
    found, why = val_sweep(run, cal, models_fp, features_fp)
    return (found.fingerprint, "") if found is not None else (None, f"unusable ({why})")
