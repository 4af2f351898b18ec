"""Ray Train: DDP workers match one process, killed workers restore, a stream resumes exactly. (Stream
mode against Parquet: tests/jobs/test_pipeline.py.)"""

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
from crossray.extract import CheckpointSetExtractor, Manifest, extract_family, shuffled_batches
from crossray.metrics import evaluate
from crossray.models.crosscoder import Crosscoder
from crossray.store import load_crosscoder
from crossray.train import Trainer
from jobs.extract import estimate_norms, prepare, row_stream, stream_plan
from jobs.train import crosscoder_dir, resolve_with_manifest, run_train, stream_position
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
    tokens, _ = load_sequences(corpus, load_tokenizer(extract_family(toy_extract_cfg), "step0"))
    return CheckpointSetExtractor(toy_extract_cfg, "cpu")(tokens)[:, 1:].reshape(-1, 3, 64)


@pytest.fixture(scope="module")
def parquet_run(ray_cluster, toy_acts, tmp_path_factory):
    """400 steps on the Parquet shards, as a pipeline runs them without a terminal, rank 0's progress
    every 0.5 s: (result, the driver's progress log lines, the snapshots handed to `on_progress`)."""
    import logging

    m = Manifest.read(toy_acts)
    records, seen = [], []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    log = logging.getLogger("jobs.train")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CROSSRAY_PROGRESS_SECONDS", "0.5")
            result = run_train(_cfg(m), LAUNCH, tmp_path_factory.mktemp("train"), m.norm_factors,
                               data=str(toy_acts), on_progress=seen.append)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    lines = [r.getMessage() for r in records if r.getMessage().startswith("train (rank 0 of 2)")]
    return result, lines, seen


def test_ddp_run_matches_single_process(parquet_run, toy_acts, heldout):
    m = Manifest.read(toy_acts)
    ray_cc = load_crosscoder(crosscoder_dir(parquet_run[0]))
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
    assert parquet_run[0].metrics["step"] == 400 and parquet_run[0].metrics["resumed_from_step"] == 0


def test_train_workers_progress_reaches_the_driver_log(parquet_run):
    """Without a terminal, rank 0's steps/s, tokens/s, loss, L0 and FVE arrive in the driver's log (and
    at `on_progress`, what the pipeline records in MLflow) while training runs."""
    _, lines, seen = parquet_run
    assert lines and all("steps/s" in line and "tokens/s" in line and "ETA" in line for line in lines)
    assert any("(100%)" not in line for line in lines), lines  # during the run, not only at its end
    assert seen and seen[-1]["steps_per_s"] > 0 and "fve" in seen[-1] and "loss" in seen[-1]


def _assert_nothing_skipped(position, n_items: int, buffer_rows: int, workers: int = 2) -> None:
    """Every row of the first `n_items` items (streamed whole before training ended) was trained, but
    for those still held by a worker at the end (a row can linger in a shuffle buffer): at most its
    buffer, a batch and the two items its iterator prefetches."""
    assert set(range(n_items)) <= position.done | set(position.partial), "an item never came"
    held = workers * (buffer_rows + 128 + 2 * position.plan.item_rows(0))
    assert position.pending_rows() <= held, (position.pending_rows(), held)


def _kill_an_extraction_actor(storage: Path, killed: list, timeout: float = 120) -> None:
    """SIGKILL an extraction actor mid-stream after the restore (a second checkpoint registered)."""
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline and registered_checkpoints(storage) < 2:
        time.sleep(0.02)
    for q in psutil.process_iter(["cmdline"]):
        if any("RowExtractor" in part for part in (q.info["cmdline"] or [])):
            q.kill()
            killed.append(q.pid)
            return


def test_stream_resumes_after_a_killed_worker_and_a_killed_actor(ray_cluster, toy_extract_cfg, toy_acts,
                                                                 tmp_path):
    """SIGKILL a Train worker after a checkpoint and, after the restore, an extraction actor mid-stream:
    the group restores from the checkpoint, the stream resumes at exactly the rows that checkpoint had
    not trained on (no row twice), the killed actor's items are extracted again, and no row is missed:
    after 1.5 epochs in blocks of 4 sequences every row of the first epoch was trained, but for a
    shuffle buffer's worth still held at the end."""
    ecfg = dataclasses.replace(toy_extract_cfg, batch_sequences=4)  # 48 items of 252 rows an epoch
    prep = prepare(ecfg)
    cfg = dataclasses.replace(_cfg(Manifest.read(toy_acts), n_steps=72), checkpoint_every=12,
                              shuffle_buffer_rows=1024)
    stream = row_stream(prep, stream_plan(prep, cfg.n_steps * cfg.batch_size))
    workers, actors = [], []
    threads = [threading.Thread(target=_kill_a_worker_after_a_checkpoint, args=(tmp_path, workers)),
               threading.Thread(target=_kill_an_extraction_actor, args=(tmp_path, actors))]
    for t in threads:
        t.start()
    try:
        result = run_train(cfg, dataclasses.replace(LAUNCH, max_failures=2), tmp_path, estimate_norms(prep),
                           stream=stream)
    finally:
        for t in threads:
            t.join()
    assert workers and actors, "a kill did not happen: training finished too fast"
    position = stream_position(result)
    assert result.metrics["step"] == 72 and result.metrics["resumed_from_step"] > 0
    print(f"\nstream restored {position.restores}x: {len(position.done)} items done, "
          f"{position.pending_rows()} rows still in buffers, {position.duplicate_rows} trained twice")
    assert position.restores >= 1 and position.rows == 72 * 256 and position.duplicate_rows == 0
    _assert_nothing_skipped(position, stream.plan.n_blocks, cfg.shuffle_buffer_rows)


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


def test_killed_run_resumes_by_name_from_its_checkpoint(ray_cluster, parquet_run, toy_acts, heldout,
                                                       tmp_path):
    """A worker SIGKILLed after a checkpoint, no failure allowed: the run stops. The same name resumes
    it from that checkpoint (the Parquet batches it had consumed skipped), and the crosscoder is as
    good as the uninterrupted run's. (In-group restarts: the stream test below.)"""
    m = Manifest.read(toy_acts)
    launch = LaunchConfig(workers=2, max_failures=0)
    killed: list = []
    thread = threading.Thread(target=_kill_a_worker_after_a_checkpoint, args=(tmp_path, killed))
    thread.start()
    try:
        with pytest.raises(Exception):  # noqa: B017 (Ray's failure type differs across versions)
            run_train(_cfg(m), launch, tmp_path, m.norm_factors, data=str(toy_acts), name="stopped")
    finally:
        thread.join()
    assert killed, "no worker was killed: training finished too fast"
    result = run_train(_cfg(m), launch, tmp_path, m.norm_factors, data=str(toy_acts), name="stopped")
    assert result.metrics["step"] == 400 and result.metrics["resumed_from_step"] > 0
    restored = evaluate(load_crosscoder(crosscoder_dir(result)), heldout)["l2"]
    uninterrupted = evaluate(load_crosscoder(crosscoder_dir(parquet_run[0])), heldout)["l2"]
    print(f"\nheld-out loss: uninterrupted {uninterrupted:.4f}, killed and resumed {restored:.4f}")
    assert restored == pytest.approx(uninterrupted, rel=0.02)


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
