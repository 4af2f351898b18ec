"""Progress a person can follow for hours: a tqdm bar in a terminal, otherwise a log line every
`CROSSRAY_PROGRESS_SECONDS` (default 30) with the rate and the ETA; either way `report(figures)` is
called on the same cadence, so the figures can go to MLflow or across processes while work runs.

    progress = Progress("extract", total=n_rows, unit="tokens", report=log_to_mlflow)
    for rows in work():
        progress.update(len(rows))
    progress.close()
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


def progress_seconds() -> float:
    return float(os.environ.get("CROSSRAY_PROGRESS_SECONDS", "30"))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Counts units of work; reports rate, ETA and the latest figures (loss, FVE, ...)."""

    def __init__(self, desc: str, total: int, unit: str, initial: int = 0, every_s: float | None = None,
                 report: Callable[[dict], None] | None = None, terminal: bool | None = None,
                 log: logging.Logger | None = None):
        self.desc, self.total, self.unit, self.done = desc, total, unit, initial
        self.every_s = progress_seconds() if every_s is None else every_s
        self.report, self.log = report, log or logger
        self.figures: dict[str, float] = {}
        self.extra: dict[str, float] = {}  # other counters (tokens), with their own rates
        self.start = self.last = time.monotonic()
        self.initial, self.extra_start = initial, {}
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = None
        if terminal:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=f" {unit}")

    def update(self, n: int = 1, **counters: float) -> None:
        """`n` more units done; `counters` adds to other totals (e.g. tokens=4096)."""
        self.done += n
        for k, v in counters.items():
            self.extra[k] = self.extra.get(k, 0) + v
        if self.bar is not None:
            self.bar.update(n)
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self.tick(now)

    def set(self, **figures: float) -> None:
        """The latest figures to show with the rate (loss, l0, fve)."""
        self.figures.update(figures)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in figures.items()}, refresh=False)

    def snapshot(self, now: float | None = None) -> dict:
        elapsed = max(1e-9, (now or time.monotonic()) - self.start)
        rate = (self.done - self.initial) / elapsed
        out = {"done": self.done, "total": self.total, f"{self.unit}_per_s": rate,
               "elapsed_s": elapsed, "eta_s": (self.total - self.done) / rate if rate > 0 else float("nan")}
        out.update({f"{k}_per_s": v / elapsed for k, v in self.extra.items()})
        return {**out, **self.figures}

    def tick(self, now: float | None = None) -> dict:
        snap = self.snapshot(now)
        if self.bar is None:
            self.log.info("%s", describe(self.desc, self.unit, snap, list(self.extra), list(self.figures)))
        if self.report is not None:
            self.report(snap)
        return snap

    def close(self) -> dict:
        snap = self.tick() if self.bar is None or self.report is not None else self.snapshot()
        if self.bar is not None:
            self.bar.close()
        return snap


def describe(desc: str, unit: str, snap: dict, counters: list[str], figures: list[str]) -> str:
    """One progress line: done of total, rates, the latest figures, ETA."""
    rates = ", ".join(_rate(snap[f"{k}_per_s"], k) for k in [unit, *counters] if f"{k}_per_s" in snap)
    shown = "".join(f", {k} {snap[k]:.4g}" for k in figures if k in snap)
    pct = 100 * snap["done"] / snap["total"] if snap["total"] else 100.0
    eta = _duration(snap["eta_s"]) if snap["eta_s"] == snap["eta_s"] else "?"
    return f"{desc}: {snap['done']:,}/{snap['total']:,} {unit} ({pct:.0f}%), {rates}{shown}, ETA {eta}"


def _rate(per_s: float, unit: str) -> str:
    """A rate as people read it: per second, or per minute when under one every ten seconds (a
    study's sets)."""
    return f"{per_s * 60:,.2f} {unit}/min" if 0 < per_s < 0.1 else f"{per_s:,.1f} {unit}/s"
