"""The pipeline against a real `mlflow server` on 127.0.0.1: runs, params, metrics, artifacts,
registry, lineage; a second run skips every stage; configs and bad input."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from crossray.config import load_config
from crossray.pipeline.runner import Pipeline
from crossray.pipeline.summary import summary_text
from crossray.tracking import check_tracking
from jobs.pipeline import run
from tests.helpers import free_port, registered_checkpoints, small_pipeline_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.ray


def test_pipeline_tracked_in_mlflow(tracked_run, mlflow_server, tmp_path):
    results, config = tracked_run
    text = summary_text(results)
    assert "FVE" in text and "models:/toy-test@champion" in text

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("crossray-toy")
    parent = client.get_run(results.mlflow_run_id)
    tags = parent.data.tags
    revisions = results.results["select"].revisions
    assert tags["crossray.family"] == "toy" and tags["crossray.layer"] == "2"
    assert tags["crossray.revisions"] == ",".join(revisions) and len(revisions) == 3
    assert len(tags["crossray.weight_hashes"].split(",")) == 3 and len(tags["crossray.corpus_hash"]) == 64
    assert tags["crossray.manifest"] == results.results["extract"].manifest_key
    assert tags["crossray.config"] == "small.yaml"  # a name, never a path of this machine
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_stage = {r.data.tags["crossray.stage"]: r for r in children}
    assert set(by_stage) == {"screen", "select", "extract", "train", "evaluate", "attribute", "analyse"}
    train = by_stage["train"]
    params = train.data.params
    assert params["train.n_steps"] == "600" and params["train.crosscoder.n_latents"] == "512"
    history = client.get_metric_history(train.info.run_id, f"fve/{revisions[0]}")
    assert [m.step for m in history] == [50 * i for i in range(1, 13)]
    evaluate = by_stage["evaluate"].data.metrics  # one naming scheme: fve/<revision> everywhere
    assert all(0 < evaluate[f"fve/{r}"] <= 1 and f"delta_ce/{r}" in evaluate for r in revisions)
    # MLflow stays lean: the extraction's manifest, never its activation shards
    extract_files = [f.path for f in client.list_artifacts(by_stage["extract"].info.run_id, "extract/acts")]
    assert extract_files == ["extract/acts/manifest.json"]
    assert len(client.get_metric_history(by_stage["screen"].info.run_id, "accuracy/simple_agreement")) == 5
    # artifacts: open the tables and the PNGs
    from PIL import Image

    png = client.download_artifacts(by_stage["analyse"].info.run_id, "analyse/accuracy_curves.png",
                                    str(tmp_path))
    with Image.open(png) as im:
        assert im.size[0] > 300 and im.format == "PNG"
    effects = client.download_artifacts(by_stage["attribute"].info.run_id,
                                        "attribute/effects/effects.parquet", str(tmp_path))
    df = pd.read_parquet(effects)
    assert set(df.checkpoint) == set(revisions) and len(df) == 6 * 512 * 3
    weights = client.download_artifacts(train.info.run_id, "train/crosscoder", str(tmp_path / "cc"))
    assert (Path(weights) / "weights.safetensors").exists() and (Path(weights) / "config.json").exists()
    version = client.get_model_version_by_alias("toy-test", "champion")
    assert version.run_id == train.info.run_id and version.source.endswith("train/crosscoder")
    # a second run reuses every stage and logs no new stage runs
    t0 = time.time()
    again = run(load_config(config), config.name)
    assert time.time() - t0 < 30 and again.mlflow_run_id == results.mlflow_run_id
    assert set(again.status.values()) == {"reused"}
    assert len(client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")) == 7


def test_killed_pipeline_resumes_training(tracked_run, tmp_path):
    """SIGKILL the whole pipeline during training; the re-run resumes from the last checkpoint."""
    import json

    reference, _ = tracked_run
    config = small_pipeline_config(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "jobs.pipeline", "--config", str(config)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    train_dir = tmp_path / "runs" / "tiny" / "train"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and registered_checkpoints(train_dir / "ray") < 1:
        time.sleep(0.1)
    assert proc.poll() is None, "the pipeline ended before training reached a checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (train_dir / "done.json").exists()
    again = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    train = json.loads((train_dir / "done.json").read_text())["result"]["final"]
    assert train["step"] == 600 and 50 <= train["resumed_from_step"] < 600
    evaluate = json.loads((tmp_path / "runs" / "tiny" / "evaluate" / "done.json").read_text())["result"]
    for name, value in reference.results["evaluate"].metrics.items():
        if name.startswith("fve/"):
            assert evaluate["metrics"][name] == pytest.approx(value, abs=0.01)
    assert "FVE" in again.stdout


def test_configs_parse_and_resolve():
    for name in ("tiny", "pythia-1b", "olmo-1b", "bloom-1b1"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        if name != "tiny":
            p = Pipeline(cfg, backend=None)  # resolves the hub family without touching the network
            assert len(cfg.pipeline.revisions) == 3 and not p.family.is_local
            labels = [p.family.revision(r).label for r in cfg.pipeline.revisions]
            assert labels[-1] in {"300B", "3048B", "341B"}
    bloom = load_config(ROOT / "configs" / "bloom-1b1.yaml").pipeline
    assert bloom.layer == 13 and bloom.tokenizer == "bigscience/bloom-1b1"


def test_bad_config_and_dead_server(tmp_path, monkeypatch):
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["train"]["n_step"] = 5
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=r"bad.yaml:train: unknown key\(s\) \['n_step'\]"):
        load_config(bad)
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["pipeline"]["layer"] = "two"
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=r"bad.yaml:pipeline.layer: expected int"):
        load_config(bad)
    port = free_port()  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
    t0 = time.time()
    with pytest.raises(ValueError, match=f"MLflow tracking server http://127.0.0.1:{port} does not answer"):
        check_tracking()
    assert time.time() - t0 < 20
