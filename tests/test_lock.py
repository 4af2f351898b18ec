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
