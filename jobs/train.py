"""Crosscoder training with Ray Train: N data-parallel workers (DDP), checkpoints, fault tolerance.

    python -m jobs.train --config configs/tiny.yaml --data runs/acts --storage runs/train --name x
    ray job submit --working-dir . -- python -m jobs.train --config X.yaml --data /mnt/acts \
        --storage s3://bucket/train --launch.gpus_per_worker 1

Any field of the run config can be overridden with a flag (`--train.n_steps 200`, `--launch.workers 4`).

Each worker reads its share of the data through a local shuffle buffer: either Parquet shards of a
finished extraction (shard i goes to worker i mod N) or its split of the streaming extraction
Dataset. The crossray training loop runs unchanged inside (`crossray.train.Trainer`); rank 0 saves a
full training state (weights, optimizer, schedule, RNG, data position) in each Ray Train checkpoint.
A failed worker restarts the group from the last checkpoint (`FailureConfig`); re-running with the
same `--name` and `--storage` resumes a stopped run. Only rank 0 reports metrics.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import ray
import ray.train
import torch
from ray.data import ExecutionOptions
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from crossray.config import (
    LaunchConfig,
    TrainConfig,
    TrainSettings,
    resolve_train,
)
from crossray.extract import Manifest, shuffled_batches
from crossray.models.crosscoder import Crosscoder
from crossray.position import RowMarks, StreamPlan, StreamPosition
from crossray.store import CROSSCODER, STREAM_POSITION, TRAIN_HISTORY
from crossray.train import Trainer
from jobs._ray import job_parser, run_job
from jobs.extract import RowStream
from rayenv import use_assigned_cpus

logger = logging.getLogger(__name__)
# A Train checkpoint holds the crosscoder (`CROSSCODER`), every metrics row rank 0 logged
# (`TRAIN_HISTORY`: Ray keeps only a few checkpoints) and, in stream mode, the rows trained per stream
# item (`STREAM_POSITION`, `crossray.position`).


def _parquet_batches(folder: str, world: int, rank: int, batch: int, buffer: int, seed: int,
                     columns: tuple[int, ...] | None = None) -> Iterator[torch.Tensor]:
    paths = Manifest.read(folder).shard_paths(folder)[rank::world]
    if not paths:
        raise ValueError(f"worker {rank} of {world} has no shard: use fewer workers than shards")
    for epoch in itertools.count():
        yield from shuffled_batches(paths, batch, buffer, seed + 1000 * epoch + rank, columns=columns)


def _stream_batches(batch: int, buffer: int, seed: int, marks: RowMarks) -> Iterator[torch.Tensor]:
    """The worker's split of the stream (every epoch in one pass), each batch's rows marked."""
    shard = ray.train.get_dataset_shard("train")
    for b in shard.iter_torch_batches(batch_size=batch, local_shuffle_buffer_size=buffer,
                                      local_shuffle_seed=seed, drop_last=True):
        marks.add(b["item"].numpy(), b["row"].numpy())
        yield b["acts"]


def _restore_position(folder: Path | None, plan: StreamPlan, position_actor) -> StreamPosition:
    """Rank 0: the stream position of the restored checkpoint (a fresh one without), handed to the
    position actor before any worker pulls from the stream, so the stream leaves out what is done."""
    saved = folder / STREAM_POSITION if folder is not None else None
    if saved is not None and saved.exists():
        position = StreamPosition.from_json(json.loads(saved.read_text()))
        position.restores += 1
        logger.info("stream resumes: %d items done, %d partly (%d of their rows to come), %d rows trained",
                    len(position.done), len(position.partial), position.pending_rows(), position.rows)
    else:
        position = StreamPosition(plan)
    ray.get(position_actor.set.remote(position.resume()))
    return position


def _gather(marks: dict, world: int) -> list[dict]:
    """Every worker's row marks (a collective: every rank calls it at the same step)."""
    if world == 1:
        return [marks]
    out: list = [None] * world
    torch.distributed.all_gather_object(out, marks)
    return out


def _make_trainer(cfg: TrainConfig, norm_factors: list[float], device: torch.device,
                  restore: Callable[[Path | None], None] = lambda _: None) -> tuple[Trainer, list[dict]]:
    """A fresh trainer, or the one in the latest Ray Train checkpoint with its metric history;
    `restore` reads anything else from the checkpoint folder (None for a fresh start)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer = Trainer.resume(Path(folder) / CROSSCODER, cfg, device)
            history = json.loads((Path(folder) / TRAIN_HISTORY).read_text())
            restore(Path(folder))
        logger.info("resumed from step %d", trainer.step)
        return trainer, history
    restore(None)
    cc = Crosscoder(cfg.crosscoder)
    cc.norm_factors_C.copy_(torch.tensor(norm_factors))
    return Trainer(cc, cfg, device), []


def train_loop_per_worker(config: dict) -> None:
    """Glue: data shard -> crossray Trainer -> ray.train.report. The data position on a restore:
    Parquet batches skip the consumed ones; a stream leaves out the items already trained on."""
    use_assigned_cpus()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg: TrainConfig = config["train_cfg"]
    device = ray.train.torch.get_device()
    stream = config.get("plan")
    marks = RowMarks(stream) if stream is not None else None
    restored: list[StreamPosition] = []

    def restore(folder: Path | None) -> None:
        if stream is not None and rank == 0:
            restored.append(_restore_position(folder, stream, config["position"]))

    trainer, history = _make_trainer(cfg, config["norm_factors"], device, restore)
    position = restored[0] if restored else None
    if world > 1:
        trainer.forward_module = ray.train.torch.prepare_model(trainer.cc, move_to_device=False)
    batch, buffer, seed = cfg.batch_size // world, cfg.shuffle_buffer_rows, cfg.data_seed
    if stream is None:
        batches = _parquet_batches(config["data"], world, rank, batch, buffer, seed, config.get("columns"))
        batches = itertools.islice(batches, trainer.batches_consumed, None)
    else:
        batches = _stream_batches(batch, buffer, seed + 1000 * trainer.step + rank, marks)
    latest: dict = {"resumed_from_step": trainer.step}

    def log(step: int, metrics: dict) -> None:
        if rank == 0:
            latest.update(metrics, step=step)
            history.append({**metrics, "step": step})
            logger.info("step %d loss %.4f fve %.4f l0 %.1f", step, metrics["loss"], metrics["fve"],
                        metrics["l0"])

    def report(snapshot: dict) -> None:  # rank 0's progress, to the driver's log and MLflow
        with contextlib.suppress(Exception):  # a full or gone queue never stops training
            config["progress"].put_nowait(snapshot)

    def save(t: Trainer) -> None:
        counts = _gather(marks.take(), world) if marks is not None else []
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                t.save(Path(tmp) / CROSSCODER)
                (Path(tmp) / TRAIN_HISTORY).write_text(json.dumps(history))
                if position is not None:
                    for c in counts:
                        position.add(c)
                    (Path(tmp) / STREAM_POSITION).write_text(json.dumps(position.to_json()))
                ray.train.report({**latest, "step": t.step}, checkpoint=Checkpoint.from_directory(tmp))
            else:
                ray.train.report({"step": t.step})

    trainer.fit(batches, log=log, save=save, progress=rank == 0,
                report=report if config.get("progress") is not None else None,
                every_s=config.get("progress_s"))


def run_train(cfg: TrainConfig, launch: LaunchConfig, storage: str | Path, norm_factors: list[float],
              data: str | None = None, stream: RowStream | None = None, name: str = "",
              on_progress: Callable[[dict], None] | None = None, columns: tuple[int, ...] | None = None
              ) -> ray.train.Result:
    """Fit on Parquet shards (`data`, a manifest folder) or a `stream` of rows from the extraction
    actors (`jobs.extract.row_stream`); `columns` picks the checkpoints of the shards' axis to train
    on (a study set reading the union's shards).

    `name` is the Ray Train run name under `storage`: the name of a stopped run resumes it (empty: a
    fresh unique name). Rank 0's progress (steps/s, tokens/s, loss, L0, FVE, ETA) comes back through a
    Ray queue every `CROSSRAY_PROGRESS_SECONDS`: logged here, and handed to `on_progress`."""
    if (data is None) == (stream is None):
        raise ValueError("give exactly one of data (a manifest folder) or stream (jobs.extract.row_stream)")
    if data is not None:
        data = str(Path(data).resolve())  # Train workers run in their own working directory
        manifest = Manifest.read(data)
        manifest.verify(data)  # a corrupted shard is an error before any worker starts
        if len(manifest.shards) < launch.workers:
            raise ValueError(f"{data} has {len(manifest.shards)} shards for {launch.workers} workers")
    if cfg.batch_size % launch.workers:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {launch.workers} workers")
    if len(norm_factors) != cfg.crosscoder.n_checkpoints:
        raise ValueError(f"{len(norm_factors)} normalisation factors for "
                         f"{cfg.crosscoder.n_checkpoints} checkpoints")
    resources = {"CPU": launch.cpus_per_worker}
    if launch.gpus_per_worker:
        resources["GPU"] = launch.gpus_per_worker
    from ray.util.queue import Queue

    from crossray.progress import progress_seconds

    progress = Queue(maxsize=256, actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train_cfg": cfg, "norm_factors": list(norm_factors), "data": data,
                           "progress": progress, "progress_s": progress_seconds(),
                           "plan": stream.plan if stream else None, "columns": columns,
                           "position": stream.position if stream else None},
        scaling_config=ScalingConfig(num_workers=launch.workers, use_gpu=launch.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name or f"crosscoder-{uuid.uuid4().hex[:8]}",
                             storage_path=str(Path(storage).resolve()),
                             failure_config=FailureConfig(max_failures=launch.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": stream.dataset} if stream is not None else None,
        # items reach the workers in the plan's order: an item re-extracted after its actor died comes
        # before any later one, so a run trains the plan's leading rows (less what its shuffle buffers
        # hold at the end) and a late retry is never cut off by the end of training
        dataset_config=ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
    stop = threading.Event()
    relay = threading.Thread(target=_relay_progress, args=(progress, stop, launch.workers, on_progress),
                             daemon=True)
    relay.start()
    try:
        return trainer.fit()
    finally:
        stop.set()
        relay.join()
        ray.kill(progress.actor)


def _relay_progress(queue, stop: threading.Event, workers: int, on_progress) -> None:
    """Workers' progress into the driver's log (Ray does not forward worker logs here)."""
    import queue as queue_module

    from crossray.progress import describe

    while True:
        try:
            snap = queue.get(timeout=0.5)
        except (queue_module.Empty, ray.exceptions.RayError):
            if stop.is_set():  # training ended and the queue is drained (the final figures included)
                return
            continue
        logger.info("%s", describe(f"train (rank 0 of {workers})", "steps", snap, ["tokens"],
                                   ["loss", "l0", "fve"]))
        if on_progress is not None:
            try:
                on_progress(snap)
            except Exception:
                logger.warning("progress could not be recorded", exc_info=True)


def metric_history(result: ray.train.Result) -> list[dict]:
    """Every metrics row of a finished run (rank 0's, every metrics_every steps)."""
    return json.loads((crosscoder_dir(result).parent / TRAIN_HISTORY).read_text())


def stream_position(result: ray.train.Result) -> StreamPosition | None:
    """Where a stream mode run ended in its data (None for a run on Parquet shards)."""
    path = crosscoder_dir(result).parent / STREAM_POSITION
    return StreamPosition.from_json(json.loads(path.read_text())) if path.exists() else None


def crosscoder_dir(result: ray.train.Result) -> Path:
    """Local folder of the final crosscoder (weights, config, training state) of a finished run."""
    if result.checkpoint is None:
        raise ValueError(f"run {result.path} reported no checkpoint")
    return Path(result.checkpoint.path) / CROSSCODER


def resolve_with_manifest(settings: TrainSettings, manifest: Manifest) -> TrainConfig:
    """Training settings resolved from an extraction: C, D and the lineage of the activations."""
    return resolve_train(settings, len(manifest.revisions), manifest.d_model,
                         revisions=tuple(manifest.revisions), weight_hashes=tuple(manifest.weight_hashes),
                         family=manifest.family, layer=manifest.layer)


def main(argv: list[str] | None = None) -> int:
    p = job_parser("Train a crosscoder with Ray Train")
    p.add_argument("--data", required=True, help="extraction folder (manifest.json + shards)")
    p.add_argument("--storage", required=True, help="Ray Train storage path (local or s3://)")
    p.add_argument("--name", default="", help="run name; the name of a stopped run resumes it")

    def prepare(args, cfg):
        manifest = Manifest.read(args.data)
        manifest.verify(args.data)
        return manifest, resolve_with_manifest(cfg.train, manifest)

    def work(args, cfg, prepared) -> ray.train.Result:
        manifest, train_cfg = prepared
        return run_train(train_cfg, cfg.launch, args.storage, manifest.norm_factors, data=args.data,
                         name=args.name)

    return run_job(p, argv, "train", prepare, work, lambda args: args.storage,
                   lambda args, r: {"crosscoder": str(crosscoder_dir(r)), "metrics": r.metrics})


if __name__ == "__main__":
    raise SystemExit(main())
