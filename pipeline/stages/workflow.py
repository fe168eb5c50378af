"""The ordered list of stages, and what iterates it: `status`, `run` and `runs`.

Above the stage modules (it imports them, the one module of stages/ that may); nothing below
imports it. Each stage is a `base.Stage`: the one mechanism (`base.judge_record`) decides
whether it is up to date.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..core.config import Config
from ..core.errors import PipelineError, UsageError, os_error_line
from .base import Context, Outcome, Stage, StageStatus
from .extract import ExtractStage
from .predict import PredictStage
from .train import TrainStage

STAGES: tuple[Stage, ...] = (ExtractStage(), TrainStage(), PredictStage())


def statuses(ctx: Context) -> Iterator[StageStatus]:
    """Each stage's status, in order. A stage that cannot be checked (an unreadable file, a
    store error) is stale with why; a config no command can use is a UsageError."""
    for stage in STAGES:
        try:
            yield stage.status(ctx)
        except UsageError:
            raise
        except (PipelineError, OSError) as e:  # status reports, it never fails
            why = os_error_line(e) if isinstance(e, OSError) else str(e)
            yield StageStatus(stage.name(ctx.split), "stale", f"cannot check: {why}")


def run_all(cfg: Config, split: str, force: bool) -> Iterator[Outcome]:
    """Run every stage in order (each skipped when up to date), yielding what each did."""
    ctx = Context.of(cfg, split)
    for stage in STAGES:
        yield stage.run(ctx, force)


def recorded_problems(cfg: Config, split: str) -> list[str]:
    """Why the run in cfg.run_dir is not up to date for its recorded config `cfg`, judged from
    what the run folder holds (the stages whose record lives there); [] when it is."""
    ctx = Context(cfg, split, recorded=True)
    out = []
    for stage in STAGES:
        if stage.in_run:
            st = stage.status(ctx)
            if not st.up_to_date:
                out.append(st.line())
    return out
