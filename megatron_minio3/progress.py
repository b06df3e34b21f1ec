"""Progress of long work (conversion, SFT, generation rounds, evaluation, checkpoint writes).

On a terminal a tqdm bar; otherwise (CI, a log file, a Ray worker's captured output) plain lines: at most one
every `interval_s` seconds while it runs and one at the end, so a log shows long work moving without filling up
(work done within `interval_s` prints nothing):

    evaluation: 40/96 question(s) (42%), 31 s, about 43 s left
    evaluation: 96/96 question(s) in 74 s

`MINIO3_PROGRESS=plain` forces the lines, `MINIO3_PROGRESS=bar` the bar, `MINIO3_PROGRESS=off` silences both.
"""
from __future__ import annotations

import os
import sys
import time
from typing import TextIO


def _mode(stream: TextIO) -> str:
    forced = os.environ.get("MINIO3_PROGRESS", "")
    if forced in ("plain", "bar", "off"):
        return forced
    return "bar" if getattr(stream, "isatty", lambda: False)() else "plain"


class Progress:
    """`progress = Progress(total, "what", unit="item")`; `progress.update(n)`; `progress.close()` (or use it as a
    context manager). `total=None` when unknown (counts without a percentage)."""

    def __init__(self, total: int | None, description: str, *, unit: str = "item", interval_s: float = 10.0,
                 stream: TextIO | None = None, scale: float = 1.0, scale_unit: str | None = None,
                 enabled: bool = True):
        """scale / scale_unit: show counts divided by `scale` in `scale_unit` (e.g. bytes as MB). enabled=False:
        silent (e.g. every rank but the first)."""
        self.stream = stream or sys.stderr
        self.total = total
        self.description = description
        self.unit = scale_unit or unit
        self.scale = scale
        self.interval_s = interval_s
        self.done = 0
        self.started = self._last = time.monotonic()
        self.mode = _mode(self.stream) if enabled else "off"
        self._printed = False
        self._bar = None
        self._closed = False
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=None if total is None else self._scaled(total), desc=description, unit=self.unit,
                             file=self.stream, dynamic_ncols=True, leave=True)

    def _scaled(self, value: float) -> float:
        return value if self.scale == 1 else value / self.scale

    def _count(self, value: float) -> str:
        number = value / self.scale
        text = f"{number:.0f}" if self.scale == 1 else f"{number:.1f}"
        if self.total is None:
            return text
        total = self.total / self.scale
        return f"{text}/{total:.0f}" if self.scale == 1 else f"{text}/{total:.1f}"

    def _line(self, text: str) -> None:
        print(f"{self.description}: {text}", file=self.stream, flush=True)

    def update(self, n: float = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._scaled(n))
        elif self.mode == "plain":
            now = time.monotonic()
            if now - self._last >= self.interval_s and (self.total is None or self.done < self.total):
                self._last = now
                self._printed = True
                self._line(self.status(now))

    def status(self, now: float | None = None) -> str:
        """"40/96 question(s) (42%), 31 s, about 43 s left" (no percentage or estimate without a total)."""
        elapsed = (now or time.monotonic()) - self.started
        text = f"{self._count(self.done)} {self.unit}(s)"
        if self.total:
            share = self.done / self.total
            text += f" ({100 * share:.0f}%), {elapsed:.0f} s"
            if 0 < share < 1:
                text += f", about {elapsed * (1 - share) / share:.0f} s left"
        else:
            text += f", {elapsed:.0f} s"
        return text

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "plain":
            elapsed = time.monotonic() - self.started
            if self._printed or elapsed >= self.interval_s:
                self._line(f"{self._count(self.done)} {self.unit}(s) in {elapsed:.0f} s")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
