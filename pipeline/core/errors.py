"""User-facing errors: each is one line naming the file or key and the problem, and carries
the exit code the CLI maps it to (1 a failed stage, 2 a usage error). `cli.py` catches
`PipelineError` at one boundary; anything else is a programming error and surfaces as one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class PipelineError(Exception):
    """Base of every user-facing error; `exit_code` is what the CLI exits with."""

    exit_code = 1


class UsageError(PipelineError):
    """A bad command line or config (unknown key, bad value, missing config file)."""

    exit_code = 2


class ConfigError(UsageError):
    """A one-line configuration problem."""


class DataError(PipelineError):
    """A problem with the dataset or one of its files."""


class StoreError(PipelineError):
    """The feature store (stage 1's output) is missing, damaged, locked or out of date."""


class BackboneError(PipelineError):
    """A backbone cannot be built or its weights cannot be (safely) loaded."""


class ModelError(PipelineError):
    """Trained models (stage 2's output) are missing, damaged or do not match the config."""


class CalibrationMissing(PipelineError):
    """predict.threshold = "auto" and the validation split's threshold sweep for these models
    is missing or out of date (the line names the command that makes it)."""


class DeviceError(PipelineError):
    """A requested device is not available."""


class LockError(PipelineError):
    """Another process holds the lock of an output this process wants to write."""


class ExecutorError(PipelineError):
    """The Dask scheduler cannot be reached or a distributed task failed."""


class TrainingDiverged(PipelineError):
    """A training loss or weight became non-finite (NaN or inf); no models were written."""


class EnvironmentProblem(PipelineError):
    """The Python environment or the machine's limits stop the tool (not the data or the
    config): torch and torchvision built for each other's wrong versions, no thread can be
    started. The one line names the cause and the fix."""


# what threading / concurrent.futures raise when the process may start no more threads
THREAD_START_FAILURE = "can't start new thread"


def thread_limit_line(what: str) -> str:
    """The one line for a thread that could not be started for `what`."""
    return (
        f"cannot start a thread for {what}: the process has reached its limit on threads "
        "(ulimit -u, or the container's pids limit); use fewer threads: --set "
        "run.threads=1 and --set extract.num_workers=1"
    )


@contextlib.contextmanager
def thread_limits(what: str) -> Iterator[None]:
    """Turn the RuntimeError of a thread that could not be started (a process limit on a
    shared machine) into EnvironmentProblem naming `what` and the knobs; any other error
    passes unchanged."""
    try:
        yield
    except RuntimeError as e:
        if THREAD_START_FAILURE not in str(e):
            raise
        raise EnvironmentProblem(thread_limit_line(what)) from None


class OwnershipError(UsageError):
    """A write or delete refused: the file or folder was not created by the tool."""


class ImageTooLarge(DataError):
    """An image or mask with more pixels than `data.max_pixels` (from its header, before its
    pixels are decoded), or a file too long for any image within it (not read): skipped like
    any bad file. `pixels`: the smallest data.max_pixels that accepts it (width x height; for
    a file refused for its length, the pixels that length allows)."""

    def __init__(self, message: str, pixels: int):
        super().__init__(message)
        self.pixels = int(pixels)

    def __reduce__(self) -> tuple[type[ImageTooLarge], tuple[str, int]]:
        # picklable (to and from Dask workers) with its pixel count
        return (type(self), (str(self), self.pixels))


def os_error_line(e: OSError) -> str:
    """One line for a filesystem error: the file and the problem (permission, full disk,
    symlink loop, ...), never a traceback."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f)
    what = e.strerror or type(e).__name__
    return f"{where}: {what}" if where else what
