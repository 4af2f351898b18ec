"""Distributed activation extraction with Ray Data.

    python -m jobs.extract --config configs/tiny.yaml --pipeline.revisions step0,step128,step1000 --out DIR
    ray job submit --working-dir . -- python -m jobs.extract --config X.yaml --out DIR \
        --launch.gpus_per_actor 1

Any field of the run config can be overridden with a flag (`--launch.actors 4`).

The corpus is read and tokenised by Ray Data first (`jobs.corpus`: its sequences stay in the object
store, the driver never holds them). Sequences then go to a pool of actors; each actor loads every
checkpoint of the set once (in `__init__`) and runs them to the hooked block. Parquet mode: one task
per shard (a fixed range of sequences), written atomically by name with a JSON sidecar, so retries
after an actor dies and re-runs after an interruption never duplicate or lose rows; a complete
extraction (manifest present, same inputs) is a no-op. Stream mode (`row_stream`): a Ray Dataset of
rows that Ray Train pulls, item by item (a block of sequences in one epoch), with no disk; a restored
training run leaves out the items its checkpoint had consumed (`crossray.position`).

Tiny CPU example: `python -m jobs.extract --config configs/tiny.yaml --pipeline.revisions
step0,step128,step1000 --out runs/acts`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch

from crossray import extract as X
from crossray.config import Config, LaunchConfig
from crossray.position import StreamPlan, from_ranges, unpack_bits
from crossray.progress import Progress
from crossray.schema import shallow
from jobs._ray import job_parser, run_job
from jobs.corpus import Corpus, TokenStore, read_corpus
from rayenv import compute_device, torch_worker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checked:
    """What is known about an extraction before Ray starts: the set is valid, its width and hashes."""

    d_model: int
    weight_hashes: list[str]


def check(cfg: X.ExtractConfig) -> Checked:
    """The checkpoint set (revisions exist, same width, the layer, distinct weights) and the corpus
    source (a local path exists), from configs and files only: no Ray, no weights loaded."""
    from crossray.corpus import parts

    d_model = X.check_same_width(X.extract_family(cfg), cfg.revisions, cfg.layer)
    hashes = X.resolve_hashes(cfg)
    parts(cfg.corpus)  # a missing path or an empty folder is a CorpusError now
    return Checked(d_model, hashes)


@dataclass(frozen=True)
class Prepared:
    """Everything resolved before the extraction: the checked set and the corpus in Ray's store."""

    cfg: X.ExtractConfig
    corpus: Corpus
    weight_hashes: list[str]
    d_model: int
    key: str

    @property
    def n_sequences(self) -> int:
        return self.corpus.n_train


def prepare(cfg: X.ExtractConfig, launch: LaunchConfig | None = None, extra: int = 0,
            checked: Checked | None = None) -> Prepared:
    """Check the set and read the corpus with Ray Data (its first `n_sequences`, plus `extra`)."""
    checked = checked or check(cfg)
    corpus = read_corpus(cfg, launch, extra)
    key = X.extraction_key(cfg, checked.weight_hashes, corpus.corpus_hash)
    return Prepared(cfg, corpus, checked.weight_hashes, checked.d_model, key)


class ShardWriter:
    """Ray Data actor: extracts and writes whole shards; returns one metadata row per shard."""

    def __init__(self, cfg: X.ExtractConfig, store: TokenStore, out: str, num_gpus: float = 0):
        self.cfg, self.store, self.out = cfg, store, Path(out)
        self.extractor = X.CheckpointSetExtractor(cfg, compute_device(num_gpus))
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict) -> dict:
        infos = []
        for i, start, stop in zip(batch["shard"], batch["start"], batch["stop"], strict=True):
            tokens = self.store.get(int(start), int(stop))
            before = dict(self.extractor.sequences_run)
            info = X.extract_shard(self.extractor, tokens, int(i), int(start), self.out)
            forward = {r: n - before[r] for r, n in self.extractor.sequences_run.items()}
            infos.append({**info, "node": self.node, "forward_sequences": forward})
        return {"info": np.array([json.dumps(i) for i in infos])}


class RowExtractor:
    """Ray Data actor for stream mode: stream items in, their activation rows out. It reads the
    resume point once (the pool is created after Train rank 0 set it): items trained on whole are
    left out, and of a partly trained item only the rows not trained yet come."""

    def __init__(self, cfg: X.ExtractConfig, store: TokenStore, plan: StreamPlan, position=None,
                 num_gpus: float = 0):
        self.cfg, self.store, self.plan = cfg, store, plan
        resume = ray.get(position.get.remote()) if position is not None else {"done": [], "partial": {}}
        self.done, self.trained = from_ranges(resume["done"]), resume["partial"]
        self.extractor = X.CheckpointSetExtractor(cfg, compute_device(num_gpus))

    def __call__(self, batch: dict) -> dict:
        parts = []
        for item in (int(i) for i in batch["item"]):
            if item in self.done:
                continue
            start, stop = self.plan.block(item)
            acts = self.extractor(torch.from_numpy(self.store.get(start, stop)).long())
            rows = X.to_rows(np.arange(start, stop), acts, self.cfg.corpus.drop_first_position)
            n = len(rows["seq"])
            rows.update(item=np.full(n, item, np.int64), row=np.arange(n, dtype=np.int32))
            if item in self.trained:
                keep = ~unpack_bits(self.trained[item], n)
                rows = {k: v[keep] for k, v in rows.items()}
            parts.append(rows)
        if not parts:
            C, D = len(self.cfg.revisions), self.extractor.d_model
            return {"item": np.zeros(0, np.int64), "row": np.zeros(0, np.int32), "seq": np.zeros(0, np.int64),
                    "pos": np.zeros(0, np.int32), "acts": np.zeros((0, C, D), np.float32)}
        return {k: np.concatenate([p[k] for p in parts]) for k in ("item", "row", "seq", "pos", "acts")}


def estimate_norms(prep: Prepared, num_cpus: float = 0.5, num_gpus: float = 0) -> list[float]:
    """The normalisation factors that scale training (the policy the config picks)."""
    return estimate_norm_policies(prep, num_cpus, num_gpus)[X.chosen_policy(prep.cfg)]


def estimate_norm_policies(prep: Prepared, num_cpus: float = 0.5, num_gpus: float = 0
                           ) -> dict[str, list[float]]:
    """Normalisation factors under both position-0 policies from the first `norm_sequences`
    sequences, computed once in a Ray task, a batch at a time (4,000 x 1024 x C x D floats at the
    paper's scale would not fit in memory)."""
    n = min(prep.cfg.norm_sequences, prep.n_sequences)

    @ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, runtime_env=torch_worker())
    def task(cfg, store):
        extractor = X.CheckpointSetExtractor(cfg, compute_device(num_gpus))
        parts = []
        for start in range(0, n, cfg.batch_sequences):
            stop = min(start + cfg.batch_sequences, n)
            acts = extractor(torch.from_numpy(store.get(start, stop)).long())
            parts.append(X.norm_stats(np.arange(start, stop), acts, n))
        return X.merge_norm_stats(parts)

    stats = ray.get(task.remote(prep.cfg, prep.corpus.store))
    return X.norm_factor_policies(stats, prep.d_model)


def _actor_args(launch: LaunchConfig, spread: bool) -> dict:
    args = {"compute": ray.data.ActorPoolStrategy(size=launch.actors), "num_cpus": launch.cpus_per_actor,
            "max_restarts": -1, "max_task_retries": -1, "runtime_env": torch_worker()}
    if launch.gpus_per_actor:
        args["num_gpus"] = launch.gpus_per_actor
    if spread:
        args["scheduling_strategy"] = "SPREAD"
    return args


def _finished_shards(out: Path, plan: list[tuple[int, int, int]]) -> dict[int, dict]:
    """Shards with a sidecar whose checksum still matches the file (an interrupted run's work)."""
    done = {}
    for i, start, stop in plan:
        sidecar = out / (X.shard_name(i) + ".json")
        if not sidecar.exists():
            continue
        info = json.loads(sidecar.read_text())
        path = out / info["name"]
        if (info["seq_start"], info["seq_stop"]) == (start, stop) and path.exists() \
                and X.sha256_file(path) == info["sha256"]:
            done[i] = info
    return done


def run_extract(cfg: X.ExtractConfig, out: str | Path, launch: LaunchConfig | None = None,
                spread: bool = False, prep: Prepared | None = None,
                on_progress: Callable[[dict], None] | None = None) -> X.Manifest:
    """Parquet shards + manifest in `out`; a no-op when a manifest for the same inputs is there.
    Progress (tokens/s, ETA) as shards finish: a bar or a log line every 30 s, and `on_progress`."""
    out = Path(out).resolve()  # actors may run in another working directory
    launch = launch or LaunchConfig()
    prep = prep or prepare(cfg, launch)
    if (out / X.MANIFEST).exists():
        manifest = X.Manifest.read(out)
        if manifest.key == prep.key:
            manifest.verify(out)
            logger.info("extraction %s already complete in %s", prep.key, out)
            return manifest
        raise X.ManifestError(f"{out} holds another extraction (key {manifest.key}, wanted {prep.key}); "
                              "choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    plan = X.shard_plan(prep.n_sequences, cfg.shard_sequences)
    done = _finished_shards(out, plan)
    todo = [p for p in plan if p[0] not in done]
    logger.info("extracting %d shards (%d already done) with %d actors", len(todo), len(done), launch.actors)
    if todo:
        ds = ray.data.from_items([{"shard": i, "start": s, "stop": e} for i, s, e in todo],
                                 override_num_blocks=len(todo))
        ds = ds.map_batches(ShardWriter, batch_size=1,
                            fn_constructor_kwargs={"cfg": cfg, "store": prep.corpus.store, "out": str(out),
                                                   "num_gpus": launch.gpus_per_actor},
                            **_actor_args(launch, spread))
        progress = Progress("extract", sum(e - s for _, s, e in todo) * _rows_per_sequence(cfg), "tokens",
                            report=on_progress)
        for row in ds.iter_rows():
            info = json.loads(row["info"])
            done[info["index"]] = info
            progress.update(info["rows"], sequences=info["seq_stop"] - info["seq_start"])
        progress.close()
    shards = [done[i] for i, _, _ in plan]
    factors = X.factors_from_shards(shards, prep.d_model, cfg.corpus.drop_first_position)
    manifest = _manifest(prep, factors, sum(s["rows"] for s in shards), shards)
    manifest.write(out)
    return manifest


def _rows_per_sequence(cfg: X.ExtractConfig) -> int:
    return cfg.corpus.seq_len - (1 if cfg.corpus.drop_first_position else 0)


@ray.remote(num_cpus=0)
class DataPosition:
    """The stream's resume point (`StreamPosition.resume`), set by Train rank 0 from the checkpoint it
    restores before any worker pulls from the stream; the extraction actors read it when they start."""

    def __init__(self) -> None:
        self.resume: dict = {"done": [], "partial": {}}

    def set(self, resume: dict) -> None:
        self.resume = resume

    def get(self) -> dict:
        return self.resume


@dataclass
class RowStream:
    """A stream mode training source: rows `item, seq, pos, acts` extracted as the Train workers pull
    them, the plan of its items, and the position actor a restore sets."""

    dataset: ray.data.Dataset
    plan: StreamPlan
    position: ray.actor.ActorHandle


def row_stream(prep: Prepared, plan: StreamPlan, launch: LaunchConfig | None = None) -> RowStream:
    """The extraction actor pool as a lazily executed Ray Dataset of rows (nothing written to disk):
    each item of `plan` (a block of sequences in one epoch) is extracted when the consumer pulls it,
    minus the items the position actor says were trained on already."""
    launch = launch or LaunchConfig()
    position = DataPosition.remote()
    items = plan.items()
    ds = ray.data.from_items([{"item": i} for i in items], override_num_blocks=min(len(items), 4096))
    # one item a block: the unit the Train workers pull, retry and resume by
    row_bytes = (len(prep.cfg.revisions) * prep.d_model + 6) * 4
    ds.context.target_max_block_size = int(plan.item_rows(0) * row_bytes * 1.25)
    ds = ds.map_batches(RowExtractor, batch_size=1,
                        fn_constructor_kwargs={"cfg": prep.cfg, "store": prep.corpus.store, "plan": plan,
                                               "position": position, "num_gpus": launch.gpus_per_actor},
                        **_actor_args(launch, False))
    return RowStream(ds, plan, position)


def stream_plan(prep: Prepared, rows: int, seed: int = 0) -> StreamPlan:
    """Items for `rows` trained rows over the prepared sequences, in blocks of `batch_sequences`."""
    return StreamPlan.for_rows(rows, prep.n_sequences, prep.cfg.batch_sequences, _rows_per_sequence(prep.cfg),
                               seed)


def stream_manifest(prep: Prepared, launch: LaunchConfig | None = None) -> X.Manifest:
    """The manifest a streamed extraction stands for: its key and lineage, the normalisation factors
    (from the first `norm_sequences` sequences) and the row count; no shard."""
    launch = launch or LaunchConfig()
    rows = prep.n_sequences * _rows_per_sequence(prep.cfg)
    factors = estimate_norm_policies(prep, launch.cpus_per_actor, launch.gpus_per_actor)
    return _manifest(prep, factors, rows, [])


def _manifest(prep: Prepared, factors: dict[str, list[float]], token_count: int, shards: list[dict]
              ) -> X.Manifest:
    """The manifest of an extraction: its key and lineage from `prep`, with what the run measured;
    the normalisation factors of the policy the config picks scale training."""
    cfg = prep.cfg
    return X.Manifest(
        key=prep.key, family=cfg.family, revisions=list(cfg.revisions), weight_hashes=prep.weight_hashes,
        layer=cfg.layer, d_model=prep.d_model, corpus_hash=prep.corpus.corpus_hash,
        seq_len=cfg.corpus.seq_len, n_sequences=prep.n_sequences,
        drop_first_position=cfg.corpus.drop_first_position, storage_dtype=cfg.storage_dtype,
        norm_factors=factors[X.chosen_policy(cfg)], norm_factors_by_policy=factors, token_count=token_count,
        shards=shards)


def extract_config(cfg: Config) -> X.ExtractConfig:
    """The config's extraction settings for its pinned checkpoint set (`pipeline.revisions`)."""
    p = cfg.pipeline
    if not p.revisions:
        raise ValueError("no checkpoint set: give --pipeline.revisions a,b,c or pipeline.revisions")
    return X.ExtractConfig(**shallow(cfg.extract), family=p.family, revisions=p.revisions, layer=p.layer,
                           naming=p.naming, tokenizer=p.tokenizer)


def main(argv: list[str] | None = None) -> int:
    p = job_parser("Extract activations of a checkpoint set with Ray Data")
    p.add_argument("--out", required=True, help="folder for Parquet shards and manifest.json")

    def prepare_job(args, cfg):
        ecfg = extract_config(cfg)
        return ecfg, check(ecfg)  # fail on bad input before Ray starts

    def work(args, cfg, prepared) -> X.Manifest:
        ecfg, checked = prepared
        return run_extract(ecfg, args.out, cfg.launch, prep=prepare(ecfg, cfg.launch, checked=checked))

    return run_job(p, argv, "extract", prepare_job, work, lambda args: args.out,
                   lambda args, m: {"out": args.out, "shards": len(m.shards), "rows": m.token_count,
                                    "norm_factors": m.norm_factors})


if __name__ == "__main__":
    raise SystemExit(main())
