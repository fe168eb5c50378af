"""Strict reading of the JSON files the tool writes (reports, stage records): parsed once,
where they are read, keeping only finite numbers and bounded integers, from a regular file
of bounded size; and the field checks that name what is wrong (``Damaged``: one line, the
caller names the file)."""

from __future__ import annotations

import json
import math
import numbers
import os
import stat
from pathlib import Path
from typing import Any, NoReturn, TypeGuard

MAX_FILE_BYTES = 256 << 20  # a report or record larger than this is not one the tool wrote
MAX_INT = 2**63 - 1  # larger integers in a file are damage (no JSON reader keeps them exact)


class Damaged(Exception):
    """Why a file is not what its writer writes (one line; the caller names the file)."""


# ----------------------------------------------------------------------------- the file


def _reject_constant(name: str) -> NoReturn:
    raise Damaged(f"non-finite number {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Damaged(f"number {text[:24]} out of range")
    return value


def _bounded_int(text: str) -> int:
    digits = text.lstrip("-")
    if len(digits) > 19 or abs(int(text)) > MAX_INT:
        raise Damaged(f"integer {text[:24]}{'...' if len(text) > 24 else ''} out of range")
    return int(text)


def read_doc(path: Path) -> Any | None:
    """The strictly parsed JSON content of the regular file `path` (only finite numbers), or
    None when it does not exist; Damaged when it cannot be read or is not such JSON. Opened
    non-blocking and checked on the descriptor: a FIFO named like a report never hangs."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise Damaged(f"cannot read ({e.strerror or type(e).__name__})") from None
    with os.fdopen(fd, "rb") as f:
        try:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise Damaged("not a regular file")
            data = f.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            raise Damaged(f"cannot read ({e.strerror or type(e).__name__})") from None
    if len(data) > MAX_FILE_BYTES:
        raise Damaged(f"larger than {MAX_FILE_BYTES >> 20} MiB")
    try:
        return json.loads(
            data, parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_bounded_int
        )
    except json.JSONDecodeError as e:
        raise Damaged(f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError:
        raise Damaged("not valid JSON (not UTF-8 text)") from None
    except RecursionError:
        raise Damaged("not valid JSON (nested too deeply)") from None
    except ValueError as e:  # e.g. an integer literal of more digits than Python converts
        raise Damaged(f"not valid JSON ({str(e)[:80]})") from None


# ----------------------------------------------------------------------------- field checks


def finite(x: object) -> TypeGuard[float]:
    """A real, finite number (numpy scalars included, bools not): usable as a float."""
    return (
        isinstance(x, numbers.Real)
        and type(x).__name__ not in ("bool", "bool_")
        and math.isfinite(x)
    )


def show(value: Any) -> str:
    """A value as it reads in the file, cut short."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def kind(value: Any) -> str:
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        type(None): "null",
        int: "a number",
        float: "a number",
    }
    return f"{names.get(type(value), type(value).__name__)} ({show(value)})"


def field_of(doc: dict[str, Any], key: str, where: str) -> Any:
    if key not in doc:
        raise Damaged(f"{where}{key} missing")
    return doc[key]


def _of_type(value: Any, where: str, of: type, noun: str) -> Any:
    if not isinstance(value, of):
        raise Damaged(f"{where} is {kind(value)}, not {noun}")
    return value


def an_object(value: Any, where: str) -> dict[str, Any]:
    return _of_type(value, where or "the file", dict, "an object")


def metric(value: Any, where: str) -> float:
    """A metric: a finite number in [0, 1]."""
    if not finite(value) or not 0 <= value <= 1:
        raise Damaged(f"{where} is {kind(value)}, not a number in [0, 1]")
    return float(value)


def count(value: Any, where: str) -> int:
    if (
        not isinstance(value, numbers.Integral)
        or type(value).__name__ in ("bool", "bool_")
        or value < 0
    ):
        raise Damaged(f"{where} is {kind(value)}, not a count")
    return int(value)


def text(value: Any, where: str) -> str:
    return _of_type(value, where, str, "a string")


def a_list(value: Any, where: str) -> list:
    """A list (its items are the caller's to check)."""
    return _of_type(value, where, list, "a list")
