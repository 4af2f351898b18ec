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
from dataclasses import dataclass
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
from crossray.errors import InputError
from crossray.extract import Manifest, shuffled_batches
from crossray.models.crosscoder import Crosscoder
from crossray.position import RowMarks, StreamPlan, StreamPosition
from crossray.store import CROSSCODER, STREAM_POSITION, TRAIN_HISTORY
from crossray.train import Trainer, check_shared, fit_together
from jobs._ray import job_parser, run_job
from jobs.extract import RowStream
from rayenv import task_device, torch_worker, use_assigned_cpus

logger = logging.getLogger(__name__)
# A Train checkpoint holds the crosscoder (`CROSSCODER`), every metrics row rank 0 logged
# (`TRAIN_HISTORY`: Ray keeps only a few checkpoints) and, in stream mode, the rows trained per stream
# item (`STREAM_POSITION`, `crossray.position`).


def _parquet_batches(folder: str, world: int, rank: int, batch: int, buffer: int, seed: int
                     ) -> Iterator[torch.Tensor]:
    paths = Manifest.read(folder).shard_paths(folder)[rank::world]
    if not paths:
        raise ValueError(f"worker {rank} of {world} has no shard: use fewer workers than shards")
    for epoch in itertools.count():
        yield from shuffled_batches(paths, batch, buffer, seed + 1000 * epoch + rank)


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


FAILED = "failed.json"
"""In a checkpoint of crosscoders trained together: the ones set aside, and why."""


@dataclass(frozen=True)
class SetToTrain:
    """One crosscoder of a Train job: its config, normalisation factors, and which checkpoints of the
    data's axis it reads (None: all, in order)."""

    cfg: TrainConfig
    norm_factors: list[float]
    columns: tuple[int, ...] | None = None


def _make_trainers(sets: dict[str, SetToTrain], device: torch.device,
                   restore: Callable[[Path | None], None] = lambda _: None
                   ) -> tuple[dict[str, Trainer], dict[str, list[dict]], dict[str, str]]:
    """Fresh trainers, or the ones in the latest Ray Train checkpoint (each in `<name>/`, the only
    one at the top) with their metric histories and the ones set aside; `restore` reads anything
    else from the checkpoint folder (None for a fresh start)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            root = Path(folder)
            trainers = {n: Trainer.resume(root / n / CROSSCODER, s.cfg, device) for n, s in sets.items()}
            histories = {n: json.loads((root / n / TRAIN_HISTORY).read_text()) for n in sets}
            failed = json.loads((root / FAILED).read_text()) if (root / FAILED).exists() else {}
            restore(root)
        logger.info("resumed from step %d", next(iter(trainers.values())).step)
        return trainers, histories, failed
    restore(None)
    trainers = {}
    for name, s in sets.items():
        cc = Crosscoder(s.cfg.crosscoder)
        cc.norm_factors_C.copy_(torch.tensor(s.norm_factors))
        trainers[name] = Trainer(cc, s.cfg, device)
    return trainers, {n: [] for n in sets}, {}


def _worker_batches(data: str | None, lead: Trainer, world: int, rank: int, marks: RowMarks | None
                    ) -> Iterator[torch.Tensor]:
    """This worker's batches from where `lead` (every trainer steps alike) left off: Parquet shards
    skip the consumed batches; a stream (`marks`) leaves out the items already trained on."""
    batch, buffer, seed = lead.cfg.batch_size // world, lead.cfg.shuffle_buffer_rows, lead.cfg.data_seed
    if marks is None:
        parquet = _parquet_batches(data, world, rank, batch, buffer, seed)  # type: ignore[arg-type]
        return itertools.islice(parquet, lead.batches_consumed, None)
    return _stream_batches(batch, buffer, seed + 1000 * lead.step + rank, marks)


def train_loop_per_worker(config: dict) -> None:
    """Glue: data shard -> crossray Trainer(s) -> ray.train.report. Several crosscoders (a study's
    sets) train together on the same batches, each on its columns. The data position on a restore:
    Parquet batches skip the consumed ones; a stream leaves out the items already trained on."""
    use_assigned_cpus()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    sets: dict[str, SetToTrain] = config["sets"]
    task_device(config.get("gpus", 0))  # a GPU reserved that torch cannot use fails here, named
    device = ray.train.torch.get_device()
    stream = config.get("plan")
    marks = RowMarks(stream) if stream is not None else None
    restored: list[StreamPosition] = []

    def restore(folder: Path | None) -> None:
        if stream is not None and rank == 0:
            restored.append(_restore_position(folder, stream, config["position"]))

    trainers, histories, failed = _make_trainers(sets, device, restore)
    position = restored[0] if restored else None
    if world > 1:
        for t in trainers.values():
            t.forward_module = ray.train.torch.prepare_model(t.cc, move_to_device=False)
    lead = next(iter(trainers.values()))
    batches = _worker_batches(config.get("data"), lead, world, rank, marks)
    latest: dict = {"resumed_from_step": lead.step}

    def log(name: str, step: int, metrics: dict) -> None:
        if rank == 0:
            latest.update({f"{name}/{k}" if name else k: v for k, v in metrics.items()}, step=step)
            histories[name].append({**metrics, "step": step})
            logger.info("%sstep %d loss %.4f fve %.4f l0 %.1f", f"{name}: " if name else "", step,
                        metrics["loss"], metrics["fve"], metrics["l0"])

    def report(snapshot: dict) -> None:  # rank 0's progress, to the driver's log and MLflow
        with contextlib.suppress(Exception):  # a full or gone queue never stops training
            config["progress"].put_nowait(snapshot)

    def save() -> None:
        counts = _gather(marks.take(), world) if marks is not None else []
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                for name, t in trainers.items():
                    t.save(Path(tmp) / name / CROSSCODER)
                    (Path(tmp) / name / TRAIN_HISTORY).write_text(json.dumps(histories[name]))
                if failed:
                    (Path(tmp) / FAILED).write_text(json.dumps(failed))
                if position is not None:
                    for c in counts:
                        position.add(c)
                    (Path(tmp) / STREAM_POSITION).write_text(json.dumps(position.to_json()))
                ray.train.report({**latest, "step": lead.step}, checkpoint=Checkpoint.from_directory(tmp))
            else:
                ray.train.report({"step": lead.step})

    fit_together(trainers, batches, {n: list(s.columns) for n, s in sets.items() if s.columns is not None},
                 log=log, save=save, progress=rank == 0,
                 report=report if config.get("progress") is not None else None,
                 every_s=config.get("progress_s"), failed=failed)


def run_train(cfg: TrainConfig, launch: LaunchConfig, storage: str | Path, norm_factors: list[float],
              data: str | None = None, stream: RowStream | None = None, name: str = "",
              on_progress: Callable[[dict], None] | None = None, columns: tuple[int, ...] | None = None
              ) -> ray.train.Result:
    """Fit on Parquet shards (`data`, a manifest folder) or a `stream` of rows from the extraction
    actors (`jobs.extract.row_stream`); `columns` picks the checkpoints of the data's axis to train
    on (a study set reading the union's shards).

    `name` is the Ray Train run name under `storage`: the name of a stopped run resumes it (empty: a
    fresh unique name). Rank 0's progress (steps/s, tokens/s, loss, L0, FVE, ETA) comes back through a
    Ray queue every `CROSSRAY_PROGRESS_SECONDS`: logged here, and handed to `on_progress`."""
    return run_train_together({"": SetToTrain(cfg, list(norm_factors), columns)}, launch, storage, data,
                              stream, name, on_progress)


def run_train_together(sets: dict[str, SetToTrain], launch: LaunchConfig, storage: str | Path,
                       data: str | None = None, stream: RowStream | None = None, name: str = "",
                       on_progress: Callable[[dict], None] | None = None) -> ray.train.Result:
    """Several crosscoders (a study's sets) fitted by one Train job on the same data, one step each
    per batch (each on its columns of the data's axis), saved together in each checkpoint (`<set>/`),
    so the activations are read (or, streamed, extracted) once for all of them. They share the batch
    size, step count, data seed, shuffle buffer and checkpoint cadence. As `run_train` otherwise."""
    if (data is None) == (stream is None):
        raise ValueError("give exactly one of data (a manifest folder) or stream (jobs.extract.row_stream)")
    if data is not None:
        data = str(Path(data).resolve())  # Train workers run in their own working directory
        manifest = Manifest.read(data)
        manifest.verify(data)  # a corrupted shard is an error before any worker starts
        if len(manifest.shards) < launch.workers:
            raise InputError(f"{data} has {len(manifest.shards)} shards for {launch.workers} workers")
    check_together(sets, launch.workers)
    resources = {"CPU": launch.cpus_per_worker}
    if launch.gpus_per_worker:
        resources["GPU"] = launch.gpus_per_worker
    from ray.util.queue import Queue

    from crossray.progress import progress_seconds

    progress = Queue(maxsize=256, actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"sets": sets, "data": data, "progress": progress, "progress_s": progress_seconds(),
                           "gpus": launch.gpus_per_worker,
                           "plan": stream.plan if stream else None,
                           "position": stream.position if stream else None},
        scaling_config=ScalingConfig(num_workers=launch.workers, use_gpu=launch.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name or f"crosscoder-{uuid.uuid4().hex[:8]}",
                             storage_path=str(Path(storage).resolve()),
                             failure_config=FailureConfig(max_failures=launch.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             worker_runtime_env=torch_worker()),
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


def check_together(sets: dict[str, SetToTrain], workers: int) -> None:
    lead = next(iter(sets.values())).cfg
    check_shared({name: s.cfg for name, s in sets.items()})
    for s in sets.values():
        if len(s.norm_factors) != s.cfg.crosscoder.n_checkpoints:
            raise ValueError(f"{len(s.norm_factors)} normalisation factors for "
                             f"{s.cfg.crosscoder.n_checkpoints} checkpoints")
    if lead.batch_size % workers:
        raise InputError(f"batch_size {lead.batch_size} is not divisible by {workers} workers")


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


def metric_history(result: ray.train.Result, name: str = "") -> list[dict]:
    """Every metrics row of a finished run (rank 0's, every metrics_every steps); `name`: of that set."""
    return json.loads((crosscoder_dir(result, name).parent / TRAIN_HISTORY).read_text())


def set_aside(result: ray.train.Result) -> dict[str, str]:
    """The crosscoders of a Train job run together that were set aside (name -> why)."""
    path = crosscoder_dir(result).parent / FAILED
    return json.loads(path.read_text()) if path.exists() else {}


def stream_position(result: ray.train.Result) -> StreamPosition | None:
    """Where a stream mode run ended in its data (None for a run on Parquet shards)."""
    path = crosscoder_dir(result).parent / STREAM_POSITION
    return StreamPosition.from_json(json.loads(path.read_text())) if path.exists() else None


def crosscoder_dir(result: ray.train.Result, name: str = "") -> Path:
    """Local folder of the final crosscoder (weights, config, training state) of a finished run
    (`name`: of that set, for crosscoders trained together)."""
    if result.checkpoint is None:
        raise ValueError(f"run {result.path} reported no checkpoint")
    return Path(result.checkpoint.path) / name / CROSSCODER


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
