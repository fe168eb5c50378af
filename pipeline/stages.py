"""Whether a stage is up to date, in the style of `dvc status`: one mechanism for all stages.

A stage declares its dependencies (the content fingerprints of the upstream outputs it reads:
a stored split, the trained models) and its parameters (its config keys, with derived values
such as a weights file's sha256). A stable fingerprint of both is recorded in
`<outputs>/<run>/stages/<stage>.json` once the stage's outputs are complete; the stage is
up to date while the fingerprint is unchanged and its outputs are intact, and the difference
to the record says why it is not.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fsutil import atomic_write_json, canonical_json, read_json


def fingerprint(obj: Any) -> str:
    """A stable short hash of JSON-able data."""
    return hashlib.sha256(canonical_json(obj)).hexdigest()[:16]


@dataclass
class StageState:
    """What a stage's result depends on now."""
    name: str
    deps: dict[str, str | None]  # upstream output fingerprints; None: absent or damaged
    params: dict[str, Any]
    outs_problem: str = ""  # why the stage's own outputs are not intact ("": they are)
    upstream: dict[str, str] = field(default_factory=dict)  # dep -> command that makes it

    @property
    def fingerprint(self) -> str:
        return fingerprint({"deps": self.deps, "params": self.params})

    def missing_deps(self) -> list[str]:
        return [k for k, v in self.deps.items() if v is None]


@dataclass
class StageStatus:
    stage: str
    state: str  # "up-to-date" | "stale" | "missing"
    why: str = ""

    @property
    def up_to_date(self) -> bool:
        return self.state == "up-to-date"

    def reason(self, force: bool = False) -> str:
        """Why the stage computes now, for its log line."""
        if force:
            return "computing (--force)"
        if self.state == "missing":
            return "computing (no earlier result)"
        return f"recomputing ({self.why})" if self.why else "recomputing"

    def line(self) -> str:
        tail = f" ({self.why})" if self.why else ""
        return f"{self.stage}: {self.state}{tail}"


def record_path(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / "stages" / f"{stage}.json"


def load_record(run_dir: Path, stage: str) -> dict | None:
    """The stage's record, or None when absent or damaged (a damaged one is no record)."""
    rec = read_json(record_path(run_dir, stage))
    if not (isinstance(rec, dict) and isinstance(rec.get("params"), dict)
            and isinstance(rec.get("deps", {}), dict) and isinstance(rec.get("fingerprint"), str)):
        return None
    return rec


def save_record(run_dir: Path, state: StageState, **extra: Any) -> None:
    """Record `state` as the stage's last completed run (after its outputs are complete)."""
    atomic_write_json(record_path(run_dir, state.name),
                      {"stage": state.name, "fingerprint": state.fingerprint,
                       "deps": state.deps, "params": state.params, **extra})


def _show(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


# Parameters left out of a fingerprint at one value, so that results made before the key
# existed stay current; their absence means that value (the one place that says which):
# backbone.layers at 1 (params.feature_params), the mirrored-store flag at False (ditto),
# predict.tta at "none" (params.tta_params). diff_params reads an absent key as its value.
ABSENT_AS: dict[str, Any] = {"backbone.layers": 1, "mirror": False, "predict.tta": "none"}

_NO_VALUE = object()  # an absent key without an ABSENT_AS value


def without_absent(params: dict[str, Any]) -> dict[str, Any]:
    """`params` less the keys at their ABSENT_AS value (how results recorded before a key
    existed stay current)."""
    return {k: v for k, v in params.items() if k not in ABSENT_AS or v != ABSENT_AS[k]}


def _value(params: dict[str, Any], key: str) -> Any:
    return params[key] if key in params else ABSENT_AS.get(key, _NO_VALUE)


def diff_params(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two parameter (or dependency) dicts, in key order.
    A key of ABSENT_AS that one side lacks has its absent-at value there, so a change from
    or to that value reads `key: old -> new`, not "is new" / "dropped"."""
    out = []
    for key in sorted(set(old) | set(new)):
        was, now = _value(old, key), _value(new, key)
        if was is _NO_VALUE:
            out.append(f"{key} is new")
        elif now is _NO_VALUE:
            out.append(f"{key} dropped")
        elif was != now:
            if key.startswith(("data[", "features[", "models")):
                out.append(f"{key} changed")
            else:
                out.append(f"{key}: {_show(was)} -> {_show(now)}")
    return out


def judge(run_dir: Path, state: StageState) -> StageStatus:
    """up-to-date / stale (why) / missing for `state` against the stage's record."""
    path = record_path(run_dir, state.name)
    rec = load_record(run_dir, state.name)
    absent = state.missing_deps()
    needs = "; ".join(f"needs {k}: run `{state.upstream[k]}`" if k in state.upstream
                      else f"{k} absent" for k in absent)
    if rec is None:
        if path.exists():
            return StageStatus(state.name, "stale",
                               "stage record unreadable" + (f"; {needs}" if needs else ""))
        return StageStatus(state.name, "missing")
    if absent or rec["fingerprint"] != state.fingerprint:
        present = {k: v for k, v in state.deps.items() if v is not None}
        old_deps = {k: v for k, v in rec.get("deps", {}).items() if k in present}
        changes = diff_params(rec["params"], state.params) + diff_params(old_deps, present)
        if needs:
            changes.append(needs)
        return StageStatus(state.name, "stale", "; ".join(changes) or "settings changed")
    if state.outs_problem:
        return StageStatus(state.name, "stale", state.outs_problem)
    return StageStatus(state.name, "up-to-date")
