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

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from . import predict, train
from .config import Config, config_from_dict, copy_config
from .errors import PipelineError
from .jsondoc import Damaged, read_doc
from .jsondoc import an_object as _object
from .jsondoc import field_of as _field
from .jsondoc import kind as _kind
from .jsondoc import show as _show
from .report import doc as report_doc
from .stages import record_path

HEADLINE = ("miou", "j_mean", "boundary_f")
IGNORED_KEYS = {"run.name", "run.threads", "dask.scheduler", "extract.num_workers",
                "extract.batch_size", "predict.batch_size", "extract.device", "train.device",
                "predict.device"}  # do not change results, or name the row
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
    metrics = {v: {k: m.values[k] for k in HEADLINE}
               for v, s in report.variants.items() if (m := s.overall) is not None}
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
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                or seconds < 0):
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
    from .workflow import recorded_problems  # above the stages; runs is listed by the CLI
    try:
        cfg = copy_config(report.config, paths__outputs=str(run_dir.parent),
                          run__name=run_dir.name)
        problems = recorded_problems(cfg, split)
    except (TypeError, KeyError, ValueError, AttributeError):  # a file of a foreign shape
        return None, f"cannot check: {run_dir / 'models'}: model card damaged"
    except PipelineError as e:
        return None, f"cannot check: {str(e)[:120]}"
    except OSError as e:
        return None, f"cannot check: {e.filename or run_dir}: {e.strerror or e}"
    return not problems, "; ".join(problems)


# ----------------------------------------------------------------------------- listing

def _flatten(doc: dict) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, table in doc.items() if isinstance(table, dict)
            for k, v in table.items()}


def run_dirs(outputs: Path) -> list[Path]:
    """Folders under `outputs` that hold a run (stage records or models)."""
    if not outputs.is_dir():
        return []
    return sorted(d for d in outputs.iterdir()
                  if d.is_dir() and ((d / "stages").is_dir() or (d / "models").is_dir()))


def read_run(run_dir: Path, split: str) -> tuple[RunRow, dict[str, Any]]:
    """The row of one run and its flattened recorded config ({} when there is none)."""
    row = RunRow(run_dir.name)
    damage: list[str] = []

    def load(path: Path, parse: Callable[[Any], T]) -> T | None:
        try:
            doc = read_doc(path)
            return None if doc is None else parse(doc)
        except Damaged as e:
            damage.append(f"{path}: {e}")
            return None

    report = load(run_dir / f"report_{split}.json", parse_report)
    trained = load(record_path(run_dir, train.STAGE), parse_record)
    load(record_path(run_dir, predict.stage_name(split)), parse_record)  # damaged: a row says so
    if report is not None:
        row.metrics = {v: dict(m) for v, m in report.metrics.items()}
        row.n_images = report.n_images
    if trained is not None:
        row.train_seconds = trained.seconds
    if (run_dir / f"report_{split}.html").is_file():
        row.report = f"{run_dir.name}/report_{split}.html"
    if damage:
        row.damaged = "; ".join(damage)
        row.why = "a damaged file"
    elif report is None:
        row.why = f"no report_{split}.json"
    else:
        row.up_to_date, row.why = judge_run(run_dir, split, report)
    return row, (_flatten(report.config.to_dict()) if report is not None else {})


def collect(cfg: Config, split: str) -> list[RunRow]:
    """One row per run, sorted by the PAC mIoU (best first; runs without one last)."""
    rows, configs = [], []
    for d in run_dirs(Path(cfg.paths.outputs)):
        row, config = read_run(d, split)
        rows.append(row)
        configs.append(config)
    keys = sorted({k for c in configs for k in c} - IGNORED_KEYS)
    differing = [k for k in keys if len({repr(c.get(k)) for c in configs if c}) > 1]
    for row, c in zip(rows, configs, strict=True):
        row.params = {k: c.get(k) for k in differing} if c else {}

    def best_first(r: RunRow) -> tuple[bool, float, str]:
        miou = r.metrics.get("pac", {}).get("miou")
        return miou is None, -(miou or 0.0), r.run
    rows.sort(key=best_first)
    return rows


def as_json(rows: list[RunRow]) -> list[dict]:
    """The rows as strict JSON data (json.dumps(..., allow_nan=False) accepts it)."""
    return [asdict(r) for r in rows]


def _cell(text: str) -> str:
    """`text` as one Markdown table cell: `|` escaped, control characters (and undecodable
    bytes) as backslash escapes, so that a name never adds or splits a column or a line."""
    out = []
    for c in text:
        if c == "|":
            out.append("\\|")
        elif c.isprintable():
            out.append(c)
        else:
            out.append(c.encode("unicode_escape", "backslashreplace").decode("ascii"))
    return "".join(out)


def _value(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:g}"
    return "-" if x is None else _cell(x if isinstance(x, str) else json.dumps(x))


def table(rows: list[RunRow]) -> str:
    """A Markdown table (readable in a terminal too)."""
    keys = sorted({k for r in rows for k in r.params})
    cols = (["run", *keys, "pac mIoU", "pac J", "pac F", "bilinear mIoU", "bilinear F", "images",
             "train s", "up to date"])

    def num(x: float | int | None) -> str:
        return f"{x:.3f}" if isinstance(x, float) else ("-" if x is None else str(x))

    lines = ["| " + " | ".join(_cell(c) for c in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        pac, bil = r.metrics.get("pac", {}), r.metrics.get("linear_bilinear", {})
        state = ({True: "yes", False: "no", None: "?"}[r.up_to_date] if r.damaged is None
                 else f"damaged: {r.damaged}")
        cells = [_cell(r.run), *(_value(r.params.get(k)) for k in keys),
                 num(pac.get("miou")), num(pac.get("j_mean")), num(pac.get("boundary_f")),
                 num(bil.get("miou")), num(bil.get("boundary_f")), num(r.n_images),
                 "-" if r.train_seconds is None else f"{r.train_seconds:.0f}", _cell(state)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
