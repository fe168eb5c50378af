"""Whether a stage is up to date, in the style of `dvc status`: one mechanism for all stages,
and one template that runs every recording stage (`reproduce`, DVC's Stage.reproduce).

A stage declares its dependencies (the content fingerprints of the upstream outputs it reads:
a stored split, the trained models) and its parameters (its config keys, with derived values
such as a weights file's sha256). A stable fingerprint of both is recorded in
`<outputs>/<run>/stages/<stage>.json` once the stage's outputs are complete; the stage is
up to date while the fingerprint is unchanged and its outputs are intact, and the difference
to the record says why it is not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ..core.fingerprints import diff_params, fingerprint
from ..core.fsutil import atomic_write_json, exclusive_lock, read_json
from ..core.layout import RunLayout
from ..core.owned import claim_run_dir
from ..store import register_run

if TYPE_CHECKING:
    from ..core.config import Config


@dataclass
class StageState:
    """What a stage's result depends on now."""

    name: str
    deps: dict[str, str | None]  # upstream output fingerprints; None: absent or damaged
    params: dict[str, Any]
    outs_problem: str = ""  # why the stage's own outputs are not intact ("": they are)
    upstream: dict[str, str] = field(default_factory=dict)  # dep -> command that makes it
    unusable: dict[str, str] = field(default_factory=dict)  # absent dep -> why ("": absent)

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


@dataclass(frozen=True)
class Context:
    """What a stage is judged or run for: the config (its run_dir is the run folder judged:
    `runs` points it at each folder it lists), the split predicted, how deeply to check."""

    cfg: Config
    split: str
    verify: bool = False  # rehash inputs and outputs, ignoring the stat memo
    recorded: bool = False  # upstream deps as the run folder recorded them, nothing outside
    # the run folder read or written (`runs`)

    @classmethod
    def of(cls, cfg: Config, split: str | None = None, verify: bool = False) -> Context:
        return cls(cfg, split or cfg.data.test_split, verify)


class Outcome(Protocol):
    """What a stage's run did, as its command reports it."""

    @property
    def ok(self) -> bool:
        """False: the stage finished but some inputs could not be used (exit 1)."""
        ...

    def lines(self) -> list[tuple[str, bool]]:
        """The summary lines, each with whether it goes to stderr."""
        ...


class Stage(Protocol):
    """One stage as data (DVC's Stage(deps, params, outs)): its state now, judged against
    its record, and how to bring it up to date. The ordered list is `workflow.STAGES`."""

    @property
    def in_run(self) -> bool:
        """Whether its record lives in the run folder (stage 1's lives with the store)."""
        ...

    def name(self, split: str, /) -> str: ...

    def state(self, ctx: Context) -> StageState:
        """Deps, params and outs now (deps as recorded when ctx.recorded)."""
        ...

    def status(self, ctx: Context) -> StageStatus:
        """up-to-date / stale (why) / missing: judge() of state() against the record."""
        ...

    def run(self, ctx: Context, force: bool) -> Outcome:
        """Bring the stage up to date (everything with `force`)."""
        ...


def record_path(run_dir: Path, stage: str) -> Path:
    return RunLayout(Path(run_dir)).record(stage)


def load_record(run_dir: Path, stage: str) -> dict | None:
    """The stage's record, or None when absent or damaged (a damaged one is no record)."""
    rec = read_json(record_path(run_dir, stage))
    if not (
        isinstance(rec, dict)
        and isinstance(rec.get("params"), dict)
        and isinstance(rec.get("deps", {}), dict)
        and isinstance(rec.get("fingerprint"), str)
    ):
        return None
    return rec


def as_record(state: StageState, **extra: Any) -> dict[str, Any]:
    """The record of a completed run in `state` (`extra`: fields of the stage's own)."""
    return {
        "stage": state.name,
        "fingerprint": state.fingerprint,
        "deps": state.deps,
        "params": state.params,
        **extra,
    }


def save_record(run_dir: Path, state: StageState, **extra: Any) -> None:
    """Record `state` as the stage's last completed run (after its outputs are complete)."""
    atomic_write_json(record_path(run_dir, state.name), as_record(state, **extra))


def _needs(state: StageState, key: str) -> str:
    why = state.unusable.get(key, "")
    if why:
        return (
            f"waits for `{state.upstream[key]}`: {key} {why}"
            if key in state.upstream
            else f"{key} {why}"
        )
    if key in state.upstream:
        return f"needs {key}: run `{state.upstream[key]}`"
    return f"{key} absent"


def judge(run_dir: Path, state: StageState) -> StageStatus:
    """up-to-date / stale (why) / missing for `state` against the stage's record in
    `run_dir`."""
    return judge_record(
        load_record(run_dir, state.name), state, record_path(run_dir, state.name).exists()
    )


def judge_record(rec: dict | None, state: StageState, damaged: bool = False) -> StageStatus:
    """up-to-date / stale (why) / missing for `state` against the record `rec` (None: no
    record; `damaged`: one exists but cannot be read). The one place that decides."""
    absent = state.missing_deps()
    needs = "; ".join(_needs(state, k) for k in absent)
    if rec is None:
        if damaged:
            return StageStatus(
                state.name, "stale", "stage record unreadable" + (f"; {needs}" if needs else "")
            )
        if any(state.unusable.get(k) for k in absent):
            return StageStatus(state.name, "stale", needs)
        return StageStatus(state.name, "missing")
    if absent or rec["fingerprint"] != state.fingerprint:
        present = {k: v for k, v in state.deps.items() if v is not None}
        old_deps = {k: v for k, v in rec.get("deps", {}).items() if k in present}
        changes = diff_params(rec["params"], state.params) + diff_params(old_deps, present)
        if needs:  # what the stage waits for first, then what changed
            changes = (
                [needs, *changes]
                if any(state.unusable.get(k) for k in absent)
                else [*changes, needs]
            )
        return StageStatus(state.name, "stale", "; ".join(changes) or "settings changed")
    if state.outs_problem:
        return StageStatus(state.name, "stale", state.outs_problem)
    return StageStatus(state.name, "up-to-date")


# ----------------------------------------------------------------------------- the run template


@dataclass(frozen=True)
class Lock:
    """A flock a recording run declares (`<folder>/.locks/<name>.lock`, RunLayout.lock) and
    `reproduce` holds; `what` names the locked thing in the LockError."""

    path: Path
    what: str

    def held(self) -> AbstractContextManager[None]:
        return exclusive_lock(self.path, self.what)


R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class Recording(Protocol[R_co]):
    """One run of a stage or command that records what it computed (train-head, predict,
    export), as `reproduce` runs it: it declares its run folder, lock and state, and says how
    to compute; the template does the rest, once, for all of them. A job that subclasses it
    explicitly inherits the defaults of `registered` (none) and `finish` (nothing)."""

    label: str  # the prefix of its log lines: "train-head", "predict [test]", "export"
    run_dir: Path  # the run folder its record lives in (claimed before anything is written)
    lock: Lock | None  # held from judging to registering (None: the run needs none)

    def state(self) -> StageState:
        """Deps, params and outs now."""
        ...

    def current(self, state: StageState, /) -> R_co:
        """The result when it is up to date (nothing computed)."""
        ...

    def compute(self, state: StageState, force: bool, /) -> tuple[R_co, StageState, dict[str, Any]]:
        """Compute the outputs: the result, the state to record (its outputs complete) and
        the record's own fields."""
        ...

    def registered(self) -> Sequence[Path]:
        """The stored splits it used (cache gc keeps the stores a live run uses)."""
        return ()

    def finish(self) -> None:
        """What follows the record, still under the lock (e.g. removing checkpoints)."""
        return None  # noqa: RET501 (a default: without a statement mypy takes it for abstract)


def reproduce(job: Recording[R], force: bool = False, log: Callable[[str], None] = print) -> R:
    """DVC's Stage.reproduce for every recording run: claim the run folder, hold the lock,
    judge the state against the record, skip when up to date (unless `force`), else log why,
    compute, record, register the stores used, finish."""
    claim_run_dir(job.run_dir)
    with job.lock.held() if job.lock is not None else contextlib.nullcontext():
        state = job.state()
        st = judge(job.run_dir, state)
        if st.up_to_date and not force:
            return job.current(state)
        log(f"{job.label}: {st.reason(force)}")
        result, done, extra = job.compute(state, force)
        save_record(job.run_dir, done, **extra)
        for split_dir in job.registered():
            register_run(split_dir, job.run_dir)
        job.finish()
    return result
