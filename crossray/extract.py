"""Activations of a checkpoint set at one layer: the same token rows through every checkpoint.

Rows are `seq:int64, pos:int32, acts:[C, D]`. The forward pass of each checkpoint stops at the hooked
block (`models.layer.LayerModel`). Two sinks, both driven by `jobs/extract.py`:
- streaming: rows go straight into training (no disk);
- Parquet shards + `manifest.json` (checkpoints with weight hashes, layer, corpus hash, token count,
  normalisation factors, per-shard SHA-256): each shard holds a fixed range of sequences and is written
  atomically under its own name, so a retried or resumed extraction never duplicates or loses rows.

The normalisation factors (method.md §3.4) are estimated once, on the first `norm_sequences` sequences,
over the rows training sees, and stored in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from crossray.checkpoints import CheckpointError, Family
from crossray.config import ExtractConfig, ExtractSettings
from crossray.models.crosscoder import norm_factors
from crossray.models.layer import LayerModel, load_layer_model
from crossray.store import write_json_atomic

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """A shard folder whose manifest or shards cannot be trusted."""


# -- the extractor ---------------------------------------------------------------------------------

def extract_family(cfg: ExtractConfig) -> Family:
    """The family an extraction reads (resolving `toy` builds or reuses the toy in the cache)."""
    from crossray.checkpoints import resolve_family

    return resolve_family(cfg.family, revisions=cfg.revisions, naming=cfg.naming, tokenizer=cfg.tokenizer)


def check_same_width(family: Family, revisions: Sequence[str], layer: int | None = None) -> int:
    """Hidden size shared by every checkpoint (read from configs only, no weights); refuse a mixed
    set, and a layer that some checkpoint does not have."""
    from transformers import AutoConfig

    from crossray.models.layer import check_layer

    widths = {}
    for rev in revisions:
        src, r = family.location(rev)
        config = AutoConfig.from_pretrained(src, revision=r)
        widths[rev] = config.hidden_size
        if layer is not None:
            check_layer(layer, config.num_hidden_layers, f"{family.name}@{rev}")
    if len(set(widths.values())) != 1:
        raise CheckpointError(f"checkpoints of one set must share a hidden size, got {widths}")
    return next(iter(widths.values()))


class CheckpointSetExtractor:
    """Holds every checkpoint of the set once; maps token ids (N, S) to activations (N, S, C, D)."""

    def __init__(self, cfg: ExtractConfig, device: str | torch.device):
        family = extract_family(cfg)
        self.d_model = check_same_width(family, cfg.revisions)
        dtype = torch.bfloat16 if cfg.compute_dtype == "bfloat16" else torch.float32
        self.cfg = cfg
        self.device = torch.device(device)
        self.models: list[LayerModel] = [load_layer_model(family, r, cfg.layer, dtype=dtype, device=device)
                                         for r in cfg.revisions]
        self.sequences_run = dict.fromkeys(cfg.revisions, 0)
        """Sequences each checkpoint has run forward (what an extraction costs, counted)."""

    @classmethod
    def of_models(cls, cfg: ExtractConfig, models: Sequence[LayerModel], device: str | torch.device
                  ) -> CheckpointSetExtractor:
        """The extractor over models already on `device` (one per revision of `cfg`): the benchmarks
        time extraction of random weights of a given shape through this same code."""
        self = cls.__new__(cls)
        self.cfg, self.device, self.models = cfg, torch.device(device), list(models)
        self.d_model = int(self.models[0].model.config.hidden_size)
        self.sequences_run = dict.fromkeys(cfg.revisions, 0)
        return self

    @torch.inference_mode()
    def __call__(self, tokens_NS: torch.Tensor) -> torch.Tensor:
        out = []
        # fp32 weights run under bf16 autocast on a GPU, as the paper's extraction did (method.md §3.3)
        autocast = self.device.type == "cuda" and self.cfg.compute_dtype == "float32"
        for i in range(0, len(tokens_NS), self.cfg.batch_sequences):
            ids = tokens_NS[i:i + self.cfg.batch_sequences].to(self.device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                acts = [m.resid_pre(ids).float() for m in self.models]  # C x (n, S, D)
            for rev in self.sequences_run:
                self.sequences_run[rev] += len(ids)
            out.append(torch.stack(acts, dim=2).cpu())  # (n, S, C, D)
        return torch.cat(out)


def to_rows(seq_ids: np.ndarray, acts_NSCD: torch.Tensor, drop_first_position: bool) -> dict:
    """Flatten (N, S, C, D) activations to rows seq, pos, acts (C, D)."""
    N, S, C, D = acts_NSCD.shape
    start = 1 if drop_first_position else 0
    acts = acts_NSCD[:, start:].reshape(-1, C, D)  # (N*(S-start), C, D)
    seq = np.repeat(np.asarray(seq_ids, dtype=np.int64), S - start)
    pos = np.tile(np.arange(start, S, dtype=np.int32), N)
    return {"seq": seq, "pos": pos, "acts": acts.numpy()}


NORM_POLICIES = ("without_position0", "with_position0")
"""The two normalisation estimates (method.md §3.4, §16.8): training's view (positions 1..), and the
paper's (every position, position 0 included, though training drops it)."""


def norm_stats(seq_ids: np.ndarray, acts_NSCD: torch.Tensor, seq_limit: int) -> dict:
    """Sums of ||x_c|| and their counts over the sequences below `seq_limit`, for position 0
    (`first_*`) and for the others (`rest_*`), from the extractor's (N, S, C, D) output before any
    position is dropped; norms in fp32 (one vector at a time), sums in fp64, no copy of the batch."""
    keep = torch.from_numpy(np.asarray(seq_ids) < seq_limit)
    n = int(keep.sum())
    norms_nSC = acts_NSCD[keep].norm(dim=-1).double() if n else torch.zeros(0, 1, acts_NSCD.shape[2])
    return {"first_sum": norms_nSC[:, :1].sum((0, 1)).tolist(), "first_count": n,
            "rest_sum": norms_nSC[:, 1:].sum((0, 1)).tolist(), "rest_count": n * (acts_NSCD.shape[1] - 1)}


def merge_norm_stats(parts: Sequence[dict]) -> dict:
    """`norm_stats` of several batches or shards, added up."""
    return {"first_sum": np.sum([p["first_sum"] for p in parts], axis=0).tolist(),
            "first_count": sum(int(p["first_count"]) for p in parts),
            "rest_sum": np.sum([p["rest_sum"] for p in parts], axis=0).tolist(),
            "rest_count": sum(int(p["rest_count"]) for p in parts)}


def norm_factor_policies(stats: dict, d_model: int) -> dict[str, list[float]]:
    """The normalisation factors under both position-0 policies (`NORM_POLICIES`)."""
    both = np.add(stats["first_sum"], stats["rest_sum"])
    return {"without_position0": norm_factors(stats["rest_sum"], stats["rest_count"], d_model),
            "with_position0": norm_factors(both, stats["first_count"] + stats["rest_count"], d_model)}


def chosen_policy(cfg: ExtractSettings) -> str:
    return "with_position0" if cfg.norm_first_position else "without_position0"


# -- Parquet shards ----------------------------------------------------------------------------------

def _bf16_bits(acts: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(acts, dtype=np.float32)).to(torch.bfloat16) \
        .view(torch.int16).numpy().view(np.uint16)


def write_shard(path: Path, rows: dict, storage_dtype: str) -> dict:
    """Write rows as one Parquet file atomically; return its name, row count and SHA-256."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    acts = rows["acts"]
    n, C, D = acts.shape
    flat = _bf16_bits(acts) if storage_dtype == "bfloat16" else acts.astype(np.float32)
    tensor_type = pa.fixed_shape_tensor(pa.from_numpy_dtype(flat.dtype), (C, D))
    storage = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), C * D)
    table = pa.table({
        "seq": pa.array(rows["seq"], pa.int64()),
        "pos": pa.array(rows["pos"], pa.int32()),
        "acts": pa.ExtensionArray.from_storage(tensor_type, storage),
    }).replace_schema_metadata({"acts_dtype": storage_dtype})
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        pq.write_table(table, tmp, compression="none")
        digest = sha256_file(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written shard behind
        raise
    return {"name": path.name, "rows": n, "sha256": digest}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_shard(path: Path) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """(seq, pos, acts float32 (N, C, D)) of one shard; plain pyarrow, no Ray."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    dtype = (table.schema.metadata or {}).get(b"acts_dtype", b"float32").decode()
    col = table.column("acts").combine_chunks()
    shape = tuple(col.type.shape)
    flat = col.storage.flatten().to_numpy(zero_copy_only=False).reshape(-1, *shape)
    if dtype == "bfloat16":
        acts = torch.from_numpy(flat.view(np.int16).copy()).view(torch.bfloat16).float()
    else:
        acts = torch.from_numpy(flat.astype(np.float32, copy=True))
    return table.column("seq").to_numpy(), table.column("pos").to_numpy(), acts


def extract_shard(extractor: CheckpointSetExtractor, tokens_NS: np.ndarray, index: int, start: int,
                  out: Path) -> dict:
    """Extract sequences start.. (their tokens `tokens_NS`) and write them as shard `index`, with a
    JSON sidecar.

    Returns the shard's manifest entry plus its normalisation statistics (rows of sequences below
    `norm_sequences`). The Parquet file and then the sidecar are each replaced atomically, so a shard
    with a matching sidecar is complete.
    """
    cfg = extractor.cfg
    stop = start + len(tokens_NS)
    acts = extractor(torch.from_numpy(np.asarray(tokens_NS)).long())
    rows = to_rows(np.arange(start, stop), acts, cfg.corpus.drop_first_position)
    info = write_shard(out / shard_name(index), rows, cfg.storage_dtype)
    info.update(index=index, seq_start=start, seq_stop=stop, pid=os.getpid(),
                **norm_stats(np.arange(start, stop), acts, cfg.norm_sequences))
    write_json_atomic(out / (info["name"] + ".json"), info)
    return info


def factors_from_shards(shards: Sequence[dict], d_model: int, drop_first_position: bool
                        ) -> dict[str, list[float]]:
    """Both policies' factors from the shards' sidecar statistics. Shards written before both were
    kept carry one sum (`norm_sum`) over the rows they stored: position 0 included exactly when it was
    not dropped, so only that policy is known (`extraction_key` keeps them from a run wanting the
    other)."""
    if all("rest_sum" in s for s in shards):
        return norm_factor_policies(merge_norm_stats(shards), d_model)
    if any("rest_sum" in s for s in shards):
        raise ManifestError("the shards mix two formats of normalisation statistics; extract again")
    legacy = "without_position0" if drop_first_position else "with_position0"
    return {legacy: norm_factors(np.sum([s["norm_sum"] for s in shards], axis=0),
                                 sum(s["norm_count"] for s in shards), d_model)}


# -- manifest ------------------------------------------------------------------------------------------

@dataclass
class Manifest:
    key: str
    family: str
    revisions: list[str]
    weight_hashes: list[str]
    layer: int
    d_model: int
    corpus_hash: str
    seq_len: int
    n_sequences: int
    drop_first_position: bool
    storage_dtype: str
    norm_factors: list[float]
    """The factors that scale training's inputs (the policy `extract.norm_first_position` picks)."""
    token_count: int = 0
    shards: list[dict] = field(default_factory=list)
    norm_factors_by_policy: dict[str, list[float]] = field(default_factory=dict)
    """The factors under both position-0 policies (`NORM_POLICIES`), for the record."""

    def write(self, folder: Path) -> None:
        write_json_atomic(folder / MANIFEST, asdict(self))

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        path = Path(folder) / MANIFEST
        if not path.exists():
            raise ManifestError(f"{path} does not exist")
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise ManifestError(f"{path} is not a crossray manifest: {e}") from e

    def verify(self, folder: str | Path) -> None:
        """Every shard present with the recorded checksum; raise naming the first bad one."""
        folder = Path(folder)
        for shard in self.shards:
            path = folder / shard["name"]
            if not path.exists():
                raise ManifestError(f"shard {path} listed in the manifest is missing")
            if sha256_file(path) != shard["sha256"]:
                raise ManifestError(f"shard {path} does not match its manifest checksum "
                                    f"(sha256 {shard['sha256'][:12]}...): corrupted or replaced")

    def shard_paths(self, folder: str | Path) -> list[Path]:
        return [Path(folder) / s["name"] for s in self.shards]


def extraction_key(cfg: ExtractConfig, weight_hashes: Sequence[str], corpus_hash: str) -> str:
    inputs = {"hashes": list(weight_hashes), "layer": cfg.layer, "corpus": corpus_hash,
              "drop0": cfg.corpus.drop_first_position, "dtype": cfg.storage_dtype,
              "compute": cfg.compute_dtype, "shard": cfg.shard_sequences, "norm": cfg.norm_sequences}
    # Before both policies were kept, the factors included position 0 exactly when the rows did; an
    # extraction whose policy is that one keeps its key (and its shards: hours at the paper's scale).
    if cfg.norm_first_position != (not cfg.corpus.drop_first_position):
        inputs["norm0"] = cfg.norm_first_position
    blob = json.dumps(inputs, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve_hashes(cfg: ExtractConfig) -> list[str]:
    family = extract_family(cfg)
    from crossray.checkpoints import resolve_checkpoint_set

    return list(resolve_checkpoint_set(family, cfg.revisions).hashes)


def shard_plan(n_sequences: int, shard_sequences: int) -> list[tuple[int, int, int]]:
    """(shard index, first sequence, end sequence) covering every sequence exactly once."""
    return [(i, s, min(s + shard_sequences, n_sequences))
            for i, s in enumerate(range(0, n_sequences, shard_sequences))]


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.parquet"


# -- reading rows back for training ----------------------------------------------------------------

def shuffled_batches(paths: Sequence[Path], batch_size: int, buffer_rows: int, seed: int,
                     drop_last: bool = True) -> Iterator[torch.Tensor]:
    """Batches (B, C, D) from shards in order through a local shuffle buffer of `buffer_rows` rows."""
    gen = torch.Generator().manual_seed(seed)
    buffer: list[torch.Tensor] = []
    size = 0
    for path in paths:
        buffer.append(read_shard(path)[2])
        size += len(buffer[-1])
        if size >= buffer_rows + batch_size:
            pool = torch.cat(buffer)
            pool = pool[torch.randperm(len(pool), generator=gen)]
            n_out = (len(pool) - buffer_rows) // batch_size * batch_size
            yield from pool[:n_out].split(batch_size)
            buffer, size = [pool[n_out:]], len(pool) - n_out
    if size:
        pool = torch.cat(buffer)
        pool = pool[torch.randperm(len(pool), generator=gen)]
        for b in pool.split(batch_size):
            if len(b) == batch_size or not drop_last:
                yield b
