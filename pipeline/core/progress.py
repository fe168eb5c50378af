"""Progress that works everywhere: a tqdm bar on a terminal; elsewhere (a log file, a cluster
job) plain lines on stderr, at most one every PLAIN_INTERVAL_S seconds, and a last one at the
end, with the rate and the time left."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

PLAIN_INTERVAL_S = 5.0


def plural(n: int, word: str, words: str | None = None) -> str:
    """`n` and the noun in the number it takes: "1 mask", "3 masks", "1 image or folder"."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


class Progress:
    """Counts `total` units; `update(n)` from any thread. Disabled: counts silently."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "img",
        enabled: bool = True,
        stream: TextIO | None = None,
        interval: float = PLAIN_INTERVAL_S,
    ):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.n = 0
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()
        self._last = self._t0
        self._interval = interval
        self._bar = None
        self._plain = False
        if enabled and total > 0:
            if self.stream.isatty():
                from tqdm import tqdm

                self._bar = tqdm(
                    total=total,
                    unit=unit,
                    desc=desc,
                    file=self.stream,
                    dynamic_ncols=True,
                    smoothing=0.1,
                )
            else:
                self._plain = True

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.n += n
            if self._bar is not None:
                self._bar.update(n)
            elif self._plain:
                now = time.perf_counter()
                if now - self._last >= self._interval and self.n < self.total:
                    self._last = now
                    self._line(now)

    def set_postfix(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def _line(self, now: float) -> None:
        elapsed = now - self._t0
        rate = self.n / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.n) / rate if rate > 0 else float("nan")
        eta = f", {_clock(left)} left" if rate > 0 and self.n < self.total else ""
        print(
            f"{self.desc}: {self.n}/{self.total} {self.unit} "
            f"({100 * self.n / self.total:.0f} %), {rate:.1f} {self.unit}/s{eta}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            elif self._plain and self.n:
                self._line(time.perf_counter())
                self._plain = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
