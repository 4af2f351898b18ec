"""Distributed activation extraction with Ray Data.

    python -m jobs.extract --config configs/tiny.yaml --pipeline.revisions step0,step128,step1000 --out DIR
    ray job submit --working-dir . -- python -m jobs.extract --config X.yaml --out DIR \
        --launch.gpus_per_actor 1

Any field of the run config can be overridden with a flag (`--launch.actors 4`).

Sequences go to a pool of actors; each actor loads every checkpoint of the set once (in `__init__`)
and runs them to the hooked block. Parquet mode: one task per shard (a fixed range of sequences),
written atomically by name with a JSON sidecar, so retries after an actor dies and re-runs after an
interruption never duplicate or lose rows; a complete extraction (manifest present, same inputs) is a
no-op. Streaming mode (`stream_dataset`) returns a Ray Dataset of rows for Ray Train, with no disk.

Tiny CPU example: `python -m jobs.extract --config configs/tiny.yaml --pipeline.revisions
step0,step128,step1000 --out runs/acts`.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch

from crossray import extract as X
from crossray.config import Config, LaunchConfig, load_config
from crossray.corpus import load_sequences
from crossray.models.layer import load_tokenizer
from crossray.progress import Progress
from crossray.schema import overrides_from, shallow
from jobs._ray import guarded, init_ray, job_parser, local_folder, setup_logging

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """Everything validated and resolved before any Ray work starts."""

    cfg: X.ExtractConfig
    tokens: np.ndarray  # (N, S) int32
    corpus_hash: str
    weight_hashes: list[str]
    d_model: int
    key: str


def prepare(cfg: X.ExtractConfig) -> Prepared:
    """Check the checkpoint set (revisions exist, same width, distinct weights) and read the corpus."""
    family = cfg.family_obj()
    d_model = X.check_same_width(family, cfg.revisions, cfg.layer)
    hashes = X.resolve_hashes(cfg)
    tokens, corpus_hash = load_sequences(cfg.corpus, load_tokenizer(family, cfg.revisions[0]))
    key = X.extraction_key(cfg, hashes, corpus_hash)
    return Prepared(cfg, tokens.to(torch.int32).numpy(), corpus_hash, hashes, d_model, key)


def _device(num_gpus: float) -> str:
    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


class ShardWriter:
    """Ray Data actor: extracts and writes whole shards; returns one metadata row per shard."""

    def __init__(self, cfg: X.ExtractConfig, tokens_ref, out: str, num_gpus: float = 0):
        self.cfg, self.out = cfg, Path(out)
        self.tokens = ray.get(tokens_ref[0])
        self.extractor = X.CheckpointSetExtractor(cfg, _device(num_gpus))
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict) -> dict:
        infos = []
        for i, start, stop in zip(batch["shard"], batch["start"], batch["stop"], strict=True):
            info = X.extract_shard(self.extractor, self.tokens, int(i), int(start), int(stop), self.out)
            infos.append({**info, "node": self.node})
        return {"info": np.array([json.dumps(i) for i in infos])}


class RowExtractor:
    """Ray Data actor for streaming mode: sequence blocks in, activation rows out."""

    def __init__(self, cfg: X.ExtractConfig, tokens_ref, num_gpus: float = 0):
        self.cfg = cfg
        self.tokens = ray.get(tokens_ref[0])
        self.extractor = X.CheckpointSetExtractor(cfg, _device(num_gpus))

    def __call__(self, batch: dict) -> dict:
        parts = []
        for start, stop in zip(batch["start"], batch["stop"], strict=True):
            acts = self.extractor(torch.from_numpy(self.tokens[start:stop]).long())
            parts.append(X.to_rows(np.arange(start, stop), acts, self.cfg.corpus.drop_first_position))
        return {k: np.concatenate([p[k] for p in parts]) for k in ("seq", "pos", "acts")}


def estimate_norms(prep: Prepared, num_cpus: float = 0.5, num_gpus: float = 0) -> list[float]:
    """Normalisation factors from the first `norm_sequences` sequences, computed once in a Ray task."""
    n = min(prep.cfg.norm_sequences, len(prep.tokens))

    @ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)
    def task(cfg, tokens):
        acts = X.CheckpointSetExtractor(cfg, _device(num_gpus))(torch.from_numpy(tokens).long())
        rows = X.to_rows(np.arange(len(tokens)), acts, cfg.corpus.drop_first_position)
        return X.norm_stats(rows, len(tokens))

    norm_sum, count = ray.get(task.remote(prep.cfg, prep.tokens[:n]))
    return X.norm_factors(norm_sum, count, prep.d_model)


def _actor_args(launch: LaunchConfig, spread: bool) -> dict:
    args = {"compute": ray.data.ActorPoolStrategy(size=launch.actors), "num_cpus": launch.cpus_per_actor,
            "max_restarts": -1, "max_task_retries": -1}
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
    prep = prep or prepare(cfg)  # every input check happens here, before any Ray work
    if (out / X.MANIFEST).exists():
        manifest = X.Manifest.read(out)
        if manifest.key == prep.key:
            manifest.verify(out)
            logger.info("extraction %s already complete in %s", prep.key, out)
            return manifest
        raise X.ManifestError(f"{out} holds another extraction (key {manifest.key}, wanted {prep.key}); "
                              "choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    plan = X.shard_plan(len(prep.tokens), cfg.shard_sequences)
    done = _finished_shards(out, plan)
    todo = [p for p in plan if p[0] not in done]
    logger.info("extracting %d shards (%d already done) with %d actors", len(todo), len(done), launch.actors)
    if todo:
        tokens_ref = ray.put(prep.tokens)
        ds = ray.data.from_items([{"shard": i, "start": s, "stop": e} for i, s, e in todo],
                                 override_num_blocks=len(todo))
        ds = ds.map_batches(ShardWriter, batch_size=1,
                            fn_constructor_kwargs={"cfg": cfg, "tokens_ref": [tokens_ref], "out": str(out),
                                                   "num_gpus": launch.gpus_per_actor},
                            **_actor_args(launch, spread))
        rows_per_seq = cfg.corpus.seq_len - (1 if cfg.corpus.drop_first_position else 0)
        progress = Progress("extract", sum(e - s for _, s, e in todo) * rows_per_seq, "tokens",
                            report=on_progress)
        for row in ds.iter_rows():
            info = json.loads(row["info"])
            done[info["index"]] = info
            progress.update(info["rows"], sequences=info["seq_stop"] - info["seq_start"])
        progress.close()
    shards = [done[i] for i, _, _ in plan]
    manifest = _manifest(prep, X.factors_from_shards(shards, prep.d_model), sum(s["rows"] for s in shards),
                         shards)
    manifest.write(out)
    return manifest


def row_dataset(prep: Prepared, launch: LaunchConfig | None = None) -> ray.data.Dataset:
    """Rows `seq, pos, acts` as a lazily executed Ray Dataset (nothing written to disk): the pool of
    extraction actors turns blocks of `batch_sequences` sequences into rows as the consumer pulls."""
    launch = launch or LaunchConfig()
    tokens_ref = ray.put(prep.tokens)
    blocks = [{"start": s, "stop": e} for _, s, e in X.shard_plan(len(prep.tokens), prep.cfg.batch_sequences)]
    ds = ray.data.from_items(blocks, override_num_blocks=min(len(blocks), 64))
    return ds.map_batches(RowExtractor, batch_size=1,
                          fn_constructor_kwargs={"cfg": prep.cfg, "tokens_ref": [tokens_ref],
                                                 "num_gpus": launch.gpus_per_actor},
                          **_actor_args(launch, False))


def stream_dataset(cfg: X.ExtractConfig, launch: LaunchConfig | None = None
                   ) -> tuple[ray.data.Dataset, Prepared, list[float]]:
    """(row dataset, prepared inputs, normalisation factors) of a streamed extraction."""
    launch = launch or LaunchConfig()
    prep = prepare(cfg)
    return row_dataset(prep, launch), prep, estimate_norms(prep, launch.cpus_per_actor, launch.gpus_per_actor)


def stream_manifest(prep: Prepared, launch: LaunchConfig | None = None) -> X.Manifest:
    """The manifest a streamed extraction stands for: its key and lineage, the normalisation factors
    (from the first `norm_sequences` sequences) and the row count; no shard."""
    launch = launch or LaunchConfig()
    corpus = prep.cfg.corpus
    rows = len(prep.tokens) * (corpus.seq_len - (1 if corpus.drop_first_position else 0))
    return _manifest(prep, estimate_norms(prep, launch.cpus_per_actor, launch.gpus_per_actor), rows, [])


def _manifest(prep: Prepared, norm_factors: list[float], token_count: int, shards: list[dict]) -> X.Manifest:
    """The manifest of an extraction: its key and lineage from `prep`, with what the run measured."""
    cfg = prep.cfg
    return X.Manifest(
        key=prep.key, family=cfg.family, revisions=list(cfg.revisions), weight_hashes=prep.weight_hashes,
        layer=cfg.layer, d_model=prep.d_model, corpus_hash=prep.corpus_hash, seq_len=cfg.corpus.seq_len,
        n_sequences=len(prep.tokens), drop_first_position=cfg.corpus.drop_first_position,
        storage_dtype=cfg.storage_dtype, norm_factors=norm_factors, token_count=token_count, shards=shards)


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
    args = p.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, overrides_from(args))
        ecfg = extract_config(cfg)
        prep = prepare(ecfg)  # fail on bad input before Ray starts
    except (ValueError, OSError) as e:
        print(f"crossray: error: {e}", file=sys.stderr)
        return 2
    def work() -> X.Manifest:
        init_ray(args.address)
        return run_extract(ecfg, args.out, cfg.launch, prep=prep)

    code, manifest = guarded(work, local_folder(args.out), "extract")
    if manifest is None:
        return code
    print(json.dumps({"out": args.out, "shards": len(manifest.shards), "rows": manifest.token_count,
                      "norm_factors": manifest.norm_factors}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
