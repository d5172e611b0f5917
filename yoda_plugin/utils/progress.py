"""Progress lines for long command-line jobs (the benchmark scripts): one line per unit of work on stderr.

    progress = Progress('training step A/B', 10, unit='steps', prefix='overhead')
    for i in range(10):
        ...
        progress.update()   # "[overhead] training step A/B: 3/10 steps, 12 s elapsed, ~28 s left"
    progress.done()         # "[overhead] training step A/B: done, 10 steps in 40 s"

Lines go to stderr (flushed at once), so the tables on stdout stay clean and a
redirected or piped run still shows how far it got. The estimate of the time
left is the mean time per unit so far times the units left; ``weights`` (one
per unit) lets a stage whose units differ in cost (e.g. a forward pass and a
training step) estimate in cost instead of counts.
"""
import sys
import time
from typing import Optional, Sequence


def format_seconds(seconds: float) -> str:
    """``'42 s'``, ``'3 min 05 s'``, ``'1 h 02 min'``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f'{seconds:.0f} s' if seconds >= 10 else f'{seconds:.1f} s'
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f'{minutes} min {sec:02d} s'
    hours, minutes = divmod(minutes, 60)
    return f'{hours} h {minutes:02d} min'


class Progress:
    """A stage of ``total`` units: a start line, :meth:`update` per unit, :meth:`done` at the end."""

    def __init__(self, what: str, total: int, unit: str = 'steps', prefix: Optional[str] = None, stream=None,
                 weights: Optional[Sequence[float]] = None, enabled: bool = True):
        self.what, self.total, self.unit = what, int(total), unit
        self.prefix = f'[{prefix}] ' if prefix else ''
        self.stream = stream
        self.weights = list(weights) if weights is not None else None
        if self.weights is not None and len(self.weights) != self.total:
            raise ValueError(f'{len(self.weights)} weights for {self.total} units')
        self.enabled = enabled
        self.count = 0
        self.start = time.perf_counter()
        self._print(f'{self.total} {self.unit}')

    def _print(self, text: str):
        if self.enabled:
            print(f'{self.prefix}{self.what}: {text}', file=self.stream or sys.stderr, flush=True)

    def _cost(self, n: int) -> float:
        return float(n) if self.weights is None else float(sum(self.weights[:n]))

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> Optional[float]:
        """Estimated seconds left (None before the first unit is done)."""
        done = self._cost(self.count)
        if done <= 0:
            return None
        return self.elapsed() / done * (self._cost(self.total) - done)

    def update(self, n: int = 1, detail: str = ''):
        self.count = min(self.total, self.count + n)
        left = self.left()
        text = f'{self.count}/{self.total} {self.unit}, {format_seconds(self.elapsed())} elapsed'
        if self.count < self.total:
            text += ', time left unknown' if left is None else f', ~{format_seconds(left)} left'
        self._print(text + (f' ({detail})' if detail else ''))

    def done(self, detail: str = ''):
        self._print(f'done, {self.count} {self.unit} in {format_seconds(self.elapsed())}' +
                    (f' ({detail})' if detail else ''))
        return self.elapsed()
