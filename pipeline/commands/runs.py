"""`runs`: the runs under `paths.outputs` side by side, like `dvc exp show --only-changed`:
the config keys whose values differ between runs, a split's headline metrics per variant,
the training time, and whether each run is up to date for its own recorded config.

Every file is parsed once, where it is read, into a typed result (ParsedReport, ParsedRecord)
that holds only finite numbers: a file that is not what its writer writes (not valid JSON,
NaN / Infinity / 1e999, a wrong type, a metric out of [0, 1], a missing field) makes its run
a row that says `damaged: <file>: <why>`; the other runs are listed as usual.

Up to date is judged from the run folder as listed, by content fingerprints, never through
a path: the run's stage records against its recorded config's settings, the predict
record against the models in the folder and the outputs it lists (masks, reports: sha256 of
paths relative to the run folder). The inputs the run read from outside its folder
(the stored features in the cache, a local weights file) are taken as the records hold them
(`status` checks those, with the paths of the current config). So a run folder that was
copied or moved, or listed from another working folder, gets the same answer as in place.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from ..core.config import Config, all_keys, config_from_dict, copy_config, parse_set
from ..core.errors import ConfigError, PipelineError, UsageError
from ..core.jsondoc import Damaged, read_doc
from ..core.jsondoc import an_object as _object
from ..core.jsondoc import field_of as _field
from ..core.jsondoc import kind as _kind
from ..core.jsondoc import show as _show
from ..core.layout import RunLayout, run_dirs
from ..metrics.definitions import HEADLINE
from ..report import doc as report_doc
from ..stages import predict, train
from ..stages.base import record_path
from .runs_table import as_json, grid, markdown, short_paths, table

__all__ = ["RunRow", "as_json", "collect", "grid", "markdown", "short_paths", "table"]

IGNORED_KEYS = {
    "run.name",
    "run.threads",
    "dask.scheduler",
    "extract.num_workers",
    "extract.batch_size",
    "predict.batch_size",
    "extract.device",
    "train.device",
    "predict.device",
}  # do not change results, or name the row
T = TypeVar("T")


@dataclass
class RunRow:
    """One run as `runs` lists it (the --json row); every number is finite."""

    run: str
    params: dict[str, Any] = field(default_factory=dict)  # only the keys that differ
    # variant -> headline metrics (a variant without scored images is left out)
    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)
    n_images: int | None = None
    train_seconds: float | None = None
    up_to_date: bool | None = None  # None: unknown (no report, or a damaged file)
    report: str | None = None  # the HTML report, relative to paths.outputs
    why: str = ""  # why the run is not up to date, or why that is unknown
    damaged: str | None = None  # the damaged file(s) and why; None: every file read is sound
    split: str = ""  # the split whose report the metrics are from


@dataclass(frozen=True)
class ParsedReport:
    """What `runs` reads of report_<split>.json, validated."""

    n_images: int
    metrics: dict[str, dict[str, float]]  # variant -> HEADLINE metric -> value in [0, 1]
    config: Config  # the recorded effective config


@dataclass(frozen=True)
class ParsedRecord:
    """A stage record (stages/<stage>.json), validated."""

    fingerprint: str
    params: dict[str, Any]
    deps: dict[str, str | None]
    seconds: float | None  # train-head's training time (None: a record made before it was kept)
    # predict's outputs: path relative to the run folder -> sha256 (None: an earlier record)
    outs: dict[str, str] | None = None


# ----------------------------------------------------------------------------- reading


def parse_report(doc: Any) -> ParsedReport:
    """What `runs` reads of a report (report.doc's strict parse): Damaged naming the first
    bad field."""
    report = report_doc.parse_report(doc, required=predict.VARIANTS)
    metrics = {
        v: {h.key: m.values[h.key] for h in HEADLINE}
        for v, s in report.variants.items()
        if (m := s.overall) is not None
    }
    assert report.n_images is not None and report.config is not None  # required: strict
    try:
        cfg = config_from_dict(report.config, " in config")
    except PipelineError as e:
        raise Damaged(str(e)) from None
    except (TypeError, ValueError, AttributeError) as e:  # a shape the validator never met
        raise Damaged(f"config: {type(e).__name__}: {str(e)[:80]}") from None
    return ParsedReport(report.n_images, metrics, cfg)


def parse_record(doc: Any) -> ParsedRecord:
    """A stage record, validated; Damaged naming the first bad field."""
    doc = _object(doc, "")
    fp = _field(doc, "fingerprint", "")
    if not isinstance(fp, str):
        raise Damaged(f"fingerprint is {_kind(fp)}, not a string")
    params = _object(_field(doc, "params", ""), "params")
    deps = _object(doc.get("deps", {}), "deps")
    for k, v in deps.items():
        if v is not None and not isinstance(v, str):
            raise Damaged(f"deps.{k} is {_kind(v)}, not a fingerprint")
    seconds = doc.get("seconds")
    if seconds is not None and (
        isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0
    ):
        raise Damaged(f"seconds is {_kind(seconds)}, not a duration")
    outs = doc.get("outs")
    if outs is not None:
        outs = _object(outs, "outs")
        for rel, digest in outs.items():
            parts = PurePosixPath(rel).parts
            if not parts or rel.startswith("/") or ".." in parts or any(c in rel for c in "\\\0"):
                raise Damaged(f"outs: {_show(rel)} is not a path inside the run folder")
            if not isinstance(digest, str):
                raise Damaged(f"outs.{rel} is {_kind(digest)}, not a sha256")
    return ParsedRecord(fp, params, deps, None if seconds is None else float(seconds), outs)


# ----------------------------------------------------------------------------- judging


def judge_run(run_dir: Path, split: str, report: ParsedReport) -> tuple[bool | None, str]:
    """(up to date, why not) of the run in `run_dir` for its recorded config, judged by the
    stage list on what the folder holds (workflow.recorded_problems); (None, why) when it
    cannot be checked."""
    from ..stages.workflow import recorded_problems  # the stage list; runs is listed by the CLI

    try:
        cfg = copy_config(report.config, paths__outputs=str(run_dir.parent), run__name=run_dir.name)
        problems = recorded_problems(cfg, split)
    except (TypeError, KeyError, ValueError, AttributeError):  # a file of a foreign shape
        return None, f"cannot check: {RunLayout(run_dir).models}: model card damaged"
    except PipelineError as e:
        return None, f"cannot check: {str(e)[:120]}"
    except OSError as e:
        return None, f"cannot check: {e.filename or run_dir}: {e.strerror or e}"
    return not problems, "; ".join(problems)


# ----------------------------------------------------------------------------- listing


def _flatten(doc: dict) -> dict[str, Any]:
    return {
        f"{s}.{k}": v
        for s, table in doc.items()
        if isinstance(table, dict)
        for k, v in table.items()
    }


def read_run(run_dir: Path, split: str) -> tuple[RunRow, dict[str, Any]]:
    """The row of one run and its flattened recorded config ({} when there is none)."""
    row = RunRow(run_dir.name, split=split)
    damage: list[str] = []

    def load(path: Path, parse: Callable[[Any], T]) -> T | None:
        try:
            doc = read_doc(path)
            return None if doc is None else parse(doc)
        except Damaged as e:
            damage.append(f"{path}: {e}")
            return None

    run = RunLayout(run_dir)
    report = load(run.report(split), parse_report)
    trained = load(record_path(run_dir, train.STAGE), parse_record)
    load(record_path(run_dir, predict.stage_name(split)), parse_record)  # damaged: a row says so
    if report is not None:
        row.metrics = {v: dict(m) for v, m in report.metrics.items()}
        row.n_images = report.n_images
    if trained is not None:
        row.train_seconds = trained.seconds
    if run.report(split, ".html").is_file():
        row.report = f"{run_dir.name}/{run.report(split, '.html').name}"
    if damage:
        row.damaged = "; ".join(damage)
        row.why = "a damaged file"
    elif report is None:
        row.why = f"no {run.report(split).name}"
    else:
        row.up_to_date, row.why = judge_run(run_dir, split, report)
    return row, (_flatten(report.config.to_dict()) if report is not None else {})


def run_split(run_dir: Path, default: str) -> str:
    """The split a run is listed with by default: its recorded config's data.test_split (the
    run's config.toml, or for an older run its report's config), else `default`."""
    from ..runconfig import read_record

    try:
        recorded, _ = read_record(run_dir, (default,))
    except (PipelineError, OSError):
        return default
    return recorded.data.test_split


def parse_filters(items: Sequence[str]) -> list[tuple[str, Any]]:
    """`--filter KEY=VALUE` items: a config key (or `run`, the run's folder name) and a value,
    a TOML literal or a string (with shell wildcards: `run=lr*`). UsageError naming an unknown
    key or an item without `=`."""
    out = []
    for item in items:
        try:
            key, value = parse_set(item)
        except ConfigError:
            raise UsageError(f"bad --filter {item!r}: expected KEY=VALUE") from None
        check_keys([key], "--filter", extra=("run",))
        out.append((key, value))
    return out


def check_keys(keys: Sequence[str], option: str, extra: Sequence[str] = ()) -> list[str]:
    """`keys`, each a config key (or one of `extra`); UsageError naming the first that is not."""
    known = set(all_keys()) | set(extra)
    for k in keys:
        if k not in known:
            raise UsageError(f"{option} {k}: not a config key{_did_you_mean(k, known)}")
    return list(keys)


def _did_you_mean(word: str, known: set[str]) -> str:
    """` (did you mean X?)` naming the closest of `known` to `word`, or "" when none is close."""
    import difflib

    return "".join(
        f" (did you mean {c}?)" for c in difflib.get_close_matches(word, sorted(known), n=1)
    )


def _matches(value: Any, wanted: Any) -> bool:
    """Whether a recorded value is what a --filter asks for: equal (1 == 1.0), or its text
    matching the wanted text, which may hold shell wildcards (* ? [...])."""
    if (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and isinstance(wanted, (int, float))
        and not isinstance(wanted, bool)
    ):
        return float(value) == float(wanted)
    if value == wanted:
        return True
    text = value if isinstance(value, str) else json.dumps(value)
    pattern = wanted if isinstance(wanted, str) else json.dumps(wanted)
    return fnmatch.fnmatchcase(text, pattern)


def collect(
    outputs: Path,
    default_split: str,
    split: str | None = None,
    filters: Sequence[tuple[str, Any]] = (),
    keys: Sequence[str] | None = None,
) -> list[RunRow]:
    """One row per run, sorted by the PAC mIoU (best first; runs without one last). `split`:
    the split of every row; None: each run's own (run_split: its recorded data.test_split,
    `default_split` where none is recorded).
    `filters` (parse_filters): only the runs whose recorded config (or name, for `run`) has
    every value asked for. `keys`: the config keys each row's params hold (any, even equal
    across runs); None: those whose values differ between the rows listed."""
    rows, configs = [], []
    for d in run_dirs(outputs):
        row, config = read_run(d, split or run_split(d, default_split))
        if all(_matches(row.run if k == "run" else config.get(k), v) for k, v in filters):
            rows.append(row)
            configs.append(config)
    if keys is None:
        found = sorted({k for c in configs for k in c} - IGNORED_KEYS)
        keys = [k for k in found if len({repr(c.get(k)) for c in configs if c}) > 1]
    for row, c in zip(rows, configs, strict=True):
        row.params = {k: c.get(k) for k in keys} if c else {}

    def best_first(r: RunRow) -> tuple[bool, float, str]:
        miou = r.metrics.get("pac", {}).get("miou")
        return miou is None, -(miou or 0.0), r.run

    rows.sort(key=best_first)
    return rows
