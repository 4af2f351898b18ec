"""A real multi-node rehearsal the way users run it: `ray start --head` plus two `ray start --address`
worker nodes with their own resources (`rehearsal.sh`, in a private PID namespace, so `ray stop`
touches nothing else; a node that misses Ray's registration wait is waited for, then started again,
and one that never comes up is named with its logs), a tracking server, and the smallest toy study
(one adjacent pair: two actors and two Train workers, which the three one-CPU nodes must spread),
streamed, submitted with `ray job submit --working-dir .`. Afterwards the set's registered
crosscoder and tables are in MLflow under the study's run, and its extraction actors and Train
workers ran on more than one node. (Sets sharing one extraction and one Train job, and the four-set
study shaped like the paper's: test_study.py.)"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.helpers import free_port, light_study_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.ray, pytest.mark.rehearsal]


def test_streamed_study_submitted_to_a_three_node_cluster(mlflow_server, toy_dir, tmp_path):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root for a private PID namespace")
    config = light_study_config(tmp_path, toy_dir)
    cfg = yaml.safe_load(config.read_text())
    revisions = ["step64", "step128"]
    cfg["pipeline"].update(out="runs", name="multinode", revisions=revisions, screen_revisions=revisions)
    cfg["study"] = {"sets": ["adjacent"]}
    cfg["extract"].update(mode="stream", batch_sequences=48)
    cfg["train"].update(n_steps=60, checkpoint_every=30, metrics_every=30)
    # one extraction actor of a whole node (so on a node of its own) and two Train workers of half a CPU
    cfg["launch"] = {"register_name": "toy-multinode", "actors": 1, "cpus_per_actor": 1.0, "workers": 2}
    config.write_text(yaml.safe_dump(cfg))
    temp = tempfile.mkdtemp(prefix="crj", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    # its own token: `ray start --head` in token mode refuses to start without one, and on a fresh machine
    # no ~/.ray/auth_token exists before the first ray.init
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex)
    env.update(MLFLOW_TRACKING_URI=mlflow_server, RAY_USAGE_STATS_ENABLED="0",
               HF_HUB_OFFLINE="1", CROSSRAY_PROGRESS_SECONDS="5", PY=sys.executable, ROOT=str(ROOT),
               CONFIG=str(config), TEMP=temp, GCS=str(free_port()), DASH=str(free_port()))
    try:  # a private PID namespace: `ray stop` touches nothing else, and all dies with it (--kill-child)
        proc = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "bash",
                               str(Path(__file__).with_name("rehearsal.sh"))],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    out = proc.stdout
    assert "NODE_FAILED" not in out, "a node of the rehearsal cluster did not start:\n" + out[-6000:]
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-3000:]
    assert "JOB_RC 0" in out, out[-4000:] + proc.stderr[-3000:]
    summary = json.loads(next(line for line in reversed(out.splitlines()) if line.startswith("{")))
    nodes = json.loads(next(line for line in out.splitlines() if line.startswith("NODES "))[6:])
    extractors = set().union(*[v for k, v in nodes.items() if "RowExtractor" in k])
    workers = set().union(*[v for k, v in nodes.items() if "RayTrainWorker" in k])
    assert extractors and workers and len(extractors | workers) > 1, nodes
    # the results live in MLflow (the job's working directory is gone): every set under the study's run
    client = MlflowClient(mlflow_server)
    assert summary["study"] == "multinode" and not summary["failed"]
    assert list(summary["sets"]) == ["step64-step128"]
    experiment = client.get_run(summary["mlflow_run_id"]).info.experiment_id
    shared = {r.data.tags.get("crossray.stage"): r for r in client.search_runs(
        [experiment], f"tags.`mlflow.parentRunId` = '{summary['mlflow_run_id']}'")}
    assert shared["extract"].data.tags.get("crossray.extract_mode") == "stream"
    for name, s in summary["sets"].items():
        version = client.get_model_version_by_alias(f"toy-multinode-{name}", "champion")
        children = {r.data.tags["crossray.stage"]: r for r in client.search_runs(
            [experiment], f"tags.`mlflow.parentRunId` = '{s['mlflow_run_id']}'")}
        assert version.run_id == children["train"].info.run_id
        attribute = children["attribute"].info.run_id
        tables = [f.path for f in client.list_artifacts(attribute, "attribute/effects")]
        assert "attribute/effects/effects.parquet" in tables
    assert "study/study.html" in [f.path for f in client.list_artifacts(summary["mlflow_run_id"], "study")]
