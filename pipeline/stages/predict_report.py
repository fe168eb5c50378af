"""Stage 3's reports of a split: report_<split>.json from the units' rows, and the Markdown
and HTML reports beside it (report.stage), whose worst images' masks are computed again."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..core.errors import StoreError
from ..core.layout import RunLayout
from ..core.variants import VARIANTS
from ..report import stage as report_stage
from ..store import FeatureStore

if TYPE_CHECKING:
    from ..inference import Predictor


def build_report(
    config: dict[str, dict[str, Any]],
    split: str,
    rows: list[dict],
    fingerprints: dict[str, str],
    sweep: Sequence[float] = (),
    resolved: dict | None = None,
) -> dict:
    """report_<split>.json's content from the units' rows (see report.stage.build_report);
    `config`: the config as the report records it."""
    return report_stage.build_report(config, split, rows, fingerprints, VARIANTS, sweep, resolved)


def write_human_reports(
    run: RunLayout,
    thumbnails: int,
    report: dict,
    rows: list[dict],
    store: FeatureStore,
    predictor: Predictor,
    mirror: FeatureStore | None,
) -> None:
    """The Markdown and HTML reports of `store`'s split (report.stage.write_human_reports,
    `thumbnails` best and worst images); the worst images' masks of every variant computed
    again by `predictor`, as the pass computed them."""

    def shown(row: dict) -> report_stage.Shown:
        item = store.read(row["index"])
        if item.mask is None:  # scored from this very store (its fingerprint is in the units')
            raise StoreError(
                f"{store.split_dir}: {item.meta.source} is scored but has no "
                "annotation; rerun predict with --force"
            )
        mirrored = None if mirror is None else [mirror.features(item.meta.index)]
        return report_stage.Shown(
            item.image, item.mask, lambda: predictor.batch_masks([item], mirrored)[0]
        )

    report_stage.write_human_reports(run, store.split, report, rows, thumbnails, shown)
