"""One progress line per step of a stage, on the driver: ``[stage] done/total unit (pct) | rate | ETA | fields``.

Every stage (surrogate epochs, extraction, k-means, keep-sets, sweep trials) prints through this one
printer, so a person follows a long run line by line without Ray's or Tune's own dumps. Pure: the
clock and the stream are arguments, so rates and ETAs are tested without Ray.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, TextIO

EVERY_S = 5.0  # stages with many small steps (parts, iterations) print at most one line per this many seconds


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: short enough for a progress line."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_value(value: Any) -> str:
    """Floats to 4 significant digits, ints with thousands separators, the rest as str."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def format_line(stage: str, text: str = "", **fields: Any) -> str:
    """``[stage] text | key value | ...`` (fields whose value is None are left out)."""
    parts = [p for p in [text] + [f"{k.replace('_', ' ')} {format_value(v)}" for k, v in fields.items() if v is not None] if p]
    return f"[{stage}] " + " | ".join(parts)


def say(stage: str, text: str = "", out: TextIO | None = None, **fields: Any) -> str:
    """Print one line for a step that is not one of a counted series (a keep-set written, a trial done)."""
    line = format_line(stage, text, **fields)
    print(line, file=out or sys.stdout, flush=True)
    return line


class Progress:
    """Counts a stage's work and prints a line per update: done/total, the rate since the printer was made
    (work done before it, ``start``, e.g. rows a killed run committed, does not count), and the ETA.

    ``every_s`` > 0 prints at most one line per that many seconds, and always the line that reaches ``total``.
    ``rate_unit`` None prints no rate (an epoch's own images/s is a field) but still estimates the ETA.
    ``rate_from_first`` measures the rate (and the ETA) from the first update on: for a stage of many
    small steps behind a fixed start-up (an extraction's parts, after its actors have started), whose
    start-up would make the early ETAs many times too long; the first line then shows neither, the
    last one the rate since the printer was made, as its "took" is.
    """

    def __init__(self, stage: str, total: int | None = None, unit: str = "", rate_unit: str | None = None,
                 start: int = 0, every_s: float = 0.0, out: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, rate_from_first: bool = False):
        self.stage, self.total, self.unit, self.rate_unit = stage, total, unit, rate_unit
        self.start, self.every_s, self.out, self.clock = start, every_s, out, clock
        self.t0 = clock()
        self.pace_origin: tuple[float, int] | None = None if rate_from_first else (self.t0, start)
        self.last_printed: float | None = None
        self.last_done: int | None = None

    def rate(self, done: int, now: float, since_made: bool = False) -> float | None:
        """Work per second since the printer was made (or its first update); None before any work or time."""
        origin = (self.t0, self.start) if since_made else self.pace_origin
        if origin is None:
            return None
        elapsed = now - origin[0]
        return (done - origin[1]) / elapsed if elapsed > 0 and done > origin[1] else None

    def eta_s(self, done: int, now: float) -> float | None:
        """Seconds left at the current rate; None without a total or a rate."""
        rate = self.rate(done, now)
        return None if self.total is None or rate is None else max(self.total - done, 0) / rate

    def line(self, done: int, now: float, final: bool = False, **fields: Any) -> str:
        """The line for ``done`` units at ``now``; a ``final`` one (or one at ``total``) says how long it took."""
        count = f"{done:,}/{self.total:,}" if self.total is not None else f"{done:,}"
        text = f"{count} {self.unit}".rstrip()
        if self.total:
            text += f" ({100 * done / self.total:.0f}%)"
        last = final or (self.total is not None and done >= self.total)
        rate, eta = self.rate(done, now, since_made=last), self.eta_s(done, now)
        head = {self.rate_unit: rate} if self.rate_unit and rate is not None else {}
        if last:
            head["took"] = format_duration(now - self.t0)
        elif eta is not None:
            head["ETA"] = format_duration(eta)
        text = " | ".join([text] + [f"{format_value(v)} {k}" if k == self.rate_unit else f"{k} {v}" for k, v in head.items()])
        return format_line(self.stage, text, **fields)

    def update(self, done: int, **fields: Any) -> str | None:
        """Record that ``done`` units are done and print the line (unless throttled); returns it."""
        now = self.clock()
        if self.pace_origin is None:
            self.pace_origin = (now, done)
        final = self.total is not None and done >= self.total
        if not final and self.last_printed is not None and now - self.last_printed < self.every_s:
            return None
        return self._print(done, now, **fields)

    def finish(self, done: int, **fields: Any) -> str | None:
        """The closing line, unless the last line printed already showed ``done`` (e.g. rows skipped as
        unreadable leave ``done`` short of ``total``, so no update counted as the last)."""
        return None if self.last_done == done else self._print(done, self.clock(), final=True, **fields)

    def _print(self, done: int, now: float, final: bool = False, **fields: Any) -> str:
        self.last_printed, self.last_done = now, done
        text = self.line(done, now, final, **fields)
        print(text, file=self.out or sys.stdout, flush=True)
        return text


__all__ = ["EVERY_S", "Progress", "format_duration", "format_line", "format_value", "say"]
