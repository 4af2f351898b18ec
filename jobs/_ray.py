"""What every job's main() shares: its parser (the run config, its flags, a Ray address), logging,
and starting or joining Ray."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import ray

from crossray.config import add_config_flags, load_config
from crossray.errors import explain, remove_temporaries, write_failure_log
from crossray.schema import overrides_from

T = TypeVar("T")


def job_parser(description: str) -> argparse.ArgumentParser:
    """`--config`, a `--section.field` flag for every config field, and `--address`."""
    p = argparse.ArgumentParser(description=description)
    add_config_flags(p)
    p.add_argument("--address", default=None, help="Ray address (default: start or join a local one)")
    return p


def error_line(message: object) -> None:
    """The one line a job prints for bad input or a failure (stderr)."""
    print(f"crossray: error: {message}", file=sys.stderr)


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
    """(0, work()), or the exit code: 2 with one line for bad input found late (a ValueError, a busy
    run folder), 1 for a failure (`report_failure`; `stage` may be read at failure time)."""
    try:
        return 0, work()
    except ValueError as e:
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


def runtime_env(env_vars: dict[str, str] | None = None) -> dict:
    """The runtime env of every crossray job (merged with a submitted job's own): the worker setup
    hook, and Ray Train's controller polling its workers every 0.25 s unless
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S says otherwise.

    NOTE: a Train worker's report with a checkpoint waits for the controller's next poll (every 2 s
    by default): 15 checkpoints of a 400-step toy run cost 28 s of 49.
    """
    interval = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    return {"worker_process_setup_hook": "jobs._ray.import_torch",
            "env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": interval, **(env_vars or {})}}


def import_torch() -> None:
    """Worker setup hook: import torch once, before any task runs, with one intra-op thread.

    NOTE: a Ray worker imports the remote functions and classes it is sent in a background thread
    while its main thread runs a task; two threads importing torch at once leave one of them with a
    partially initialised torch ("module 'torch' has no attribute 'distributed'"), which failed a
    fresh cluster's extraction when a task imported torch lazily. Ray sets OMP_NUM_THREADS for a task
    only after this hook, too late for torch's thread pool: left alone, every worker ran as many
    threads as the machine has cores (four 0.5-CPU screening tasks on 2 cores took 15 s each instead
    of 1.7 s). Tasks and actors that compute call `use_assigned_cpus`.
    """
    import torch

    torch.set_num_threads(1)


def use_assigned_cpus() -> None:
    """As many torch threads as the CPUs Ray assigned this task or actor (at least one)."""
    import math

    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU") or 1
    torch.set_num_threads(max(1, math.floor(cpus)))


def compute_device(num_gpus: float) -> str:
    """The torch device of a task or actor that asked for `num_gpus`, its torch threads set to its
    CPUs."""
    import torch

    use_assigned_cpus()
    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


def init_ray(address: str | None) -> None:
    """Join `address` or $RAY_ADDRESS (set by `ray job submit`); otherwise start a fresh local Ray.

    NOTE: a bare `ray.init()` joins whatever cluster /tmp/ray last recorded, even one started in
    another network namespace, and then waits minutes for it.
    """
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
             log_to_driver=False, ignore_reinit_error=True,
             runtime_env=runtime_env())
