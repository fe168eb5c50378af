"""A run remembers its config: `<paths.outputs>/<run.name>/config.toml`, and `--run NAME`.

train-head writes the effective config into the run folder once the models are complete
(atomically, next to `models/`): the file `config show` prints, with `data.root`,
`paths.cache` and a local `backbone.weights` made absolute, so that it means the same from
any working folder. `paths.outputs` and `run.name` are written for the reader's information
and never read back: a run is wherever its folder is found (a moved or copied run works).

`--run NAME` makes that record the base config, with `--config` (its keys) and `--set` layered
on top. A layered key that would make the run's models stale (a training key, the backbone,
the features: the training key, core.keys.TrainKey, differs) is refused by the commands that use the
models (`refuse_stale`). A run trained before records were written falls back to the
`config` of its `report_<split>.json`.

Below the stages: train-head imports this module to write the record; it imports no stage.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .core.config import (
    PATH_KEYS,
    Config,
    check_name,
    config_from_dict,
    copy_config,
    load_config,
    parse_set,
)
from .core.errors import ConfigError, PipelineError
from .core.fsutil import atomic_write_bytes
from .core.hints import command
from .core.layout import RUN_CONFIG, RunLayout

RECORD = RUN_CONFIG
_HEADER = (
    "# The config this run was trained with, written by train-head; `--run <run name>`\n"
    "# starts from it. paths.outputs and run.name are not read back (a run is wherever\n"
    "# its folder is).\n"
)


def record_path(run_dir: Path) -> Path:
    return RunLayout(Path(run_dir)).config


def _absolute(cfg: Config, absolute: Callable[[str], str]) -> dict[str, str]:
    """The copy_config changes that make `cfg`'s paths (PATH_KEYS: the data, cache and
    outputs folders and a local weights file) absolute by `absolute`."""
    return {
        key.replace(".", "__"): absolute(cfg.get(key))
        for key in PATH_KEYS
        if key != "backbone.weights" or cfg.backbone.weights not in ("pretrained", "random")
    }


def recordable(cfg: Config) -> Config:
    """`cfg` as recorded: its paths absolute (relative ones would mean another folder
    elsewhere)."""
    return copy_config(cfg, **_absolute(cfg, os.path.abspath))


def portable_config(cfg: Config) -> Config:
    """`cfg` as Dask workers must see it: its paths absolute, links resolved (a worker's
    working directory is not the driver's), and extract.precision resolved on the driver,
    so every worker computes what the store's key says."""
    from .models.devices import resolve_precision

    changes = _absolute(cfg, lambda path: str(Path(path).expanduser().resolve()))
    changes["extract__precision"] = resolve_precision(cfg.extract.precision, cfg.extract.device)
    return copy_config(cfg, **changes)


def write_record(cfg: Config) -> Path:
    """Record `cfg` (the config the run's models were just trained with) in its run folder."""
    from .core.config import to_toml

    path = record_path(cfg.run_dir)
    text = _HEADER + to_toml(recordable(cfg))
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def _reports(run_dir: Path, first: Sequence[str]) -> list[Path]:
    """The run's report_<split>.json files, those of the splits `first` first."""
    try:
        found = RunLayout(run_dir).reports()
    except OSError:
        found = []
    head = [RunLayout(run_dir).report(s) for s in first]
    return [p for p in head if p in found] + [p for p in found if p not in head]


def _from_report(path: Path) -> Config:
    """The `config` of a report, read strictly (the report's own parser) and validated."""
    from .core.jsondoc import Damaged, read_doc
    from .report.doc import parse_report

    try:
        doc = read_doc(path)
        report = parse_report(doc, strict=True)
    except Damaged as e:
        raise ConfigError(f"{path}: damaged ({e}); cannot take the run's config from it") from None
    assert report.config is not None  # strict: required
    try:
        return config_from_dict(report.config, f" in {path} (config)")
    except (TypeError, ValueError, AttributeError) as e:  # a shape the validator never met
        raise ConfigError(f"{path}: config unusable ({type(e).__name__})") from None


def read_record(run_dir: Path, splits: Sequence[str] = ()) -> tuple[Config, Path]:
    """The config the run in `run_dir` was trained with and the file it was read from: its
    config.toml, or for a run trained before records were written, the `config` of its
    report_<split>.json (those of `splits` first). ConfigError (one line) when the folder
    holds no run, or neither file, or the file is not a valid config."""
    run_dir = Path(run_dir)
    path = record_path(run_dir)
    if path.exists() or path.is_symlink():
        return load_config(path), path
    if not run_dir.is_dir():
        raise ConfigError(f"--run {run_dir.name}: no run folder {run_dir}{_runs_hint(run_dir)}")
    for report in _reports(run_dir, splits):
        return _from_report(report), report
    raise ConfigError(
        f"--run {run_dir.name}: {run_dir} has no recorded config ({RECORD}, "
        "written by train-head) and no report_<split>.json to take it from: "
        "give its settings with --config / --set instead of --run"
    )


def _runs_hint(run_dir: Path) -> str:
    """` (runs there: a, b)` naming the run folders next to `run_dir`, or why none."""
    try:
        names = sorted(
            d.name
            for d in run_dir.parent.iterdir()
            if RunLayout(d).models.is_dir() or record_path(d).is_file()
        )
    except OSError:
        return " (paths.outputs is not a readable folder)"
    if not names:
        return " (no runs there)"
    more = f", +{len(names) - 6} more" if len(names) > 6 else ""
    return f" (runs there: {', '.join(names[:6])}{more})"


@dataclass(frozen=True)
class RunConfig:
    """What `--run NAME` resolved to."""

    name: str
    recorded: Config  # the run's record, in this outputs folder under this name
    source: Path  # the file it was read from (config.toml, or a report)
    cfg: Config  # the record with --config and --set on top


def load_run_config(
    plain: Config, name: str, config_path: str | Path | None, overrides: Sequence[str]
) -> RunConfig:
    """`--run NAME`: the run's record found at <plain.paths.outputs>/NAME (`plain`: the config
    of --config / --set alone, or the default), then the keys of the `config_path` file and
    the `overrides` on top. The run stays NAME unless `--set run.name=...` names a new run
    (starting from NAME's config); a --config file's run.name does not move it."""
    check_name("--run", name)
    run_dir = Path(plain.paths.outputs) / name
    recorded, source = read_record(run_dir, [plain.data.test_split])
    base = copy_config(recorded, paths__outputs=plain.paths.outputs, run__name=name)
    cfg = load_config(config_path, tuple(overrides), base=base)
    if not any(parse_set(o)[0] == "run.name" for o in overrides):
        cfg = copy_config(cfg, run__name=name)
    return RunConfig(name, base, source, cfg)


def stale_keys(recorded: Config, cfg: Config) -> list[str]:
    """The differences (`key: recorded -> asked`) of the settings the models depend on."""
    from .core.fingerprints import diff_params
    from .models.devices import config_keys

    return diff_params(config_keys(recorded).train.params(), config_keys(cfg).train.params())


def _shown(diff: list[str]) -> str:
    return "; ".join(diff[:3]) + (f" (+{len(diff) - 3} more)" if len(diff) > 3 else "")


def refuse_stale(run: RunConfig, training: bool = False) -> None:
    """ConfigError (exit 2, one line naming the key, both values and the ways out) when the
    layered config would make the run's models stale; `training`: for train-head, which
    never replaces a run's models under a changed config. A new run.name is not refused."""
    if run.cfg.run.name != run.name:
        return
    diff = stale_keys(run.recorded, run.cfg)
    if not diff:
        return
    new_run = f"`{command('train-head', '--run', run.name, '--set', 'run.name=NEW')}`"
    if training:
        raise ConfigError(
            f"--run {run.name}: {_shown(diff)} (recorded -> asked): a run's models are not "
            f"replaced under a changed config; train a new run: {new_run}, or drop that --set "
            "(or --config key)"
        )
    raise ConfigError(
        f"--run {run.name}: {_shown(diff)} (recorded -> asked) would make the run's models "
        "stale: drop that --set (or --config key) to use the run as it was trained, or train "
        f"a new run: {new_run}"
    )


def reproduces(cfg: Config, params: dict) -> bool:
    """Whether the run of `cfg` has a record (or report) whose training settings are
    `params` (the models' card): then `--run <name>` uses the run as it was trained."""
    try:
        recorded, _ = read_record(cfg.run_dir, [cfg.data.test_split])
        from .core.fingerprints import diff_params
        from .models.devices import config_keys

        return not diff_params(params, config_keys(recorded).train.params())
    except (PipelineError, OSError):
        return False
