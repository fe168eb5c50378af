"""Stage 3's human reports of a split: the Markdown and HTML reports beside
report_<split>.json (report.stage), whose worst images' masks are computed again."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..core.errors import StoreError
from ..core.layout import RunLayout
from ..report import stage as report_stage
from ..store import FeatureStore

if TYPE_CHECKING:
    from ..inference import Predictor


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
