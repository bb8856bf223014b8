"""Progress of a run: a bar on a terminal, a log line every few seconds otherwise."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """A progress line on a terminal; a plain log line every ``interval`` s otherwise."""

    total: int | None = None
    enabled: bool = True
    interval: float = 10.0
    label: str = "screened"
    unit: str = "files"

    def __post_init__(self) -> None:
        import sys

        self.done = 0
        self.start = time.monotonic()
        self._last = 0.0
        self._tty = self.enabled and sys.stderr.isatty()
        self._stream = sys.stderr

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if self._tty:
            if now - self._last >= 0.1:
                self._last = now
                self._stream.write("\r" + self._line(now))
                self._stream.flush()
        elif now - self._last >= self.interval:
            self._last = now
            log.info("%s", self._line(now))

    def close(self) -> None:
        if self.enabled and self._tty:
            self._stream.write("\r" + self._line(time.monotonic()) + "\n")
            self._stream.flush()

    def _line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        if self.total:
            pct = 100.0 * self.done / self.total
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            return f"{self.label} {self.done}/{self.total} {self.unit} ({pct:3.0f}%) {rate:6.1f} {self.unit}/s, ETA {eta:5.0f} s "
        return f"{self.label} {self.done} {self.unit}, {rate:6.1f} {self.unit}/s "
