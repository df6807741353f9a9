"""Progress for people and for logs: a tqdm bar on a terminal, a log line every few seconds otherwise.

A SuperNode's or CI's stderr is a file, where tqdm's carriage returns pile up (tens of KB of bars per site log); a
line like `module client-003_class-003: 300/600 step, loss=0.0712` every LOG_EVERY_S seconds reads the same there.
"""

import logging
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm import tqdm

log = logging.getLogger("fedfactory")

LOG_EVERY_S = 10.0


class LogProgress:
    """An iterable that logs how far it got at most every `every_s` seconds (and once at the end, if it logged)."""

    def __init__(self, iterable: Iterable, desc: str, unit: str, total: int | None, every_s: float):
        self.iterable, self.desc, self.unit, self.every_s = iterable, desc, unit, every_s
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.postfix, self.done, self.logged = "", 0, False

    def __iter__(self) -> Iterator:
        last = time.monotonic()
        for item in self.iterable:
            yield item
            self.done += 1
            if time.monotonic() - last >= self.every_s:
                self._line()
                last = time.monotonic()
        if self.logged:
            self._line()

    def _line(self) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        log.info("%s: %d%s %s%s", self.desc, self.done, of, self.unit, f", {self.postfix}" if self.postfix else "")
        self.logged = True

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        """Nothing to tear down (tqdm's interface)."""


def progress(iterable: Iterable, desc: str, unit: str, enabled: bool = True, total: int | None = None,
             every_s: float = LOG_EVERY_S):
    """tqdm(iterable) where stderr is a terminal, LogProgress where it is not, the iterable unchanged (with no-op
    set_postfix and close) when progress is off."""
    if not enabled:
        return LogProgress(iterable, desc, unit, total, every_s=float("inf"))
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, unit=unit, total=total, leave=False)
    return LogProgress(iterable, desc, unit, total, every_s)
