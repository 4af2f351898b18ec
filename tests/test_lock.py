"""The run-folder lock: one writer, the holder named, stale locks taken over, --wait."""

import json
import logging
import os
import socket
import subprocess
import threading
import time

import pytest

from crossray import lock as L


def _hold(path, pid, host=None, age=0.0):
    path.write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid, "started": "then"}))
    if age:
        os.utime(path, (time.time() - age, time.time() - age))


def test_busy_folder_names_its_holder(tmp_path):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        lock = L.RunLock(tmp_path / "tiny")
        _hold(lock.path, sleeper.pid)
        with pytest.raises(L.LockBusy, match=rf"in use by pid {sleeper.pid} on host {socket.gethostname()} "
                                             r"since then: wait for it to finish, or pass --wait"):
            lock.acquire()
        assert not (tmp_path / "tiny").exists()  # nothing created inside the run folder
    finally:
        sleeper.kill()


def test_dead_holder_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = L.RunLock(tmp_path / "tiny")
    _hold(lock.path, dead.pid)
    with caplog.at_level(logging.WARNING), lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert "taking over the stale lock" in caplog.text and not lock.path.exists()


def test_holder_on_another_node_is_judged_by_its_heartbeat(tmp_path):
    lock = L.RunLock(tmp_path / "tiny")
    _hold(lock.path, 1, host="elsewhere", age=10)
    with pytest.raises(L.LockBusy, match="on host elsewhere"):
        lock.acquire()
    _hold(lock.path, 1, host="elsewhere", age=L.STALE_S + 5)
    with lock:
        assert json.loads(lock.path.read_text())["host"] == socket.gethostname()


def test_wait_takes_the_lock_once_released(tmp_path):
    first = L.RunLock(tmp_path / "tiny")
    first.acquire()
    threading.Timer(0.5, first.release).start()
    t0 = time.time()
    with L.RunLock(tmp_path / "tiny", wait=True, poll_s=0.05):
        assert time.time() - t0 >= 0.4


def test_a_live_process_with_the_holders_pid_is_not_the_holder(tmp_path, caplog):
    """PIDs are reused: the lock names its holder's start time too, and a live process with the same
    PID but another start time (here this very process) does not hold it."""
    lock = L.RunLock(tmp_path / "tiny")
    lock.path.write_text(json.dumps({"host": socket.gethostname(), "boot": L._boot_id(),
                                     "pidns": L._pid_namespace(), "pid": os.getpid(),
                                     "start_ticks": L._start_ticks(os.getpid()) - 1, "started": "then"}))
    with caplog.at_level(logging.WARNING), lock:
        assert json.loads(lock.path.read_text())["start_ticks"] == L._start_ticks(os.getpid())
    assert "taking over the stale lock" in caplog.text


HOLD_AND_DIE = """
import os, signal, sys
from pathlib import Path
from crossray.lock import RunLock
RunLock(Path(sys.argv[1])).acquire()
os.kill(os.getpid(), signal.SIGKILL)
"""
TAKE = """
import json, sys
from pathlib import Path
from crossray.lock import RunLock
with RunLock(Path(sys.argv[1]), wait=True, poll_s=0.05) as lock:
    print("held by", json.loads(lock.path.read_text())["pid"])
"""


def test_a_run_killed_in_one_pid_namespace_resumes_in_a_new_one(tmp_path):
    """As `scripts/offline` runs every command: the holder is SIGKILLed in its own PID namespace, and the
    same command runs again in a new one, where it often has the dead holder's PID (2) and may even
    get the old namespace's inode. Its heartbeat is made as old as a killed run's becomes after a
    while (40 s): the new run takes the lock, whichever way the namespaces came out."""
    import shutil
    import sys
    from pathlib import Path

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root for PID namespaces")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    folder = tmp_path / "tiny"

    def in_a_new_pid_namespace(code: str) -> subprocess.CompletedProcess:  # the shell is PID 1, Python 2
        cmd = ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", '"$@"; exit $?', "sh"]
        return subprocess.run([*cmd, sys.executable, "-c", code, str(folder)], env=env, capture_output=True,
                              text=True, timeout=60)

    first = in_a_new_pid_namespace(HOLD_AND_DIE)
    held = json.loads((tmp_path / "tiny.lock").read_text())
    assert first.returncode == 137 and held["pid"] == 2 and held["pidns"] != L._pid_namespace()
    os.utime(tmp_path / "tiny.lock", (time.time() - 40, time.time() - 40))
    again = in_a_new_pid_namespace(TAKE)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "held by 2" in again.stdout and "taking over the stale lock" in again.stderr
