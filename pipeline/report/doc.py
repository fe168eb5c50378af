"""The one parser of ``report_<split>.json`` (read strictly by ``jsondoc.read_doc``): the
report validated once, where it is read, into a typed ``Report`` that holds only sound values,
so that nothing past this module checks a type.

Two callers, one parser: `runs` reads a report from disk with ``strict=True`` (a field that
is not what stage 3 writes is ``Damaged``, naming the field); the report writer takes the
report it is given (stage 3's own, or a hand-made one) with ``strict=False``, where such a
field is left out instead (shown as a dash) and nothing is required.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..core.jsondoc import Damaged, a_list, an_object, count, field_of, finite, kind, metric
from ..core.jsondoc import text as _text
from ..metrics.definitions import HEADLINE, KEYS

REQUIRED = tuple(m.key for m in HEADLINE)  # the metrics strict reading requires
T = TypeVar("T")


# ----------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class Metrics:
    """One METRICS block: the metrics present, each in [0, 1], and its image count."""

    values: dict[str, float]
    n_images: int | None = None

    def get(self, key: str) -> float | None:
        return self.values.get(key)


@dataclass(frozen=True)
class VariantScores:
    overall: Metrics | None  # None: no annotated image
    per_category: dict[str, Metrics] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageScores:
    """One row of ``per_image``: J and F per variant (the sound ones)."""

    category: str
    stem: str
    j: dict[str, float]
    f: dict[str, float]


@dataclass(frozen=True)
class SweepPoint:
    """One threshold of ``threshold_sweep``: J mean, precision and recall at it."""

    threshold: float
    j_mean: float
    precision: float
    recall: float


@dataclass(frozen=True)
class DavisScores:
    """One variant's ``davis`` block (the DAVIS protocol, metrics.davis): J and F each
    {"mean", "recall", "decay"} over sequences (the sound ones), J&F, how many sequences,
    which frames. None: absent (or null: no sequence had a frame to evaluate)."""

    j: dict[str, float]
    f: dict[str, float]
    jf: float | None = None
    n_sequences: int | None = None
    frames: str | None = None


@dataclass(frozen=True)
class Report:
    """report_<split>.json, validated. Every number is finite; None: absent (or, read
    leniently, unusable)."""

    split: str | None = None
    n_images: int | None = None
    n_predicted: int | None = None
    backbone: str | None = None
    weights: str | None = None
    run: str | None = None
    variants: dict[str, VariantScores] = field(default_factory=dict)  # in the file's order
    per_image: list[ImageScores] = field(default_factory=list)
    config: dict[str, dict[str, Any]] | None = None  # the effective config, as recorded
    fingerprints: dict[str, str | None] = field(default_factory=dict)
    versions: dict[str, str | None] = field(default_factory=dict)
    # variant -> the sweep's points in threshold order ({}: a report made before the sweep)
    threshold_sweep: dict[str, list[SweepPoint]] = field(default_factory=dict)
    # the values used where the config says "auto" or 0, e.g. {"backbone.layers": 2}
    resolved: dict[str, Any] = field(default_factory=dict)
    # variant -> the DAVIS protocol's aggregate ({}: a report made before it)
    davis: dict[str, DavisScores] = field(default_factory=dict)
    # variant -> the threshold its masks were cut at ({}: a report made before the field)
    thresholds: dict[str, float] = field(default_factory=dict)
    threshold_split: str | None = None  # the validation split that chose them ("auto")


class _Reader:
    """Field by field: strict raises Damaged at the first unsound field; lenient leaves it out."""

    def __init__(self, strict: bool):
        self.strict = strict

    def get(
        self, check: Callable[[Any, str], T], value: Any, where: str, default: Any = None
    ) -> Any:
        try:
            return check(value, where)
        except Damaged:
            if self.strict:
                raise
            return default

    def optional(
        self,
        doc: dict[str, Any],
        key: str,
        check: Callable[[Any, str], T],
        where: str = "",
        default: Any = None,
        required: bool = False,
    ) -> Any:
        if key not in doc:
            if required and self.strict:
                raise Damaged(f"{where}{key} missing")
            return default
        return self.get(check, doc[key], f"{where}{key}", default)

    def metrics(self, value: Any, where: str, required: Sequence[str] = ()) -> Metrics:
        block = an_object(value, where)
        values = {}
        for k in KEYS:
            if k in block:
                m = self.get(metric, block[k], f"{where}.{k}")
                if m is not None:
                    values[k] = m
            elif k in required:
                raise Damaged(f"{where}.{k} missing")
        return Metrics(values, self.optional(block, "n_images", count, f"{where}."))

    def variant(self, value: Any, where: str) -> VariantScores:
        block = an_object(value, where)
        overall = None
        if "overall" not in block and self.strict:
            raise Damaged(f"{where}.overall missing")
        if block.get("overall") is not None:
            required = REQUIRED if self.strict else ()
            overall = self.get(
                lambda v, w: self.metrics(v, w, required), block["overall"], f"{where}.overall"
            )
        cats = self.optional(block, "per_category", an_object, f"{where}.", {})
        per_category = {}
        for c, m in cats.items():
            parsed = self.get(self.metrics, m, f"{where}.per_category.{c}")
            if parsed is not None:
                per_category[c] = parsed
        return VariantScores(overall, per_category)

    def scores(self, value: Any, where: str) -> dict[str, float]:
        out = {}
        for v, x in an_object(value, where).items():
            m = self.get(metric, x, f"{where}.{v}")
            if m is not None:
                out[v] = m
        return out

    def image(self, value: Any, where: str) -> ImageScores:
        row = an_object(value, where)
        name = _text if self.strict else _any_text
        return ImageScores(
            self.optional(row, "category", name, f"{where}.", "", True),
            self.optional(row, "stem", name, f"{where}.", "", True),
            self.optional(row, "j", self.scores, f"{where}.", {}),
            self.optional(row, "f", self.scores, f"{where}.", {}),
        )

    def config(self, value: Any, where: str) -> dict[str, dict[str, Any]]:
        """The recorded config: its tables (values as recorded; `runs` validates them)."""
        return {
            k: t
            for k, v in an_object(value, where).items()
            if (t := self.get(an_object, v, f"{where}.{k}")) is not None
        }

    def texts(self, value: Any, where: str) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for k, v in an_object(value, where).items():
            out[k] = (
                None
                if v is None
                else self.get(_text if self.strict else _any_text, v, f"{where}.{k}")
            )
        return out

    def sweep(self, value: Any, where: str) -> dict[str, list[SweepPoint]]:
        out = {}
        for v, pts in an_object(value, where).items():
            points = []
            for i, p in enumerate(self.get(a_list, pts, f"{where}.{v}", [])):
                w = f"{where}.{v}[{i}]"
                point = self.get(
                    lambda x, w: SweepPoint(
                        *(
                            metric(field_of(an_object(x, w), k, f"{w}."), f"{w}.{k}")
                            for k in ("threshold", "j_mean", "precision", "recall")
                        )
                    ),
                    p,
                    w,
                )
                if point is not None:
                    points.append(point)
            out[v] = sorted(points, key=lambda p: p.threshold)
        return out

    def davis_stats(self, value: Any, where: str) -> dict[str, float]:
        """{"mean", "recall", "decay"}: null (no sequence) is left out; decay in [-1, 1]."""
        block = an_object(value, where)
        out = {}
        for k, check in (("mean", metric), ("recall", metric), ("decay", _decay)):
            if block.get(k) is not None:
                x = self.optional(block, k, check, f"{where}.")
                if x is not None:
                    out[k] = x
        return out

    def davis(self, value: Any, where: str) -> dict[str, DavisScores]:
        out = {}
        for v, b in an_object(value, where).items():
            w = f"{where}.{v}"
            block = self.get(an_object, b, w)
            if block is None:
                continue
            jf = block.get("J&F")
            out[v] = DavisScores(
                j=self.optional(block, "J", self.davis_stats, f"{w}.", {}),
                f=self.optional(block, "F", self.davis_stats, f"{w}.", {}),
                jf=None if jf is None else self.optional(block, "J&F", metric, f"{w}."),
                n_sequences=self.optional(block, "n_sequences", count, f"{w}."),
                frames=self.optional(block, "frames", _text if self.strict else _any_text, f"{w}."),
            )
        return out

    def calibration(self, value: Any, where: str) -> tuple[dict[str, float], str | None]:
        """``calibration``: the thresholds per variant (each in (0, 1)) and the split that
        chose them (null: configured)."""
        block = an_object(value, where)
        found = self.optional(block, "thresholds", an_object, f"{where}.", {})
        out = {}
        for v, t in found.items():
            x = self.get(metric, t, f"{where}.thresholds.{v}")
            if x is not None:
                out[v] = x
        split = block.get("split")
        if split is not None:
            split = self.optional(block, "split", _text if self.strict else _any_text, f"{where}.")
        return out, split

    def resolved(self, value: Any, where: str) -> dict[str, Any]:
        return {
            k: v
            for k, v in an_object(value, where).items()
            if isinstance(v, (str, int, float))
            and not isinstance(v, bool)
            and (isinstance(v, str) or finite(v))
        }


def _decay(value: Any, where: str) -> float:
    """A DAVIS decay: a difference of two means in [0, 1], so a finite number in [-1, 1]."""
    if not finite(value) or not -1 <= value <= 1:
        raise Damaged(f"{where} is {kind(value)}, not a number in [-1, 1]")
    return float(value)


def _any_text(value: Any, where: str) -> str:
    """Read leniently, a scalar stands for its text (a hand-made report)."""
    if isinstance(value, (dict, list)):
        raise Damaged(f"{where} is {kind(value)}, not a string")
    return str(value)


def _run_text(value: Any, where: str) -> str:
    if isinstance(value, dict):  # reports of early versions: {key: value}
        return ", ".join(f"{k}: {v}" for k, v in value.items())
    return _any_text(value, where)


def _variants(r: _Reader, variants_doc: dict, required: Sequence[str]) -> dict[str, Any]:
    """The report's variants, those in `required` first (strict: each must be present)."""
    rest = set(variants_doc) - set(required)
    names = (*required, *(sorted(rest) if r.strict else [v for v in variants_doc if v in rest]))
    variants = {}
    for v in names:
        if v not in variants_doc:
            if r.strict:
                field_of(variants_doc, v, "variants.")
            continue
        parsed = r.get(r.variant, variants_doc[v], f"variants.{v}")
        if parsed is not None:
            variants[v] = parsed
    return variants


def _backbone(r: _Reader, bb: Any) -> tuple[str | None, str | None]:
    """The report's (backbone name, weights): a {"name", "weights"} object or, as written
    before, the name alone."""
    text = _text if r.strict else _any_text
    if isinstance(bb, dict):
        name = r.optional(bb, "name", text, "backbone.")
        weights = (
            None if bb.get("weights") is None else r.optional(bb, "weights", text, "backbone.")
        )
        return name, weights
    return (None if bb is None else r.get(text, bb, "backbone")), None


def parse_report(doc: Any, *, strict: bool = True, required: Sequence[str] = ()) -> Report:
    """The report `doc` (parsed JSON, or the dict stage 3 builds) as a typed Report.

    strict: Damaged naming the first field that is not what stage 3 writes; n_images, the
    variants (at least those in `required`), their overall headline metrics (or null) and the
    config must be present. Lenient (strict=False): a missing or unusable field is left out.
    """
    r = _Reader(strict)
    doc = an_object(doc, "") if strict else (doc if isinstance(doc, dict) else {})
    n_images = r.optional(doc, "n_images", count, required=True)
    variants_doc = r.optional(doc, "variants", an_object, default={}, required=True)
    variants = _variants(r, variants_doc, required)
    config = r.optional(doc, "config", r.config, required=True)
    backbone, weights = _backbone(r, doc.get("backbone"))
    rows = r.optional(doc, "per_image", lambda v, w: a_list(v, w), default=[])
    per_image = [
        x for i, row in enumerate(rows) if (x := r.get(r.image, row, f"per_image[{i}]")) is not None
    ]
    chosen, chosen_on = r.optional(doc, "calibration", r.calibration, default=({}, None))
    return Report(
        split=r.optional(doc, "split", _text if strict else _any_text),
        n_images=n_images,
        n_predicted=r.optional(doc, "n_predicted", count),
        backbone=backbone,
        weights=weights,
        run=r.optional(doc, "run", _text if strict else _run_text),
        variants=variants,
        per_image=per_image,
        config=config,
        fingerprints=r.optional(doc, "fingerprints", r.texts, default={}),
        versions=r.optional(doc, "versions", r.texts, default={}),
        threshold_sweep=r.optional(doc, "threshold_sweep", r.sweep, default={}),
        resolved=r.optional(doc, "resolved", r.resolved, default={}),
        davis=r.optional(doc, "davis", r.davis, default={}),
        thresholds=chosen,
        threshold_split=chosen_on,
    )


def parse_per_image(rows: Any) -> list[ImageScores]:
    """Per-image rows given apart from a report, read leniently (the sound rows and values)."""
    r = _Reader(strict=False)
    return [
        x
        for i, row in enumerate(rows if isinstance(rows, list) else [])
        if (x := r.get(r.image, row, f"per_image[{i}]")) is not None
    ]
