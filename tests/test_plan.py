"""`crossray plan`: the paper's configuration on paper, offline, and a Parquet run refused before any
compute when its shards would not fit the disk."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crossray.config import load_config
from crossray.plan import KNOWN_SHAPES, make_plan, model_shape

ROOT = Path(__file__).resolve().parents[1]


def crossray(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """The installed command with a bare environment (no Ray address, no tracking URI), sharing the
    session's toy family cache (`toy_dir` builds it there; another cache would build it again)."""
    exe = Path(sys.executable).parent / "crossray"
    cache = {k: os.environ[k] for k in ("CROSSRAY_CACHE", "HOME") if k in os.environ}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, timeout=120,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", **cache})


def plan(capsys, *args: str) -> subprocess.CompletedProcess:
    """`crossray plan ARGS` through the command's `main` in this process (the installed command in a
    bare environment: `crossray` above, once per file), as (exit code, stdout, stderr)."""
    from crossray.cli import main

    code = main(["plan", *args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["crossray", "plan", *args], code, out, err)


def test_plan_of_the_paper_run_is_about_5_tb_and_streams():
    proc = crossray("plan", "configs/pythia-1b.yaml", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    # 400,000 sequences x 1,023 rows x 3 checkpoints x 2,048 x 2 bytes (bf16)
    assert plan["activation_bytes"] == 400_000 * 1023 * 3 * 2048 * 2
    assert 4.9e12 < plan["activation_bytes"] < 5.2e12
    assert plan["mode"] == "stream" and plan["disk"]["activations"] == 0
    assert plan["disk_bytes"] < 200e9
    assert plan["tokens"] == 409_200_000 and plan["d_model"] == 2048
    assert plan["corpus_bytes"] == 400_240 * 1024 * 4  # the token ids, in Ray's object store
    assert 0.5 < plan["gpu_hours"] < 20 and plan["wall_hours"] < plan["gpu_hours"]

def test_plan_forced_to_parquet_writes_the_5_tb(capsys):
    proc = plan(capsys, str(ROOT / "configs" / "pythia-1b.yaml"), "--json", "--extract.mode", "parquet")
    assert json.loads(proc.stdout.strip().splitlines()[-1])["disk_bytes"] > 5e12


def test_plan_text_and_auto_mode_on_the_toy(toy_dir, capsys):
    proc = plan(capsys, str(ROOT / "configs" / "tiny.yaml"))
    assert proc.returncode == 0, proc.stderr
    assert "126,000 tokens x 3 checkpoints x d_model 64" in proc.stdout and "mode parquet" in proc.stdout
    cfg = load_config(ROOT / "configs" / "tiny.yaml", {"extract.max_disk_gb": "0.01"})
    assert make_plan(cfg, model_shape("toy", "step0"))["mode"] == "stream"  # 48 MB > 10 MB


def test_shapes_offline():
    assert model_shape("EleutherAI/pythia-1b", "step512") == KNOWN_SHAPES["pythia-1b"]
    for config in ("olmo-1b", "bloom-1b1"):  # every paper config plans offline
        cfg = load_config(ROOT / "configs" / f"{config}.yaml")
        assert make_plan(cfg, model_shape(cfg.pipeline.family, "main"))["tokens"] > 0
    with pytest.raises(ValueError, match="cannot tell the shape of someone/unknown-model"):
        model_shape("someone/unknown-model", "main")


def test_parquet_run_that_does_not_fit_is_refused_before_any_compute(tmp_path):
    """A billion sequences as Parquet: exit 2 with the sizes, no Ray, no run folder."""
    proc = crossray("run", str(ROOT / "configs" / "tiny.yaml"), "--extract.mode", "parquet",
                    "--extract.corpus.n_sequences", "1000000000", "--pipeline.out", str(tmp_path / "runs"),
                    cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("crossray: error: this configuration writes") and "free" in last, last
    assert "extract.mode: stream" in last
    assert not (tmp_path / "runs" / "tiny").exists() and "Started a local Ray" not in proc.stderr


def test_plan_from_measured_throughputs(tmp_path, capsys):
    """`--throughput FILE`: the GPU hours at the measured model FLOP/s (here half the assumed rates:
    twice the hours), and the plan says where its figures came from; without it, the assumption."""
    from crossray.plan import ASSUMED

    rates = ASSUMED["flops_per_s"]
    path = tmp_path / "throughput.json"
    path.write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3",
                                "extract_flops_per_s": {"bfloat16": rates["extract"] / 2,
                                                        "float32": rates["extract"] / 2},
                                "train_flops_per_s": rates["train"] / 2}))
    study = str(ROOT / "configs" / "pythia-1b-study.yaml")
    assumed = plan(capsys, study)
    measured = plan(capsys, study, "--throughput", str(path))
    assert assumed.returncode == measured.returncode == 0, measured.stderr
    assert "on H100s (assumed: 790 TFLOP/s bf16" in assumed.stdout
    assert f"on NVIDIA H100 80GB HBM3 (measured throughputs from {path})" in measured.stdout
    hours = [float(p.stdout.split("compute: ")[1].split()[0]) for p in (assumed, measured)]
    assert hours[1] == pytest.approx(2 * hours[0], rel=0.01)
    missing = plan(capsys, str(ROOT / "configs" / "pythia-1b.yaml"), "--throughput",
                   str(tmp_path / "none.json"))
    assert missing.returncode == 2 and "crossray: error: throughput file" in missing.stderr


def test_plan_refuses_a_study_the_run_would_refuse(tmp_path, capsys):
    """`crossray plan` applies the run's checks to a study's sets, with the same messages, exit 2: an
    unknown override key (named, with the fields allowed there), a nan learning rate, zero steps, an
    override of a setting the sets train together with, and a set given twice."""
    import yaml

    from crossray.cli import main

    base = yaml.safe_load((ROOT / "configs" / "tiny-study.yaml").read_text())
    path = tmp_path / "study.yaml"

    def plan(sets) -> str:
        path.write_text(yaml.safe_dump({**base, "study": {"sets": sets}}))
        assert main(["plan", str(path)]) == 2
        return capsys.readouterr().err

    odd = {"name": "odd", "revisions": ["step64", "step1000"]}
    cases = [(["train.nope=1"], "study set odd: unknown field 'train.nope': train has auxk_alpha"),
             (["train.lr=.nan"], "study set odd:"), (["train.n_steps=0"], "study set odd:"),
             (["train.batch_size=128"], "study set odd differs in train.batch_size")]
    for overrides, message in cases:
        assert message in plan([*base["study"]["sets"], {**odd, "overrides": overrides}]), overrides
    assert "is given twice" in plan(["adjacent", ["step64", "step128"]])
