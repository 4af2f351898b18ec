"""Starting or joining Ray from a job's main()."""

from __future__ import annotations

import os

import ray


def init_ray(address: str | None) -> None:
    """Join `address` or $RAY_ADDRESS (set by `ray job submit`); otherwise start a fresh local Ray.

    NOTE: a bare `ray.init()` joins whatever cluster /tmp/ray last recorded, even one started in
    another network namespace, and then waits minutes for it.
    """
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
             log_to_driver=False, ignore_reinit_error=True)
