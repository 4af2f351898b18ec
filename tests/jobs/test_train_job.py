"""Ray Train: DDP workers match one process, streaming matches Parquet, killed workers restore."""

import dataclasses
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
import torch

from crossray.config import CrosscoderSettings, LaunchConfig, TrainSettings
from crossray.extract import CheckpointSetExtractor, Manifest, shuffled_batches
from crossray.metrics import evaluate
from crossray.models.crosscoder import Crosscoder
from crossray.store import load_crosscoder
from crossray.train import Trainer
from jobs.extract import stream_dataset
from jobs.train import crosscoder_dir, resolve_with_manifest, run_train
from tests.helpers import registered_checkpoints

pytestmark = pytest.mark.ray
REVS = ("step0", "step128", "step1000")


LAUNCH = LaunchConfig(workers=2)


def _cfg(manifest, n_steps=400):
    cc = CrosscoderSettings(n_latents=256, seed=0)
    return resolve_with_manifest(TrainSettings(crosscoder=cc, n_steps=n_steps, batch_size=256, lr=1e-3,
                                               metrics_every=50, checkpoint_every=25,
                                               shuffle_buffer_rows=2048), manifest)


@pytest.fixture(scope="module")
def heldout(toy_extract_cfg, toy_dir):
    """Activation rows of validation sequences the crosscoders never saw."""
    from crossray.corpus import CorpusConfig, load_sequences
    from crossray.models.layer import load_tokenizer

    corpus = CorpusConfig(source=str(toy_dir / "corpus" / "validation.jsonl"), seq_len=64, n_sequences=48)
    tokens, _ = load_sequences(corpus, load_tokenizer(toy_extract_cfg.family_obj(), "step0"))
    return CheckpointSetExtractor(toy_extract_cfg)(tokens)[:, 1:].reshape(-1, 3, 64)


@pytest.fixture(scope="module")
def parquet_run(ray_cluster, toy_acts, tmp_path_factory):
    m = Manifest.read(toy_acts)
    return run_train(_cfg(m), LAUNCH, tmp_path_factory.mktemp("train"), m.norm_factors, data=str(toy_acts))


def test_ddp_run_matches_single_process(parquet_run, toy_acts, heldout):
    m = Manifest.read(toy_acts)
    ray_cc = load_crosscoder(crosscoder_dir(parquet_run))
    assert ray_cc.cfg.revisions == ("step0", "step128", "step1000") and ray_cc.cfg.layer == 2
    assert tuple(ray_cc.cfg.weight_hashes) == tuple(m.weight_hashes)
    cfg = _cfg(m)
    cc = Crosscoder(cfg.crosscoder)
    cc.norm_factors_C.copy_(torch.tensor(m.norm_factors))
    paths = m.shard_paths(toy_acts)
    batches = (b for epoch in range(1000) for b in shuffled_batches(paths, 256, 2048, epoch))
    Trainer(cc, cfg, "cpu").fit(batches, progress=False)
    ray_eval, local_eval = evaluate(ray_cc, heldout), evaluate(cc, heldout)
    print(f"\nheld-out FVE per checkpoint: Ray Train 2 workers "
          f"{[round(ray_eval[f'fve/{r}'], 3) for r in REVS]}, one process "
          f"{[round(local_eval[f'fve/{r}'], 3) for r in REVS]}")
    for r in REVS:
        assert ray_eval[f"fve/{r}"] == pytest.approx(local_eval[f"fve/{r}"], abs=0.03)
    assert local_eval["fve"] > 0.5
    assert parquet_run.metrics["step"] == 400 and parquet_run.metrics["resumed_from_step"] == 0


def test_train_workers_progress_reaches_the_driver_log(ray_cluster, toy_acts, tmp_path, caplog, monkeypatch):
    """Without a terminal, rank 0's steps/s, tokens/s, loss, L0 and FVE arrive in the driver's log (and
    at `on_progress`, what the pipeline records in MLflow) while training runs."""
    import logging

    monkeypatch.setenv("CROSSRAY_PROGRESS_SECONDS", "0.5")
    m = Manifest.read(toy_acts)
    seen = []
    with caplog.at_level(logging.INFO, "jobs.train"):
        run_train(_cfg(m, n_steps=300), LAUNCH, tmp_path, m.norm_factors, data=str(toy_acts),
                  on_progress=seen.append)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train (rank 0 of 2)")]
    assert lines and all("steps/s" in line and "tokens/s" in line and "ETA" in line for line in lines)
    assert any("(100%)" not in line for line in lines), lines  # during the run, not only at its end
    assert seen and seen[-1]["steps_per_s"] > 0 and "fve" in seen[-1] and "loss" in seen[-1]


def test_streaming_matches_parquet(ray_cluster, parquet_run, toy_extract_cfg, toy_acts, heldout, tmp_path):
    ds, _, norms = stream_dataset(toy_extract_cfg)
    result = run_train(_cfg(Manifest.read(toy_acts)), LAUNCH, tmp_path, norms, dataset=ds)
    stream_eval = evaluate(load_crosscoder(crosscoder_dir(result)), heldout)
    parquet_eval = evaluate(load_crosscoder(crosscoder_dir(parquet_run)), heldout)
    for r in REVS:
        assert stream_eval[f"fve/{r}"] == pytest.approx(parquet_eval[f"fve/{r}"], abs=0.03)


def _train_worker_pids() -> set[int]:
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"ray::RayTrainWorker"):
                pids.add(int(proc.name))
    return pids


def _kill_a_worker_after_a_checkpoint(storage: Path, killed: list, timeout: float = 120):
    """SIGKILL a worker of this run once the controller has registered a checkpoint.

    Workers of finished runs linger as idle processes with the same title, so only processes that
    appeared after this run started count.
    """
    earlier = _train_worker_pids()
    deadline = time.time() + timeout
    while time.time() < deadline:
        if registered_checkpoints(storage) >= 1:
            pids = _train_worker_pids() - earlier
            if pids:
                os.kill(max(pids), signal.SIGKILL)
                killed.append(max(pids))
                return
        time.sleep(0.02)


def _run_with_a_kill(cfg, launch, storage, norms, data, name=""):
    killed: list = []
    thread = threading.Thread(target=_kill_a_worker_after_a_checkpoint, args=(Path(storage), killed))
    thread.start()
    try:
        return run_train(cfg, launch, storage, norms, data=data, name=name), killed
    finally:
        thread.join()


def test_killed_worker_restores_from_checkpoint(ray_cluster, parquet_run, toy_acts, heldout, tmp_path):
    m = Manifest.read(toy_acts)
    launch = LaunchConfig(workers=2, max_failures=2)
    result, killed = _run_with_a_kill(_cfg(m), launch, tmp_path, m.norm_factors, str(toy_acts))
    assert killed, "no worker was killed: training finished too fast"
    assert result.metrics["step"] == 400 and result.metrics["resumed_from_step"] > 0
    restored = evaluate(load_crosscoder(crosscoder_dir(result)), heldout)["l2"]
    uninterrupted = evaluate(load_crosscoder(crosscoder_dir(parquet_run)), heldout)["l2"]
    print(f"\nheld-out loss: uninterrupted {uninterrupted:.4f}, killed and restored {restored:.4f}")
    assert restored == pytest.approx(uninterrupted, rel=0.02)


def test_stopped_run_resumes_by_name(ray_cluster, toy_acts, tmp_path):
    m = Manifest.read(toy_acts)
    launch = LaunchConfig(workers=2, max_failures=0)
    with pytest.raises(Exception):  # noqa: B017 (Ray's failure type differs across versions)
        _run_with_a_kill(_cfg(m), launch, tmp_path, m.norm_factors, str(toy_acts), name="stopped")
    again = run_train(_cfg(m), dataclasses.replace(launch, max_failures=1), tmp_path, m.norm_factors,
                      data=str(toy_acts), name="stopped")
    assert again.metrics["step"] == 400 and again.metrics["resumed_from_step"] > 0


def test_bad_training_inputs(ray_cluster, toy_acts, tmp_path):
    m = Manifest.read(toy_acts)
    cfg = _cfg(m)  # C and D come from the extraction, never from a placeholder
    assert (cfg.crosscoder.n_checkpoints, cfg.crosscoder.d_model) == (3, 64)
    with pytest.raises(ValueError, match="exactly one of"):
        run_train(cfg, LAUNCH, tmp_path, m.norm_factors)
    with pytest.raises(ValueError, match="not divisible"):
        run_train(dataclasses.replace(cfg, batch_size=255), LAUNCH, tmp_path, m.norm_factors,
                  data=str(toy_acts))
    with pytest.raises(ValueError, match="2 normalisation factors for 3 checkpoints"):
        run_train(cfg, LAUNCH, tmp_path, m.norm_factors[:2], data=str(toy_acts))
    assert ray.is_initialized()
