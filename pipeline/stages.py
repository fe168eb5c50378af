"""Stage bookkeeping in the style of `dvc status`: each stage declares the parameters that
determine its result (config keys and input digests), a stable fingerprint of them decides
"up to date", and the difference to the last completed run's record says why a stage is stale.

Records live in `<outputs>/<run>/stages/<stage>.json` and are written atomically after the
stage's outputs are complete.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cache import atomic_write_json, read_json
from .config import Config


def fingerprint(params: dict[str, Any]) -> str:
    """A stable short hash of a flat parameter dict."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def record_path(cfg: Config, stage: str) -> Path:
    return cfg.run_dir / "stages" / f"{stage}.json"


def load_record(cfg: Config, stage: str) -> dict | None:
    return read_json(record_path(cfg, stage))


def save_record(cfg: Config, stage: str, params: dict[str, Any], **extra: Any) -> None:
    atomic_write_json(record_path(cfg, stage),
                      {"stage": stage, "fingerprint": fingerprint(params), "params": params, **extra})


def _show(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


def diff_params(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two parameter dicts, in key order."""
    out = []
    for key in sorted(set(old) | set(new)):
        if key not in old:
            out.append(f"{key} is new")
        elif key not in new:
            out.append(f"{key} dropped")
        elif old[key] != new[key]:
            if key.startswith(("data[", "cache[", "model")):
                out.append(f"{key} changed")
            else:
                out.append(f"{key}: {_show(old[key])} -> {_show(new[key])}")
    return out


@dataclass
class StageStatus:
    stage: str
    state: str  # "up-to-date" | "stale" | "missing"
    why: str = ""

    def line(self) -> str:
        tail = f" ({self.why})" if self.why else ""
        return f"{self.stage}: {self.state}{tail}"


def judge(cfg: Config, stage: str, params: dict[str, Any], outputs_ok: bool,
          missing_why: str = "") -> StageStatus:
    """Compare current `params` with the stage's record; `outputs_ok` says whether its
    outputs are still on disk."""
    rec = load_record(cfg, stage)
    if rec is None:
        return StageStatus(stage, "missing", missing_why)
    changes = diff_params(rec.get("params", {}), params)
    if changes:
        return StageStatus(stage, "stale", "; ".join(changes))
    if not outputs_ok:
        return StageStatus(stage, "stale", "outputs missing or incomplete")
    return StageStatus(stage, "up-to-date")
