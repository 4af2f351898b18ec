"""One writer per run folder: a lock file that names its holder and works on shared storage.

`<run folder>.lock` (beside the folder, so nothing is created inside it before the run starts) is
created with O_CREAT | O_EXCL, which is atomic on local disks and on NFS, and holds the holder's
host, PID namespace, PID and start time. The holder touches it every `HEARTBEAT_S` seconds. A lock is
stale when its holder is on this host in this PID namespace and its PID is gone, or when its heartbeat
is older than `STALE_S` (a holder on another node or in another PID namespace, which this process
cannot ask about); a stale lock is taken over with a log line. A busy lock is an error naming the
holder, or is waited for (`wait=True`). The same mechanism guards the shared cache's entries
(`crossray.cache`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)
HEARTBEAT_S = 10.0
STALE_S = 120.0


class LockBusy(ValueError):
    """The run folder is in use by another live run."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


class RunLock:
    def __init__(self, folder: Path, wait: bool = False, poll_s: float = 1.0):
        self.path = folder.with_name(folder.name + ".lock")
        self.wait, self.poll_s = wait, poll_s
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def holder(self) -> dict | None:
        try:
            age = time.time() - self.path.stat().st_mtime
            text = self.path.read_text()
        except OSError:
            return None
        try:
            info = json.loads(text)
        except ValueError:  # being written, or its writer died between creating and writing it
            info = {"unreadable": True}
        info["heartbeat_age_s"] = age
        return info

    def _stale(self, info: dict) -> bool:
        if info.get("unreadable"):
            return info["heartbeat_age_s"] > 5.0
        here = _pid_namespace()  # (a lock written without one: as before, this namespace)
        if info.get("host") == socket.gethostname() and info.get("pidns", here) == here:
            return not _alive(int(info.get("pid", -1)))
        return info["heartbeat_age_s"] > STALE_S

    def _try_create(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pidns": _pid_namespace(), "pid": os.getpid(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}, f)
        return True

    def acquire(self) -> None:
        waiting = False
        while not self._try_create():
            info = self.holder()
            if info is None:  # released meanwhile: try again
                continue
            stale = self._stale(info)
            if info.get("unreadable") and not stale:
                time.sleep(0.05)
                continue
            if stale:
                logger.warning("taking over the stale lock %s of pid %s on %s (started %s)", self.path,
                               info.get("pid"), info.get("host"), info.get("started"))
                self.path.unlink(missing_ok=True)
                continue
            if not self.wait:
                raise LockBusy(f"{self.path.with_suffix('')} is in use by pid {info.get('pid')} on host "
                               f"{info.get('host')} since {info.get('started')}: wait for it to finish, "
                               "or pass --wait")
            if not waiting:
                logger.info("waiting for %s, held by pid %s on %s since %s", self.path.with_suffix(""),
                            info.get("pid"), info.get("host"), info.get("started"))
                waiting = True
            time.sleep(self.poll_s)
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        info = self.holder()
        if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
