"""What every job's main() shares: its parser (the run config, its flags, a Ray address), logging,
config loading, exit codes and error lines (`run_job`). Starting or joining Ray is `rayenv`'s."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from crossray.cli import error_line
from crossray.config import add_config_flags, load_config
from crossray.errors import explain, input_errors, remove_temporaries, write_failure_log
from crossray.schema import overrides_from
from rayenv import init_ray

T = TypeVar("T")


def job_parser(description: str) -> argparse.ArgumentParser:
    """`--config`, a `--section.field` flag for every config field, and `--address`."""
    p = argparse.ArgumentParser(description=description)
    add_config_flags(p)
    p.add_argument("--address", default=None, help="Ray address (default: start or join a local one)")
    return p


def run_job(parser: argparse.ArgumentParser, argv: list[str] | None, stage: str,
            prepare: Callable[[argparse.Namespace, Any], Any],
            work: Callable[[argparse.Namespace, Any, Any], T], out: Callable[[argparse.Namespace], str],
            render: Callable[[argparse.Namespace, T], dict]) -> int:
    """A stage job's main(): parse, log, load the config and `prepare(args, cfg)` (bad input: one
    error line, exit 2, before Ray starts), then start or join Ray and `work(args, cfg, prepared)`
    under `guarded` (logs beside `out(args)`), and print `render(args, result)` as one JSON line."""
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, overrides_from(args))
        prepared = prepare(args, cfg)
    except (ValueError, OSError) as e:
        error_line(e)
        return 2

    def body() -> T:
        init_ray(args.address)
        return work(args, cfg, prepared)

    code, result = guarded(body, local_folder(out(args)), stage)
    if result is None:
        return code
    print(json.dumps(render(args, result), default=str))
    return 0


def guarded(work: Callable[[], T], folder: Path, stage: str | Callable[[], str | None],
            tracking_uri: str | None = None) -> tuple[int, T | None]:
    """(0, work()), or the exit code: 2 with one line for bad input found late (`input_errors`: a
    missing revision, a bad task, a busy folder), 1 for a failure, any other ValueError among them
    (`report_failure`: the stage named, the traceback logged; `stage` may be read at failure time)."""
    try:
        return 0, work()
    except input_errors() as e:
        error_line(e)
        return 2, None
    except BaseException as e:  # noqa: BLE001 (every failure ends as one line plus a log file)
        where = stage() if callable(stage) else stage
        return report_failure(e, folder, where, tracking_uri), None


def report_failure(exc: BaseException, folder: Path, stage: str | None, tracking_uri: str | None = None
                   ) -> int:
    """An operational failure as one `crossray: error:` line (cause, where, what to do), the traceback
    in `<folder>/logs/`, temporaries removed; returns the exit code 1."""
    log = write_failure_log(folder, exc)
    remove_temporaries(folder)
    what = "interrupted" if isinstance(exc, KeyboardInterrupt) else explain(exc, stage, tracking_uri)
    error_line(f"{what} (full traceback: {log})")
    return 1


def local_folder(path: str) -> Path:
    """Where a job keeps its logs: the output folder, or the working directory for a remote URI."""
    return Path(path) if "://" not in path else Path.cwd()


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
