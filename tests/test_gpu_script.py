"""`bench/gpu.sh`, the one prepared script for a GPU machine, cannot rot: its tiny mode runs every step
on the CPU at tiny shapes through the same commands (the pipeline end to end with every stage's device
checked, B1 and B2, extraction and attribution of random GPT-NeoX from a config file, the throughput
file, and the paper study's plan from it beside the assumed one)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from crossray.plan import load_throughput

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


def test_gpu_script_in_its_tiny_mode(toy_dir, ray_address, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(OUT=str(tmp_path), RAY_ADDRESS=ray_address)  # its run joins the session's cluster
    proc = subprocess.run(["bash", "bench/gpu.sh", "--tiny"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "FAILED" not in proc.stdout
    summary = json.loads((tmp_path / "run-tiny.out").read_text().strip().splitlines()[-1])
    assert summary["devices"] == dict.fromkeys(summary["stages"], "cpu") and len(summary["devices"]) == 7
    for name in ("b1_paper", "b2_paper", "extract_bfloat16", "extract_float32", "attribution"):
        assert json.loads((tmp_path / f"{name}.json").read_text())["machine"]["torch"]
    throughput = load_throughput(tmp_path / "throughput.json")
    assert throughput["attribution_examples_per_s"] > 0 and throughput["extract_shape"]["seq"] == 64
    assumed, measured = (json.loads((tmp_path / f"plan-{p}.out").read_text().strip().splitlines()[-1])
                         for p in ("assumed", "measured"))
    assert assumed["throughput"]["source"] == "assumed"
    assert measured["throughput"]["source"] == str(tmp_path / "throughput.json")
    # the same FLOPs, planned at the measured rate: the hours scale by assumed rate / measured rate
    rate = measured["throughput"]["flops_per_s"]["train"] / assumed["throughput"]["flops_per_s"]["train"]
    train = assumed["gpu_hours_by_stage"]["train"]
    assert measured["gpu_hours_by_stage"]["train"] == pytest.approx(train / rate)
    assert measured["gpu_hours"] != assumed["gpu_hours"]


def test_a_wrong_throughput_file_is_named(tmp_path):
    bad = tmp_path / "throughput.json"
    bad.write_text(json.dumps({"device": "x", "extract_flops_per_s": {"bfloat16": 1e12},
                               "train_flops_per_s": 0}))
    with pytest.raises(ValueError, match=r"needs positive model FLOP/s in extract_flops_per_s.float32, "
                                         r"train_flops_per_s"):
        load_throughput(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="throughput file .*throughput.json"):
        load_throughput(bad)
