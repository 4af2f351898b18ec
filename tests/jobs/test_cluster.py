"""cluster.yaml passes Ray's own validation; extraction spreads over a real multi-node cluster."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from crossray.extract import Manifest, read_shard

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_yaml_is_valid_for_the_ray_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))
    assert cfg["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert cfg["available_node_types"]["gpu_worker"]["max_workers"] >= 1
    assert any("pip install" in c and "crossray" in c for c in cfg["setup_commands"])
    assert all("MLFLOW_TRACKING_URI" in " ".join(cfg[k]) for k in
               ("head_start_ray_commands", "worker_start_ray_commands"))
    bad = copy.deepcopy(cfg)
    bad["max_worker"] = 3
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(bad))


@pytest.mark.slow  # the multi-node rehearsal (test_submitted_job.py) runs actors on several nodes
@pytest.mark.ray
def test_extraction_on_three_nodes(toy_dir, tmp_path):
    out = tmp_path / "acts"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("multinode_extract.py")),
                           str(toy_dir), str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report["nodes"]) >= 2 and set(report["nodes"]) <= set(report["worker_nodes"])
    parts = [read_shard(p) for p in Manifest.read(out).shard_paths(out)]
    keys = np.concatenate([p[0] * 1000 + p[1] for p in parts])
    assert len(keys) == len(np.unique(keys)) == 64 * 31  # every (seq, pos) exactly once
