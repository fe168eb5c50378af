"""User-facing errors: each is one line naming the file or key and the problem, and carries
the exit code the CLI maps it to (1 a failed stage, 2 a usage error). `cli.py` catches
`PipelineError` at one boundary; anything else is a programming error and surfaces as one."""
from __future__ import annotations


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


class DeviceError(PipelineError):
    """A requested device is not available."""


class LockError(PipelineError):
    """Another process holds the lock of an output this process wants to write."""


class ExecutorError(PipelineError):
    """The Dask scheduler cannot be reached or a distributed task failed."""


class TrainingDiverged(PipelineError):
    """A training loss or weight became non-finite (NaN or inf); no models were written."""


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

    def __reduce__(self):  # picklable (to and from Dask workers) with its pixel count
        return (type(self), (str(self), self.pixels))


def os_error_line(e: OSError) -> str:
    """One line for a filesystem error: the file and the problem (permission, full disk,
    symlink loop, ...), never a traceback."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f)
    what = e.strerror or type(e).__name__
    return f"{where}: {what}" if where else what
