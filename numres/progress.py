"""The one progress bar numres draws (downloads, files through a model): a line on stderr,
redrawn in place, only when stderr is a terminal."""

import sys
import time

WIDTH = 30    # characters of the bar itself


class ProgressBar:
    """``update(done)`` as work progresses, ``close()`` at the end.

    Args:
        total: units expected; None or 0 when unknown (the line then shows the count and
            rate only).
        done: units already done when it starts (a resumed run).
        label: text the line starts with, e.g. ``"Downloading x.pth: "``.
        unit, rate_unit: names after the count and the rate, e.g. ``"images"``, ``"img/s"``.
        scale: units per unit shown (``1e6``: bytes shown as MB, with one decimal).
        eta: show the time left.
        interval: seconds between redraws (the last unit always redraws).
        tqdm_unit: use tqdm's bar with this unit name where tqdm is installed.
        enabled: False draws nothing.
    """

    def __init__(self, total, done=0, *, label="", unit="", rate_unit="", scale=1, eta=False,
                 interval=0.2, tqdm_unit=None, enabled=True):
        self.total, self.start_done, self.done = total or 0, done, done
        self.label, self.unit, self.rate_unit, self.scale = label, unit, rate_unit, scale
        self.eta, self.interval = eta, interval
        self.enabled = enabled and sys.stderr.isatty()
        self.start = self.last = time.monotonic()
        self.tqdm = None
        if self.enabled and tqdm_unit is not None and self.total:
            try:
                from tqdm import tqdm
                self.tqdm = tqdm(total=self.total, initial=done, unit=tqdm_unit,
                                 dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, done):
        """Record progress: ``done`` units in all."""
        self.done = done
        if not self.enabled:
            return
        if self.tqdm is not None:
            self.tqdm.update(done - self.tqdm.n)
            return
        now = time.monotonic()
        if now - self.last >= self.interval or done == self.total:
            self.last = now
            self._draw(now)

    def close(self):
        """Draw the final state and end the line."""
        if not self.enabled:
            return
        if self.tqdm is not None:
            self.tqdm.close()
            return
        self._draw(time.monotonic())
        sys.stderr.write("\n")
        sys.stderr.flush()

    def _number(self, value):
        return f"{value / self.scale:.1f}" if self.scale != 1 else f"{value}"

    def _draw(self, now):
        rate = (self.done - self.start_done) / self.scale / max(now - self.start, 1e-6)
        text = f"\r{self.label}"
        if self.total:
            frac = self.done / self.total
            text += (f"{frac:4.0%} [{'#' * int(WIDTH * frac):<{WIDTH}}] "
                     f"{self._number(self.done)}/{self._number(self.total)} {self.unit}")
        else:
            text += f"{self._number(self.done)} {self.unit}"
        text += f" {rate:.1f} {self.rate_unit}"
        if self.eta and self.total:
            left = (self.total - self.done) / self.scale / rate if rate > 0 else float("inf")
            text += f" ETA {_clock(left)}"
        sys.stderr.write(text)
        sys.stderr.flush()


def _clock(seconds):
    if seconds == float("inf"):
        return "--:--"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" \
        if seconds >= 3600 else f"{seconds // 60:02d}:{seconds % 60:02d}"
