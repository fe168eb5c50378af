"""What the commands share: the effective config (--config, --set, --run), the options of
the stage commands, and the one error boundary that maps user-facing errors to exit codes
(`guarded`). cli.py holds the group; each command module (cli_*.py and the stage commands in
cli.py) decorates its command with these."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from ..core import hints
from ..core.config import Config, load_config
from ..core.errors import PipelineError, os_error_line

if TYPE_CHECKING:
    from ..stages.base import Outcome

T = TypeVar("T")
V = TypeVar("V", str, tuple[str, ...], None)

# The checkout's default config; an installed command without a checkout uses the same
# values built into pipeline/core/config.py (a test keeps the two equal).
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.toml"


def load(config_path: str | Path | None, overrides: list[str] | tuple[str, ...]) -> Config:
    """The effective config: `config_path` (default: DEFAULT_CONFIG when present, else the
    built-in defaults) with the --set overrides applied."""
    if config_path is None and DEFAULT_CONFIG.is_file():
        config_path = DEFAULT_CONFIG
    return load_config(config_path, overrides)


def load_run(
    config_path: str | Path | None,
    overrides: list[str] | tuple[str, ...],
    name: str,
    guard: str | None,
) -> Config:
    """`--run NAME`: the run's recorded config (found under the paths.outputs of --config /
    --set or the default) with the --config file's keys and the --set overrides on top.
    `guard`: "use" (segment, predict, export) or "train" (train-head) refuse a key that would
    make the run's models stale (exit 2); None (status, config show) shows it."""
    from ..runconfig import load_run_config, refuse_stale

    run = load_run_config(load(config_path, overrides), name, config_path, overrides)
    if guard is not None:
        refuse_stale(run, training=guard == "train")
    return run.cfg


EXAMPLE_PROG = "python cli.py"  # how the examples start (`vit-objseg` works the same)


def examples(*command_lines: str) -> str:
    """A command's epilog: its examples (`command_lines` after the program's name), printed
    as they are (not rewrapped) at the end of its --help, and under its entry on the docs
    site's commands page."""
    return "Examples:\n\n\b\n" + "\n".join(f"  {EXAMPLE_PROG} {c}" for c in command_lines)


def _fail(message: str, code: int) -> NoReturn:
    """Print `message` as one `error:` line (a library's multi-line text is joined) and exit."""
    one_line = "; ".join(part.strip() for part in message.splitlines() if part.strip())
    click.echo(f"error: {one_line}", err=True)
    sys.exit(code)


MEMORY_ADVICE = (
    "lower extract.batch_size, predict.batch_size, train.crop, upsampler.hidden, "
    "upsampler.channels, upsampler.kernel_size or data.max_pixels"
)


def allocation_failure(e: BaseException) -> bool:
    """Whether `e` is an allocator's out-of-memory error: MemoryError, torch's CUDA
    OutOfMemoryError, or the RuntimeError of torch's CPU allocator (it has no type of its own)."""
    if isinstance(e, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(e, RuntimeError) and "DefaultCPUAllocator" in str(e)


def guarded(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `call`, mapping user-facing errors to their exit code at this one boundary:
    PipelineError (1, or 2 for usage errors), OSError (1), out of memory (1), Ctrl-C (130)."""
    try:
        return call(*args, **kwargs)
    except PipelineError as e:
        _fail(str(e), e.exit_code)
    except OSError as e:
        _fail(os_error_line(e), 1)
    except (MemoryError, RuntimeError) as e:
        if not allocation_failure(e):
            raise
        first = (str(e).splitlines() or [type(e).__name__])[0]
        _fail(f"out of memory ({first[:160]}): {MEMORY_ADVICE}", 1)
    except KeyboardInterrupt:
        click.echo("\ninterrupted: rerun the same command to resume", err=True)
        sys.exit(130)


CONFIG_HELP = "TOML config file [default: configs/default.toml of this checkout]."

set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key (a TOML literal, or a bare string); repeatable.",
)


def compose(
    *decorators: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """One decorator applying `decorators` as if they were stacked in this order (the first
    on top: its option comes first in --help)."""

    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for decorate in reversed(decorators):
            f = decorate(f)
        return f

    return apply


def _common_options(computes: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--config and --set, and --force where the command `computes`."""
    config = click.option("--config", "config_path", default=None, help=CONFIG_HELP)
    if not computes:
        return compose(config, set_option)
    force = click.option(
        "--force", is_flag=True, help="Recompute even when the result is up-to-date."
    )
    return compose(config, set_option, force)


def _command_config(
    config_path: str | None, overrides: tuple[str, ...], kwargs: dict[str, Any]
) -> Config:
    """The config a command runs with: --config, --set, and --scheduler and --run (popped
    from the command's `kwargs`); the repair hints learn the options first."""
    # repair hints name this program and carry these options (pipeline/core/hints.py)
    hints.invoked(
        sys.argv[0],
        config_path,
        overrides,
        (kwargs.get("run_name") or (None,))[0],
        run_commands(),
    )
    distributable = "scheduler" in kwargs  # the command runs on Dask when configured
    scheduler = kwargs.pop("scheduler", None)
    if scheduler:
        overrides = (*overrides, f"dask.scheduler={scheduler}")
    run = kwargs.pop("run_name", None)  # (NAME, guard) of --run (run_option)
    cfg = (
        guarded(load, config_path, overrides)
        if run is None
        else guarded(load_run, config_path, overrides, *run)
    )
    if distributable and cfg.dask.scheduler:
        from ..executors import require_distributed

        guarded(require_distributed)
    return cfg


def stage_command(func: Callable[..., Any] | None = None, *, computes: bool = True) -> Any:
    """Common options of the commands, config loading and the exit-code policy: 0 success,
    1 a failed stage (bad data, missing upstream), 2 a usage error. `computes`: the command
    computes something (a stage, segment, export), so it takes --force and sets the threads;
    `@stage_command(computes=False)` for those that only read (status, runs, config show,
    cache list / gc): no --force, and torch's threads untouched."""
    if func is None:
        return functools.partial(stage_command, computes=computes)

    @_common_options(computes)
    @functools.wraps(func)
    def wrapper(
        config_path: str | None, overrides: tuple[str, ...], force: bool = False, **kwargs: Any
    ) -> Any:
        cfg = _command_config(config_path, overrides, kwargs)
        if not computes:
            return guarded(func, cfg, **kwargs)
        from ..models.devices import apply_threads

        apply_threads(cfg.run.threads)
        return guarded(func, cfg, force=force, **kwargs)

    return wrapper


def run_commands() -> list[str]:
    """The commands that take --run (run_option): a repair hint naming one carries it."""
    root = click.get_current_context().find_root()
    group = root.command
    if not isinstance(group, click.Group):
        return []
    commands = {name: group.get_command(root, name) for name in group.list_commands(root)}
    return [
        name
        for name, c in commands.items()
        if c is not None and any(p.name == "run_name" for p in c.params)
    ]


def split_names(value: V) -> V:
    """A --split value (or several) checked to be plain folder names: a `/`, `..` or an
    absolute path would make the stages write outside their folders (exit 2, one line)."""
    from ..core.config import check_name

    names: tuple[str, ...] = value if isinstance(value, tuple) else (value,) if value else ()
    for name in names:
        guarded(check_name, "--split", name)
    return value


def run_option(guard: str | None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`--run NAME` for a stage_command: its config starts from that run's record; `guard`
    as in load_run (what a key that would make the run's models stale does)."""
    what = {
        "use": " A key that would make its models stale is refused.",
        "train": " Its models are not retrained under a changed config (refused).",
        None: "",
    }[guard]
    return click.option(
        "--run",
        "run_name",
        default=None,
        metavar="NAME",
        callback=lambda c, p, v: None if v is None else (v, guard),
        help="Start from the config run NAME was trained with (<paths.outputs>/NAME/"
        f"config.toml); --config and --set apply on top.{what}",
    )


scheduler_option = click.option(
    "--scheduler",
    default=None,
    metavar="ADDRESS",
    help='Run on Dask: "local:N" or "tcp://host:8786" (same as --set dask.scheduler=...).',
)


def split_option(help: str, *, several: bool = False) -> Callable[..., Any]:
    """`--split` (checked by split_names): one split, or with `several` a repeatable one
    (the command's parameter is then `splits`)."""
    if several:
        return click.option(
            "--split", "splits", multiple=True, callback=lambda c, p, v: split_names(v), help=help
        )
    return click.option("--split", default=None, callback=lambda c, p, v: split_names(v), help=help)


PREDICT_SPLIT_HELP = "Split to predict (default: data.test_split)."


def out_option(dest: str, help: str, *, file: bool) -> Callable[..., Any]:
    """`--out` into parameter `dest`: a file (`file`) or a folder path, default None."""
    kind = (
        click.Path(dir_okay=False, path_type=Path)
        if file
        else click.Path(file_okay=False, path_type=Path)
    )
    return click.option("--out", dest, type=kind, default=None, help=help)


def echo_outcome(outcome: Outcome) -> bool:
    """Print what a stage did (its summary lines); whether it went well."""
    for text, to_err in outcome.lines():
        click.echo(text, err=to_err)
    return outcome.ok


# the option lists several commands share, each composed once (in this order in --help)
predict_options = compose(scheduler_option, split_option(PREDICT_SPLIT_HELP))  # predict, run
uses_run = compose(run_option("use"), stage_command)  # predict, segment, export: a run's models
reads_run = compose(run_option(None), stage_command(computes=False))  # status, config show
