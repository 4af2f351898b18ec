"""The shared cache (`$CROSSRAY_CACHE`, default `~/.cache/crossray`): where it is, and one writer per entry.

Several runs (and several nodes, on shared storage) use one cache. Every build of, or write into, a
cache entry (the toy family, the weight-hash table) happens under the entry's lock
(`crossray.lock.RunLock`: O_EXCL lock file beside the entry, holder named, stale holders taken over),
so a second builder waits for the first and then reuses its result. Builds go to a private folder and
are renamed into place whole, so a half-built entry is never visible under the final name.
"""

from __future__ import annotations

import os
from pathlib import Path

from crossray.lock import RunLock


def cache_dir() -> Path:
    return Path(os.environ.get("CROSSRAY_CACHE") or Path.home() / ".cache" / "crossray")


def serve_cache_dir() -> Path:
    """Where Serve keeps the MLflow artifacts of the runs it serves (`<cache>/serve`)."""
    return cache_dir() / "serve"


def entry_lock(entry: Path) -> RunLock:
    """The lock of one cache entry (`<entry>.lock` beside it); waits for another holder."""
    return RunLock(entry, wait=True)
