"""Progress that a person can watch: a bar on a terminal, a line at least every minute elsewhere.

``ConsoleProgress`` shows how far one piece of work is (``done``/``total`` in some
unit), its speed and its ETA, plus any detail the caller adds (an epoch, a loss, the
whole job's ETA).  On a terminal it is a tqdm bar; when the stream is a file or a
pipe (a job under nohup, a CI log) it prints a plain line at most every
``interval_s`` seconds, and at the end.
"""
import math
import sys
import time
from typing import Optional, TextIO

DEFAULT_INTERVAL_S = 60.0


def format_duration(seconds: Optional[float]) -> str:
    """``1h 05m``, ``4m 10s``, ``12s``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def eta_seconds(done: float, total: Optional[float], rate: Optional[float]) -> Optional[float]:
    """Seconds left at ``rate`` units per second; None when it cannot be told."""
    if total is None or not rate or rate <= 0:
        return None
    return max(0.0, (total - done) / rate)


class ConsoleProgress:
    """One piece of work's progress on ``stream`` (default stdout)."""

    def __init__(self, label: str, total: Optional[int], unit: str = "updates", interval_s: float = DEFAULT_INTERVAL_S,
                 stream: Optional[TextIO] = None, bar: Optional[bool] = None):
        self.label, self.total, self.unit, self.interval_s = label, total, unit, interval_s
        self.stream = stream or sys.stdout
        self.done, self.rate, self.detail = 0, None, ""
        self._start = time.monotonic()
        self._start_done: Optional[int] = None
        self._last_line = self._start
        self._printed_done: Optional[int] = None  # how far the last progress line written said, if any
        use_bar = self.stream.isatty() if bar is None else bar
        self._bar = None
        if use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit=f" {unit}", file=self.stream, dynamic_ncols=True,
                             leave=False, bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}")  # postfix: ", ..."

    def update(self, done: int, rate: Optional[float] = None, detail: str = "") -> None:
        """Now ``done`` units; ``rate`` (units/s) if the worker measures it, else it is measured here."""
        now = time.monotonic()
        if self._start_done is None:
            self._start_done, self._start = done, now
        self.done, self.detail = done, detail
        elapsed = now - self._start
        self.rate = rate if rate else ((done - self._start_done) / elapsed if elapsed > 0 and done > self._start_done
                                       else None)
        if self._bar is not None:
            self._bar.n = done
            self._bar.set_postfix_str(self._summary(), refresh=False)
            self._bar.refresh()
        elif now - self._last_line >= self.interval_s or (self._printed_done is None and self.rate):
            self._print_line()  # the first line as soon as the speed is known, then one per interval

    def eta(self) -> Optional[float]:
        return eta_seconds(self.done, self.total, self.rate)

    def write(self, line: str) -> None:
        """A line of its own (an epoch's dev metrics) that does not break the bar."""
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            self._write_line(line)

    def close(self, final_line: bool = True) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif final_line and self.done and self.done != self._printed_done:
            self._print_line()  # where the work ended, unless the last line already said how far it got

    def _summary(self) -> str:
        parts = []
        if self.rate:
            parts.append(f"{self.rate:.2f} {self.unit}/s")
        parts.append(f"ETA {format_duration(self.eta())}")
        if self.detail:
            parts.append(self.detail)
        return ", ".join(parts)

    def _line(self) -> str:
        share = f" ({100.0 * self.done / self.total:.0f}%)" if self.total else ""
        total = f"/{self.total:,}" if self.total else ""
        return f"  {self.label}: {self.done:,}{total} {self.unit}{share}, {self._summary()}"

    def _print_line(self) -> None:
        self._printed_done = self.done
        self._write_line(self._line())
        self._last_line = time.monotonic()

    def _write_line(self, line: str) -> None:
        # One write per line: displays of runs trained at once share the stream without splitting lines.
        self.stream.write(line + "\n")
        self.stream.flush()
