"""Failures become one line naming the cause, where, and what to do."""

import errno

from crossray.errors import explain, remove_temporaries


class WorkerGroupError(RuntimeError):  # the shape of Ray Train's: the worker's error as text
    pass


def test_explain_finds_the_root_cause():
    shard = "/data/runs/tiny/extract/acts/shard-000001.parquet"
    disk = OSError(errno.ENOSPC, "No space left on device", shard)
    try:
        try:
            raise disk
        except OSError as e:
            raise RuntimeError("task failed") from e
    except RuntimeError as wrapped:
        line = explain(wrapped, "extract")
    assert line == ("no space left on device writing /data/runs/tiny/extract/acts/shard-000001.parquet in "
                    "stage extract: free space there, then re-run the same command to resume")
    text = WorkerGroupError("worker 0: OSError: [Errno 28] No space left on device: '/x/ckpt/weights'")
    assert "writing /x/ckpt/weights in stage train" in explain(text, "train")
    mlflow_down = ConnectionError("HTTPConnectionPool(host='127.0.0.1'): Max retries exceeded with url")
    assert explain(mlflow_down, "train", "http://127.0.0.1:5000") == (
        "the MLflow tracking server http://127.0.0.1:5000 stopped answering in stage train: restart it, "
        "then re-run the same command to resume")
    assert explain(KeyError("x"), None).startswith("KeyError: 'x'; re-run the same command")


def test_temporaries_are_removed(tmp_path):
    (tmp_path / "a" / "tables.tmp").mkdir(parents=True)
    (tmp_path / "shard-000001.parquet.tmp1234").write_text("half")
    (tmp_path / "keep.parquet").write_text("whole")
    assert remove_temporaries(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "keep.parquet"]


def test_only_a_lost_tracking_server_is_called_one():
    """MLflow refusing a value (a bad metric name) is said as such; the tracking-server message is kept
    for a server that stopped answering (its connection errors, or MLflow's own server-trouble codes)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

    uri = "http://127.0.0.1:5000"
    refused = MlflowException("Invalid metric name: 'accuracy/subj+verb (v2)'", INVALID_PARAMETER_VALUE)
    line = explain(refused, "screen", uri)
    assert "stopped answering" not in line and "Invalid metric name" in line
    assert line.startswith("MLflow refused what the run sent in stage screen")
    lost = MlflowException("API request to /api/2.0/mlflow/runs/log-batch failed with error code 503",
                           TEMPORARILY_UNAVAILABLE)
    assert f"tracking server {uri} stopped answering" in explain(lost, "screen", uri)


def test_a_failure_during_compute_names_its_stage_and_keeps_its_log(tmp_path, capsys):
    """Only bad input exits 2 (found before compute, or a late `InputError`, missing revision, bad task
    or busy folder); a plain ValueError raised while a stage computes is a failure: exit 1, the stage
    named, the traceback in the run folder's logs."""
    from crossray.errors import InputError
    from crossray.tasks import TaskError
    from jobs._ray import guarded

    def broken():
        raise ValueError("x and y must have same first dimension")

    code, result = guarded(broken, tmp_path, lambda: "analyse")
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("crossray: error:")]
    assert (code, result) == (1, None) and "in stage analyse" in line and "x and y must have" in line
    [log] = (tmp_path / "logs").glob("failure-*.log")
    assert "ValueError: x and y must have same first dimension" in log.read_text()
    for late in (InputError("batch_size 255 is not divisible by 2 workers"), TaskError("task t: no example")):
        def bad_input(late=late):
            raise late

        assert guarded(bad_input, tmp_path / "other", "train") == (2, None)
        assert not (tmp_path / "other").exists()  # no failure log for bad input
