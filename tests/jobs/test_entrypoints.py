"""`python -m jobs.extract` then `python -m jobs.train`: the entrypoints end to end, and their errors."""

import json
from pathlib import Path

import pytest
import yaml

from crossray.store import load_crosscoder
from jobs import extract as extract_job
from jobs import train as train_job

pytestmark = pytest.mark.ray


def _config(tmp_path, **train_overrides):
    cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml").read_text())
    cfg["extract"]["corpus"]["n_sequences"] = 160
    cfg["extract"]["shard_sequences"] = 64
    cfg["train"].update(n_steps=60, batch_size=256, checkpoint_every=30, **train_overrides)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_extract_then_train(ray_cluster, tmp_path, capsys):
    config = _config(tmp_path)
    assert extract_job.main(["--config", str(config), "--out", str(tmp_path / "acts"),
                             "--pipeline.revisions", "step0,step128,step1000"]) == 0
    extracted = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert extracted["shards"] == 3 and extracted["rows"] > 0
    assert train_job.main(["--config", str(config), "--data", str(tmp_path / "acts"),
                           "--storage", str(tmp_path / "train"), "--launch.workers", "2",
                           "--train.n_steps", "40"]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cc = load_crosscoder(trained["crosscoder"])
    assert cc.cfg.revisions == ("step0", "step128", "step1000") and cc.cfg.layer == 2
    assert trained["metrics"]["step"] == 40 and trained["metrics"]["fve"] > 0


def test_config_errors_exit_2(ray_cluster, tmp_path, capsys):
    bad = yaml.safe_load(_config(tmp_path).read_text())
    bad["extract"]["corpus"]["sequence_length"] = 64
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert extract_job.main(["--config", str(path), "--out", str(tmp_path / "x"),
                             "--pipeline.revisions", "step0,step1000"]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml:extract.corpus" in err and "sequence_length" in err
    assert extract_job.main(["--config", str(_config(tmp_path)), "--out", str(tmp_path / "x")]) == 2
    assert "no checkpoint set: give --pipeline.revisions" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    bad = yaml.safe_load(_config(tmp_path).read_text())
    bad["train"]["lr"] = "fast"
    path.write_text(yaml.safe_dump(bad))
    assert train_job.main(["--config", str(path), "--data", str(tmp_path / "none"),
                           "--storage", str(tmp_path / "t")]) == 2
    assert "bad.yaml:train.lr: expected float, got str 'fast'" in capsys.readouterr().err
    assert train_job.main(["--config", str(_config(tmp_path)), "--train.lr", "fast", "--data", "x",
                           "--storage", "t"]) == 2  # a flag is checked like the file
    assert "train.lr: expected float, got str 'fast'" in capsys.readouterr().err
    good = _config(tmp_path)
    assert train_job.main(["--config", str(good), "--data", str(tmp_path / "none"),
                           "--storage", str(tmp_path / "t")]) == 2
    assert "manifest.json does not exist" in capsys.readouterr().err
