"""jobs.attribute: the Ray fan-out over tasks x checkpoints x example shards equals one process."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from crossray.attribution import task_effects
from crossray.checkpoints import CheckpointError, Family
from crossray.config import AttributionConfig, CrosscoderSettings, TrainSettings
from crossray.extract import Manifest, shuffled_batches
from crossray.models.crosscoder import Crosscoder
from crossray.models.layer import load_layer_model
from crossray.tasks import load_task
from crossray.train import Trainer
from jobs import attribute as attribute_job
from jobs.train import resolve_with_manifest

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def crosscoder_dir(toy_acts, tmp_path_factory):
    m = Manifest.read(toy_acts)
    cfg = resolve_with_manifest(TrainSettings(crosscoder=CrosscoderSettings(n_latents=64, seed=0),
                                              n_steps=40, batch_size=256, lr=2e-3), m)
    cc = Crosscoder(cfg.crosscoder)
    cc.norm_factors_C.copy_(torch.tensor(m.norm_factors))
    trainer = Trainer(cc, cfg, "cpu")
    trainer.fit(shuffled_batches(m.shard_paths(toy_acts), 256, 2048, 0), progress=False)
    return trainer.save(tmp_path_factory.mktemp("cc") / "crosscoder")


def test_distributed_attribution_equals_one_process(ray_cluster, crosscoder_dir, toy_dir, toy_family,
                                                    toy_tokenizer, tmp_path):
    tasks = [str(toy_dir / "tasks" / f"{t}.jsonl") for t in ("simple_agreement", "agreement_across_pp")]
    cfg = AttributionConfig(steps=4)
    summary = attribute_job.run_attribute(crosscoder_dir, toy_family, tasks, tmp_path / "effects", cfg,
                                          shard_examples=64)
    df = pd.read_parquet(tmp_path / "effects" / "effects.parquet")
    assert len(df) == 2 * 64 * 3 and len(pd.read_csv(tmp_path / "effects" / "effects.csv")) == len(df)
    assert set(df.columns) >= {"task", "feature", "checkpoint", "ie", "relie", "relie_class", "group"}
    sums = df.groupby(["task", "feature"]).relie.sum()
    assert ((sums - 1).abs() < 1e-5).all()
    assert json.loads((tmp_path / "effects" / "summary.json").read_text())["tasks"].keys() == \
        summary["tasks"].keys() == {"simple_agreement", "agreement_across_pp"}
    assert summary["tasks"]["simple_agreement"]["examples"] == 200
    # the merged shards equal one in-process pass
    from crossray.store import load_crosscoder

    cc = load_crosscoder(crosscoder_dir)
    models = [load_layer_model(toy_family, r, 2, device="cpu") for r in cc.cfg.revisions]
    task = load_task(tasks[0], toy_tokenizer)
    ie_CL = task_effects(cc, models, toy_tokenizer, task.examples, cfg).means()[0]
    got = df[df.task == "simple_agreement"].pivot(index="checkpoint_index", columns="feature", values="ie")
    torch.testing.assert_close(torch.tensor(got.values, dtype=torch.float32), ie_CL, rtol=1e-4, atol=1e-6)


def test_mismatched_crosscoder_is_refused(ray_cluster, crosscoder_dir, toy_dir, tmp_path, capsys):
    task = str(toy_dir / "tasks" / "simple_agreement.jsonl")
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--crosscoder", str(crosscoder_dir),
            "--pipeline.family", str(toy_dir), "--pipeline.tasks", task, "--out", str(tmp_path / "e")]
    assert attribute_job.main([*argv, "--pipeline.revisions", "step0,step64,step1000"]) == 2
    assert "trained on checkpoints ['step0', 'step128', 'step1000'], not on ['step0', 'step64', " \
           "'step1000']" in capsys.readouterr().err
    assert attribute_job.main([*argv, "--pipeline.layer", "1"]) == 2
    assert "trained at layer 2, not at layer 1" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
    empty = Family(name="empty", source=str(tmp_path))  # a family without the crosscoder's revisions
    with pytest.raises(CheckpointError, match=r"revision 'step0' of family empty not found"):
        attribute_job.run_attribute(crosscoder_dir, empty, [task], tmp_path / "e", AttributionConfig())
    assert not (tmp_path / "e").exists()
