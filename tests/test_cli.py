"""The `crossray` command line: the happy path writes tables; bad input is one error line, exit 2."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from crossray.cli import main
from tests.conftest import save_tiny_family


def _error_lines(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    return [line for line in err if line.startswith("crossray: error:")]


def test_tasks_accuracy_writes_tables(toy_dir, tmp_path, capsys):
    out = tmp_path / "acc"
    rc = main(["tasks", "accuracy", "--family", str(toy_dir), "--revisions", "step0,step1000",
               "--task", str(toy_dir / "tasks" / "simple_agreement.jsonl"), "--out", str(out)])
    assert rc == 0
    df = pd.read_parquet(out / "accuracy.parquet")
    assert list(df.revision) == ["step0", "step1000"]
    assert df.prefix_accuracy.iloc[-1] >= 0.9
    assert pd.read_csv(out / "accuracy.csv").shape == df.shape
    meta = json.loads((out / "accuracy.json").read_text())
    assert meta["tasks"][0]["kept"] == 200 and meta["tasks"][0]["skipped"] == 0
    assert "simple_agreement" in capsys.readouterr().out


def test_checkpoints_check_prints_hashes(toy_dir, capsys):
    assert main(["checkpoints", "check", "--family", str(toy_dir), "--revisions",
                 "step0,step128,step1000", "--layer", "2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["revision"] for r in rows] == ["step0", "step128", "step1000"]
    assert all(len(r["weights_sha256"]) == 64 and r["d_model"] == 64 for r in rows)


def test_missing_revision(toy_dir, capsys):
    rc = main(["checkpoints", "check", "--family", str(toy_dir), "--revisions", "step0,step7"])
    assert rc == 2
    [line] = _error_lines(capsys)
    assert "'step7'" in line and "not found" in line


def test_missing_family_folder(tmp_path, capsys):
    rc = main(["tasks", "accuracy", "--family", str(tmp_path / "nope"), "--task", "x.jsonl"])
    assert rc == 2 and "does not exist" in _error_lines(capsys)[0]


def test_malformed_task_file(toy_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"sentence_good": "a", "sentence_bad": "b"}) + "\n"
                   + json.dumps({"sentence_good": "a"}) + "\n")
    rc = main(["tasks", "accuracy", "--family", str(toy_dir), "--revisions", "step0",
               "--task", str(bad), "--out", str(tmp_path / "out")])
    assert rc == 2
    [line] = _error_lines(capsys)
    assert "bad.jsonl:2" in line and "sentence_bad" in line
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_identical_checkpoints(tmp_path, capsys):
    root = save_tiny_family(tmp_path / "fam", "gpt_neox", ("step1", "step2"))
    shutil.copytree(root / "step2", root / "step5")
    rc = main(["checkpoints", "check", "--family", str(root)])
    assert rc == 2
    [line] = _error_lines(capsys)
    assert "'step2' and 'step5'" in line and "identical" in line


def test_layer_out_of_range(toy_dir, capsys):
    rc = main(["checkpoints", "check", "--family", str(toy_dir), "--revisions", "step0,step32",
               "--layer", "9"])
    assert rc == 2
    [line] = _error_lines(capsys)
    assert "layer 9 out of range" in line and "4 blocks" in line


def test_console_script_exit_code(tmp_path):
    """The installed entry point maps errors to exit code 2 with one error line."""
    proc = subprocess.run([sys.executable, "-m", "crossray.cli", "checkpoints", "check",
                           "--family", str(tmp_path / "missing")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("crossray: error: family folder")


@pytest.mark.parametrize("argv", [["toy"], ["tasks", "accuracy"], ["nope"]])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


def test_ctrl_c_while_checking_the_configuration_is_one_line(tmp_path, monkeypatch, capsys):
    """Validation can take a while (a study's thousands of sets); Ctrl-C there ends with one line and
    exit 1, the run folder's lock released and nothing started."""
    from crossray.pipeline.runner import Pipeline
    from jobs.pipeline import main as run_main

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Pipeline, "validate", interrupted)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    code = run_main(["--config", str(config), "--pipeline.out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert [x for x in err.splitlines() if x.startswith("crossray: error:")] == [
        "crossray: error: interrupted while checking the configuration; nothing was started"]
    assert not list((tmp_path / "runs").glob("*.lock")) and not (tmp_path / "runs" / "tiny").exists()
