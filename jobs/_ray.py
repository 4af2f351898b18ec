"""What every job's main() shares: its parser (the run config, its flags, a Ray address), logging,
and starting or joining Ray."""

from __future__ import annotations

import argparse
import logging
import os

import ray

from crossray.config import add_config_flags


def job_parser(description: str) -> argparse.ArgumentParser:
    """`--config`, a `--section.field` flag for every config field, and `--address`."""
    p = argparse.ArgumentParser(description=description)
    add_config_flags(p)
    p.add_argument("--address", default=None, help="Ray address (default: start or join a local one)")
    return p


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def init_ray(address: str | None) -> None:
    """Join `address` or $RAY_ADDRESS (set by `ray job submit`); otherwise start a fresh local Ray.

    NOTE: a bare `ray.init()` joins whatever cluster /tmp/ray last recorded, even one started in
    another network namespace, and then waits minutes for it.
    """
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
             log_to_driver=False, ignore_reinit_error=True)
