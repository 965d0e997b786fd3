"""A one-line progress bar on stderr for long CLI work; silent unless stderr is a terminal."""

from __future__ import annotations

import sys
import threading
import time
from types import TracebackType
from typing import TextIO

_BAR = 24
_INTERVAL_S = 0.1


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """Bytes done out of ``total``, redrawn at most ten times a second.

    With ``total=None`` it shows the elapsed time instead, redrawn by a ticker thread
    (for work that reports no progress of its own). Disabled, it prints nothing: the
    default is enabled only when ``stream`` is a terminal, so piped output stays clean.

    Examples:
        >>> with Progress("verify", total=100) as bar:  # silent here: not a terminal
        ...     bar.advance(100)
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        stream: TextIO | None = None,
        enabled: bool | None = None,
    ) -> None:
        self.label, self.total, self.done = label, total, 0
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = enabled
        self._started = time.monotonic()
        self._drawn = 0.0
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> Progress:
        if self.enabled and self.total is None:
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()
        self._draw(force=True)
        return self

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        self._draw()

    def update(self, done: int, total: int) -> None:
        """A ``progress(done, total)`` callback: work whose total is known only once it starts."""
        self.done, self.total = done, total
        self._draw()

    def _tick(self) -> None:
        while not self._stop.wait(_INTERVAL_S):
            self._draw(force=True)

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._drawn < _INTERVAL_S:
            return
        self._drawn = now
        elapsed = now - self._started
        if self.total is None:
            text = f"{self.label}  {elapsed:.1f} s"
        else:
            frac = min(1.0, self.done / self.total) if self.total else 1.0
            filled = round(frac * _BAR)
            text = (
                f"{self.label}  [{'#' * filled}{'.' * (_BAR - filled)}] {frac:4.0%}  "
                f"{human_bytes(self.done)} / {human_bytes(self.total)}"
            )
        self.stream.write("\r" + text + "\x1b[K")
        self.stream.flush()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if self.enabled:
            self._draw(force=True)
            self.stream.write("\r\x1b[K")  # leave the line clean for what follows
            self.stream.flush()
