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
    assert seconds < 20, f"took {seconds:.1f} s"
    assert not (tmp_path / "runs" / "tiny").exists()  # no run folder
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # no MLflow run either


def test_empty_task_file_fails_before_any_compute(toy_dir, tmp_path):
    empty = tmp_path / "nothing.jsonl"
    empty.write_text('{"sentence_good": "a", "sentence_bad": "a"}\n')  # two-prefix-free, no usable pair
    proc, _ = _run(tmp_path, "--pipeline.tasks", str(empty))
    assert proc.returncode == 2
    assert "crossray: error: task nothing" in proc.stderr and "no example" in proc.stderr
    assert not (tmp_path / "runs" / "tiny").exists()
