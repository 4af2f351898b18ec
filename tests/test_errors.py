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
