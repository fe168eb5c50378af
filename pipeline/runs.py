"""`runs`: the runs under `paths.outputs` side by side, like `dvc exp show --only-changed`:
the config keys whose values differ between runs, a split's headline metrics per variant,
the training time, and whether each run is up to date for its own recorded config."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import predict, train
from .config import Config, config_from_dict
from .errors import PipelineError
from .fsutil import read_json
from .stages import load_record

HEADLINE = ("miou", "j_mean", "boundary_f")
IGNORED_KEYS = {"run.name", "run.threads", "dask.scheduler", "extract.num_workers",
                "extract.batch_size", "predict.batch_size", "extract.device", "train.device",
                "predict.device"}  # do not change results, or name the row


@dataclass
class RunRow:
    run: str
    params: dict[str, Any] = field(default_factory=dict)  # only the keys that differ
    # variant -> headline metrics (None: missing from the report)
    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)
    n_images: int | None = None
    train_seconds: float | None = None
    up_to_date: bool | None = None  # None: unknown (no recorded config, or it cannot be checked)
    report: str | None = None  # the HTML report, relative to paths.outputs


def _flatten(doc: dict) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, table in doc.items() if isinstance(table, dict)
            for k, v in table.items()}


def run_dirs(outputs: Path) -> list[Path]:
    """Folders under `outputs` that hold a run (stage records or models)."""
    if not outputs.is_dir():
        return []
    return sorted(d for d in outputs.iterdir()
                  if d.is_dir() and ((d / "stages").is_dir() or (d / "models").is_dir()))


def _up_to_date(config: dict, split: str) -> bool | None:
    try:
        cfg = config_from_dict(config)
        return train.status(cfg).up_to_date and predict.status(cfg, split).up_to_date
    except (PipelineError, OSError):
        return None


def collect(cfg: Config, split: str) -> list[RunRow]:
    """One row per run, sorted by the PAC mIoU (best first; runs without a report last)."""
    outputs = Path(cfg.paths.outputs)
    rows, configs = [], []
    for d in run_dirs(outputs):
        report = read_json(d / f"report_{split}.json")
        report = report if isinstance(report, dict) else {}
        config = report.get("config") if isinstance(report.get("config"), dict) else None
        row = RunRow(d.name)
        for v, block in (report.get("variants") or {}).items():
            overall = block.get("overall") if isinstance(block, dict) else None
            if isinstance(overall, dict):
                row.metrics[v] = {k: overall.get(k) for k in HEADLINE}
        row.n_images = report.get("n_images")
        rec = load_record(d, train.STAGE)
        row.train_seconds = rec.get("seconds") if rec else None
        row.up_to_date = _up_to_date(config, split) if config else None
        if (d / f"report_{split}.html").is_file():
            row.report = f"{d.name}/report_{split}.html"
        rows.append(row)
        configs.append(_flatten(config) if config else {})
    keys = sorted({k for c in configs for k in c} - IGNORED_KEYS)
    differing = [k for k in keys if len({repr(c.get(k)) for c in configs if c}) > 1]
    for row, c in zip(rows, configs, strict=True):
        row.params = {k: c.get(k) for k in differing} if c else {}
    rows.sort(key=lambda r: (-(r.metrics.get("pac", {}).get("miou") or -1.0), r.run))
    return rows


def as_json(rows: list[RunRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def table(rows: list[RunRow]) -> str:
    """A Markdown table (readable in a terminal too)."""
    keys = sorted({k for r in rows for k in r.params})
    cols = (["run", *keys, "pac mIoU", "pac J", "pac F", "bilinear mIoU", "bilinear F", "images",
             "train s", "up to date"])

    def num(x: Any) -> str:
        return f"{x:.3f}" if isinstance(x, float) else ("-" if x is None else str(x))

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        pac, bil = r.metrics.get("pac", {}), r.metrics.get("linear_bilinear", {})
        cells = [r.run, *(num(r.params.get(k)) for k in keys),
                 num(pac.get("miou")), num(pac.get("j_mean")), num(pac.get("boundary_f")),
                 num(bil.get("miou")), num(bil.get("boundary_f")), num(r.n_images),
                 "-" if r.train_seconds is None else f"{r.train_seconds:.0f}",
                 {True: "yes", False: "no", None: "?"}[r.up_to_date]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
