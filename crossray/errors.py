"""Operational failures as one line a person can act on, the traceback in a log file.

`explain(exc, stage, uri)` walks an exception's causes (Ray wraps remote errors, MLflow wraps HTTP
ones) to the root and says what failed, where, and what to do; `write_failure_log` keeps the whole
traceback under the run folder. Bad input is a ValueError caught before any compute, or one of
`INPUT_ERRORS` found later (exit code 2); everything else, a plain ValueError raised during compute
among it, is a failure (exit code 1) and reaches here.
"""

from __future__ import annotations

import errno
import re
import time
import traceback
from pathlib import Path
from typing import Literal

RESUME = "re-run the same command to resume"
TEMPORARY = re.compile(r"\.tmp\d*$")
"""Names of crossray's atomic-write temporaries (`store`, `extract.write_shard`)."""
TRACKING_ERRORS = {"ConnectionError", "MaxRetryError", "NewConnectionError", "ConnectTimeout", "ReadTimeout"}
SERVER_TROUBLE = {"TEMPORARILY_UNAVAILABLE"}
"""The error code of an MLflow exception that says its server is in trouble (the others, such as
INVALID_PARAMETER_VALUE, say what it refused; INTERNAL_ERROR is also every client-side default)."""
RAY_DEATHS = {"ActorDiedError", "WorkerCrashedError", "TrainingFailedError", "ActorUnavailableError",
              "RayActorError", "NodeDiedError", "ControllerError", "WorkerGroupError"}


class InputError(ValueError):
    """Bad input found only once compute has started: exit code 2 (a plain ValueError raised during
    compute is a failure, with its stage named and its log)."""


def input_errors() -> tuple[type[BaseException], ...]:
    """What counts as bad input when it is raised during compute."""
    from crossray.checkpoints import CheckpointError
    from crossray.lock import LockBusy
    from crossray.tasks import TaskError

    return InputError, CheckpointError, TaskError, LockBusy


def _tracking_lost(c: BaseException) -> bool:
    if type(c).__name__ in TRACKING_ERRORS or "Max retries exceeded" in str(c):
        return True
    return type(c).__name__ in ("MlflowException", "RestException") and \
        getattr(c, "error_code", None) in SERVER_TROUBLE


def causes(exc: BaseException) -> list[BaseException]:
    """The exception and what caused it, outermost first (Ray's `cause`, then __cause__/__context__)."""
    chain, seen = [], set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        chain.append(cur)
        seen.add(id(cur))
        nxt = getattr(cur, "cause", None)
        cur = nxt if isinstance(nxt, BaseException) else (cur.__cause__ or cur.__context__)
    return chain


def explain(exc: BaseException, stage: str | None, tracking_uri: str | None = None) -> str:
    """One line: the cause, where (path, URI, stage), and what to do."""
    where = f" in stage {stage}" if stage else ""
    chain = causes(exc)
    for c in chain:
        if isinstance(c, OSError) and c.errno == errno.ENOSPC:
            path = c.filename or "the output folder"
            return f"no space left on device writing {path}{where}: free space there, then {RESUME}"
    for c in chain:  # Ray Train and Ray Data pass worker errors on as text
        if (m := re.search(r"No space left on device(?:: '([^']+)')?", str(c))):
            path = m.group(1) or "the output folder"
            return f"no space left on device writing {path}{where}: free space there, then {RESUME}"
    names = {type(c).__name__ for c in chain}
    if any(_tracking_lost(c) for c in chain):
        return (f"the MLflow tracking server {tracking_uri or ''} stopped answering{where}: restart it, "
                f"then {RESUME}")
    mlflow = [c for c in chain if type(c).__name__ in ("MlflowException", "RestException")]
    if refused := next(iter(mlflow), None):
        return (f"MLflow refused what the run sent{where} ({_short(refused)}); {RESUME} once the cause is "
                f"fixed")
    if names & RAY_DEATHS:
        return f"Ray workers died beyond their retries{where} ({_short(chain[-1])}): {RESUME}"
    return f"{_short(chain[-1])}{where}; {RESUME} once the cause is fixed"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def write_failure_log(folder: Path, exc: BaseException) -> Path:
    """The whole traceback in `<folder>/logs/failure-<time>.log`; returns its path."""
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"failure-{time.strftime('%Y%m%d-%H%M%S')}.log"
    path.write_text("".join(traceback.format_exception(exc)))
    return path


def remove_temporaries(folder: Path) -> int:
    """Delete what an interrupted atomic write left (`*.tmp*` files and folders); returns the count."""
    import shutil

    found = [p for p in folder.rglob("*") if TEMPORARY.search(p.name)] if folder.exists() else []
    for p in sorted(found, key=lambda p: len(p.parts), reverse=True):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return len(found)


# -- live queries -----------------------------------------------------------------------------------

ErrorKind = Literal["invalid", "not_found", "unavailable", "failed"]
ERROR_KINDS: tuple[ErrorKind, ...] = ("invalid", "not_found", "unavailable", "failed")
"""invalid: the query cannot be answered as sent; not_found: it names a feature or checkpoint the run
lacks; unavailable: it could not be answered now (a deadline, a model not loaded); failed: a defect."""


def query_error(detail: str, kind: ErrorKind = "invalid") -> dict:
    """A live query's answer when it cannot be answered."""
    return {"error": kind, "detail": detail}
