"""One writer per run folder: a lock file that names its holder and works on shared storage.

`<run folder>.lock` (beside the folder, so nothing is created inside it before the run starts) is
created with O_CREAT | O_EXCL, which is atomic on local disks and on NFS, and holds the holder's
host and boot, PID namespace, PID and the kernel's start time of that process. The holder touches it
every `HEARTBEAT_S` seconds. A lock is stale when its holder is on this host in this PID namespace
and no process with that PID and that start time exists (a PID, and a PID namespace's inode, are
reused: `scripts/offline` starts every command in a new PID namespace, where the new run often has
the dead holder's PID itself), or, where the holder cannot be asked about, when its heartbeat is older
than `LOCAL_STALE_S` (this host, another PID namespace: the same clock) or `STALE_S` (another node);
a stale lock is taken over with a log line. A busy lock is an error naming the
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
LOCAL_STALE_S = 3 * HEARTBEAT_S
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


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (/proc/<pid>/stat, field 22): with the PID,
    what a later process cannot share. None when there is no such process (or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


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
        here = _pid_namespace()  # (a lock written without them: as before, this namespace and boot)
        local = info.get("host") == socket.gethostname() and info.get("boot", _boot_id()) == _boot_id()
        if local and info.get("pidns", here) == here:
            pid = int(info.get("pid", -1))
            if not _alive(pid):
                return True
            started = info.get("start_ticks")  # the PID alive, but is it the holder?
            return started is not None and _start_ticks(pid) != started
        return info["heartbeat_age_s"] > self.heartbeat_limit(info)

    @staticmethod
    def heartbeat_limit(info: dict) -> float:
        """How old the heartbeat of a holder this process cannot ask about may get."""
        return LOCAL_STALE_S if info.get("host") == socket.gethostname() else STALE_S

    def _try_create(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "boot": _boot_id(), "pidns": _pid_namespace(),
                       "pid": os.getpid(), "start_ticks": _start_ticks(os.getpid()),
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
                here = _pid_namespace()
                asked = info.get("pidns", here) == here and info.get("host") == socket.gethostname()
                beat = "" if asked else (
                    f" (its last heartbeat {info['heartbeat_age_s']:.0f} s ago; it runs where this process "
                    f"cannot see it, so if it was killed the lock is taken over once its heartbeat is "
                    f"{self.heartbeat_limit(info):.0f} s old)")
                raise LockBusy(f"{self.path.with_suffix('')} is in use by pid {info.get('pid')} on host "
                               f"{info.get('host')} since {info.get('started')}{beat}: wait for it to "
                               "finish, or pass --wait")
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
