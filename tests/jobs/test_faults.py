"""Failure modes a user meets: bad input is refused before Ray starts, with one error line and
nothing written."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path, *flags, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(var, None)
    t0 = time.time()
    cmd = [sys.executable, "-m", "jobs.pipeline", "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--pipeline.out", str(tmp_path / "runs"), *flags]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    return proc, time.time() - t0


@pytest.mark.parametrize(("flags", "message"), [
    (["--pipeline.n_checkpoints", "50"], "n_checkpoints is 50 but only 12 revisions are screened"),
    (["--pipeline.layer", "9"], "layer 9 out of range for toy@step0 with 4 blocks"),
    (["--pipeline.revisions", "step0,step7"], "revision 'step7' of family toy not found"),
    (["--pipeline.screen_revisions", "step0,step5"], "revision 'step5' of family toy not found"),
])
def test_bad_plan_fails_before_any_compute(toy_dir, tmp_path, flags, message):
    proc, seconds = _run(tmp_path, *flags)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("crossray: error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "Ray instance" not in proc.stderr  # refused before Ray started
    assert not (tmp_path / "runs" / "tiny").exists()  # no run folder
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # no MLflow run either


def test_empty_task_file_fails_before_any_compute(toy_dir, tmp_path):
    empty = tmp_path / "nothing.jsonl"
    empty.write_text('{"sentence_good": "a", "sentence_bad": "a"}\n')  # two-prefix-free, no usable pair
    proc, _ = _run(tmp_path, "--pipeline.tasks", str(empty))
    assert proc.returncode == 2
    assert "crossray: error: task nothing" in proc.stderr and "no example" in proc.stderr
    assert not (tmp_path / "runs" / "tiny").exists()


@pytest.mark.ray
def test_disk_full_during_extraction(toy_dir, ray_address, tmp_path):
    """Out of space while writing shards: exit 1, one line naming the cause and what to do, the
    traceback in a log file, no temporary file left. The run folder sits on a 40 MB tmpfs (root only):
    room enough for the plan's check before the run, then filled by another writer (all but 256 KB)
    once the extract stage starts. In the suite's own namespaces (`scripts/offline`) the tmpfs is
    mounted there, seen by the session's Ray that the run joins, and gone with the namespace;
    elsewhere in a private mount namespace of the run's own, with a Ray of its own."""
    import shutil

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root for a private tmpfs")
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    from tests.helpers import light_pipeline_config

    config = light_pipeline_config(tmp_path, toy_dir, mnt, changes=_faster(tmp_path, toy_dir))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    own_namespace = os.environ.get("CROSSRAY_OWN_PIDNS") == "1"
    if own_namespace:
        env["RAY_ADDRESS"] = ray_address
    else:
        env.pop("RAY_ADDRESS", None)
    filler = (f"while [ ! -e {mnt}/tiny/extract/started.json ]; do sleep 0.05; done; "
              f"dd if=/dev/zero of={mnt}/filler bs=1K "
              f"count=$(( $(df --output=avail -k {mnt} | tail -1) - 256 )) 2>/dev/null")
    script = (f"mount -t tmpfs -o size=40m tmpfs {mnt} || exit 77; ({filler}) & filler=$!; "
              f"{sys.executable} -m jobs.pipeline --config {config}; echo rc=$?; "
              f"kill $filler 2>/dev/null; wait $filler; "
              f"echo temporaries: $(find {mnt} -name '*.tmp*' | wc -l); "
              f"echo in the log: $(grep -c 'No space left on device' {mnt}/tiny/logs/failure-*.log); "
              f"umount {mnt}")
    prefix = [] if own_namespace else ["unshare", "-m"]
    proc = subprocess.run([*prefix, "sh", "-c", script], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode == 77:
        pytest.skip("tmpfs cannot be mounted here")
    assert "rc=1" in proc.stdout, proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("crossray: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "no space left on device" in errors[0] and "stage extract" in errors[0]
    assert "free space there, then re-run the same command to resume" in errors[0]
    assert f"{mnt}/tiny/logs/failure-" in errors[0]
    assert "Traceback" not in proc.stderr
    assert "temporaries: 0" in proc.stdout
    assert "in the log: 0" not in proc.stdout and "in the log: " in proc.stdout  # the real error, kept


def _mlflow_server(root: Path, port: int | None = None):
    """A tracking server on 127.0.0.1 (at `port`: the same one again after a restart), answering."""
    from tests.helpers import TrackingServer

    server = TrackingServer(root, port)
    if not server.wait_ready():
        server.stop()
        raise AssertionError("mlflow server did not start")
    return server


def _faster(tmp_path: Path, toy_dir: Path) -> dict:
    """The light run's changes for a fault test, which checks the fault, not the tables: its task cut
    to its first 40 rows (screening and attribution in a fifth of the time) and only the pinned set
    screened. Extraction and training stay the light run's, so the crosscoder compares with it."""
    rows = (toy_dir / "tasks" / "simple_agreement.jsonl").read_text().splitlines()[:40]
    task = tmp_path / "simple_agreement.jsonl"
    task.write_text("\n".join(rows) + "\n")
    return {"pipeline.tasks": [str(task)], "pipeline.screen_revisions": ["step0", "step128", "step1000"]}


def _wait(condition, proc: subprocess.Popen, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None and not condition():
        time.sleep(0.1)
    assert condition(), f"{what} did not happen (the run ended with {proc.poll()})"


@pytest.fixture(scope="module")
def interrupted(ray_address, toy_dir, tmp_path_factory):
    """One run folder through the interruptions a user meets, each followed by the same command (the
    light run's config, checkpointed every 10 steps; each run a driver joining the session's Ray
    cluster, as on a shared cluster: a killed driver's actors and Train workers end with it, the
    cluster lives on). Here its first run: a second run of the folder while the first holds it, then
    the MLflow server stopped after screening. A namespace with the command, its environment, the
    folder, the server, and what the first two runs did (`first`, `second`); the tests below go on
    from there, in file order."""
    import types

    from tests.helpers import kill_tree, light_pipeline_config

    tmp_path = tmp_path_factory.mktemp("interrupted")
    server = _mlflow_server(tmp_path / "mlflow")
    config = light_pipeline_config(tmp_path, toy_dir, changes={"train.checkpoint_every": 10,
                                                               **_faster(tmp_path, toy_dir)})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": server.uri,
           "RAY_ADDRESS": ray_address}
    ns = types.SimpleNamespace(cmd=[sys.executable, "-m", "jobs.pipeline", "--config", str(config)], env=env,
                               folder=tmp_path / "runs" / "tiny", server=server)
    run = subprocess.Popen(ns.cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    try:
        _wait(lambda: (ns.folder.parent / "tiny.lock").exists(), run, 120, "the lock")
        # the same command while the first run holds the folder
        ns.second = subprocess.run(ns.cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        _wait(lambda: (ns.folder / "select" / "done.json").exists(), run, 300, "screening")
        ns.server.stop()  # the tracking server goes away
        _, stderr = run.communicate(timeout=300)
        ns.first = types.SimpleNamespace(pid=run.pid, returncode=run.returncode, stderr=stderr)
    finally:
        kill_tree(run.pid)  # (whatever is left of it)
    yield ns
    ns.server.stop()


@pytest.mark.ray
def test_a_held_folder_is_refused_and_a_lost_tracking_server_ends_the_run(interrupted):
    """1. A second run of the folder while the first holds it is refused at once, naming the holder;
    2. the MLflow server stops after screening: exit 1 with one line saying so."""
    second, first = interrupted.second, interrupted.first
    assert second.returncode == 2
    [line] = [x for x in second.stderr.splitlines() if x.startswith("crossray: error:")]
    assert f"is in use by pid {first.pid}" in line and "--wait" in line
    assert first.returncode == 1, first.stderr[-3000:]
    errors = [x for x in first.stderr.splitlines() if x.startswith("crossray: error:")]
    assert len(errors) == 1 and "MLflow tracking server" in errors[0] and "restart it" in errors[0], \
        first.stderr[-3000:]
    assert "Traceback" not in first.stderr


@pytest.mark.ray
def test_a_killed_run_resumes_from_its_last_checkpoint(interrupted, light_chain):
    """The same folder, its tracking server back: 3. the run is SIGKILLed during training; 4. the
    next run takes over the stale lock, closes the killed stage run as KILLED, resumes from the last
    Ray Train checkpoint, and its crosscoder is as good as the uninterrupted one's (the session's light
    run: the same data and training, checkpointed every 20 steps, not 10)."""
    import json

    from mlflow import MlflowClient

    from tests.helpers import kill_tree, registered_checkpoints

    _, reference = light_chain.first
    ns = interrupted
    folder = ns.folder
    # 3. the server back on its port; the same command, SIGKILLed while training
    ns.server = _mlflow_server(ns.server.root, ns.server.port)
    run = subprocess.Popen(ns.cmd, env=ns.env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        _wait(lambda: registered_checkpoints(folder / "train" / "ray") >= 1, run, 400, "a checkpoint")
        kill_tree(run.pid)  # the driver, as a crash would
        run.wait()
        assert not (folder / "train" / "done.json").exists()
        # 4. the same command again
        again = subprocess.run(ns.cmd, env=ns.env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "taking over the stale lock" in again.stderr and "FVE" in again.stdout
        client = MlflowClient(ns.env["MLFLOW_TRACKING_URI"])
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert not [r for r in runs if r.info.status == "RUNNING"]  # every run ended
        stages = {}
        for r in runs:
            stages.setdefault(r.data.tags.get("crossray.stage"), []).append(r.info.status)
        assert sorted(stages["train"]) == ["FINISHED", "KILLED"], stages  # closed by the last run
        assert stages["extract"].count("FINISHED") == 1, stages
    finally:
        kill_tree(run.pid)  # (whatever is left of it)
        ns.server.stop()
    train = json.loads((folder / "train" / "done.json").read_text())["result"]["final"]
    assert train["step"] == 100 and 10 <= train["resumed_from_step"] < 100
    evaluate = json.loads((folder / "evaluate" / "done.json").read_text())["result"]
    for name, value in reference.evaluate.metrics.items():
        if name.startswith("fve/"):
            assert evaluate["metrics"][name] == pytest.approx(value, abs=0.01)


def test_a_submitted_job_does_not_lose_its_results(tmp_path):
    """As a Ray job (RAY_ADDRESS set, as `ray job submit` sets it) with a relative output folder and
    no tracking server, the results would sit in the job's temporary working directory: refused
    before anything starts."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "127.0.0.1:1"}  # nothing listens there
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "jobs.pipeline", "--config", str(ROOT / "configs" / "tiny.yaml")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("crossray: error:")]
    assert "pipeline.out 'runs' would lose the results" in line and "MLFLOW_TRACKING_URI" in line
    assert not (tmp_path / "runs").exists()
