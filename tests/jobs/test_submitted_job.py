"""A real multi-node rehearsal the way users run it: `ray start --head` plus two `ray start --address`
worker nodes with their own resources (in a private PID namespace, so `ray stop` touches nothing
else), a tracking server, and the streamed tiny pipeline submitted with `ray job submit --working-dir .`.
Afterwards its registered crosscoder and tables are in MLflow, and its extraction actors and Train
workers ran on more than one node."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.helpers import free_port, small_pipeline_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.ray, pytest.mark.rehearsal]

NODES = """
import json, sys
from ray.util.state import list_actors
actors = list_actors(address=sys.argv[1], detail=True, limit=5000, raise_on_missing_output=False)
nodes = {}
for a in actors:
    if a.class_name and a.node_id:
        nodes.setdefault(a.class_name, set()).add(a.node_id)
print("NODES " + json.dumps({k: sorted(v) for k, v in nodes.items()}))
"""


def test_streamed_pipeline_submitted_to_a_three_node_cluster(mlflow_server, toy_dir, tmp_path):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root for a private PID namespace")
    config = small_pipeline_config(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    task = str(toy_dir / "tasks" / "simple_agreement.jsonl")
    cfg["pipeline"].update(out="runs", name="multinode", tasks=[task],
                           screen_revisions=["step0", "step128", "step1000"])
    cfg["extract"].update(mode="stream", batch_sequences=64)
    cfg["extract"]["corpus"]["n_sequences"] = 64
    cfg["train"].update(n_steps=150)
    cfg["launch"] = {"register_name": "toy-multinode", "actors": 2, "workers": 2}
    config.write_text(yaml.safe_dump(cfg))
    temp = tempfile.mkdtemp(prefix="crj", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dash = free_port(), free_port()
    bin_ = Path(sys.executable).parent

    def own_ports() -> str:  # every node's agents on free ports: the session's own Ray holds the defaults
        return (f"--dashboard-agent-listen-port={free_port()} --dashboard-agent-grpc-port={free_port()} "
                f"--runtime-env-agent-port={free_port()} --metrics-export-port={free_port()} "
                f"--ray-client-server-port={free_port()}")

    workers = "\n".join(  # each node its own temp dir, as on separate machines (runtime envs unpack there)
        f"{bin_}/ray start --address=127.0.0.1:{gcs} --num-cpus=1 --resources='{{\"node_{n}\": 1}}' "
        f"--temp-dir={temp}/{n} {own_ports()} >/dev/null" for n in "ab")
    script = f"""
set -e
{bin_}/ray start --head --port={gcs} --num-cpus=1 --resources='{{"node_head": 1}}' --temp-dir={temp} \\
    --dashboard-host=127.0.0.1 --dashboard-port={dash} --disable-usage-stats {own_ports()} >/dev/null
{workers}
set +e
export RAY_ADDRESS=http://127.0.0.1:{dash}
for try in $(seq 60); do  # the job agent answers a few seconds after `ray start` returns
  {bin_}/ray job submit --submission-id rehearsal --no-wait --working-dir {ROOT} -- \\
      {sys.executable} -m jobs.pipeline --config {config} --json >/dev/null 2>&1 && break
  sleep 1
done
{bin_}/ray job logs --follow rehearsal
{bin_}/ray job status rehearsal 2>&1 | grep -qi succeeded
echo "JOB_RC $?"
tail -n 40 $(ls -t {temp}/session_*/runtime_resources/working_dir_files/*/runs/multinode/logs/failure-*.log \
    2>/dev/null | head -1) 2>/dev/null || true
{sys.executable} -c '{NODES}' http://127.0.0.1:{dash}
{bin_}/ray stop --force >/dev/null 2>&1
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env.update(RAY_AUTH_MODE="token", MLFLOW_TRACKING_URI=mlflow_server, RAY_USAGE_STATS_ENABLED="0",
               HF_HUB_OFFLINE="1", CROSSRAY_PROGRESS_SECONDS="5")
    try:
        proc = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "bash", "-c", script], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=900)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    out = proc.stdout
    assert "JOB_RC 0" in out, out[-4000:] + proc.stderr[-3000:]
    summary = json.loads(next(line for line in reversed(out.splitlines()) if line.startswith("{")))
    nodes = json.loads(next(line for line in out.splitlines() if line.startswith("NODES "))[6:])
    extractors = set().union(*[v for k, v in nodes.items() if "RowExtractor" in k])
    workers = set().union(*[v for k, v in nodes.items() if "RayTrainWorker" in k])
    assert extractors and workers and len(extractors | workers) > 1, nodes
    # the results live in MLflow (the job's working directory is gone)
    client = MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias("toy-multinode", "champion")
    parent = summary["mlflow_run_id"]
    children = {r.data.tags["crossray.stage"]: r for r in client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")}
    assert version.run_id == children["train"].info.run_id
    tables = [f.path for f in client.list_artifacts(children["attribute"].info.run_id, "attribute/effects")]
    assert "attribute/effects/effects.parquet" in tables
    assert children["extract"].data.tags.get("crossray.extract_mode", "stream") == "stream"
