"""Token sequences of fixed length for activation extraction, and the corpus hash.

Like the paper (method.md §2): each sequence is the first `seq_len` tokens of one document at least that
long (shorter documents are dropped, longer ones truncated), no BOS prepended, in a deterministic order.

Sources (`CorpusConfig.source`):
- a local file or folder, or a path on any pyarrow file system (`s3://bucket/pile/`, `gs://...`,
  `file:///...`): `.jsonl` (field `text_field`; also `.jsonl.gz`, `.jsonl.zst`), `.parquet` (column
  `text_field`), `.txt` (documents separated by blank lines); a folder's files of these kinds are read in
  the order of their names;
- `toy:SEED` / `toy:SEED:N_DOCS`: documents from the toy grammar, generated on the fly;
- anything else is a Hugging Face data set name, streamed (`datasets.load_dataset(..., streaming=True)`).

The corpus is a list of *parts* read in order (`parts`: a source's files, or the one toy or hub stream),
each yielding its documents (`part_documents`), cut into sequences a batch of documents at a time
(`pack`). One process (`load_sequences`) and Ray Data (`jobs/corpus.py`: a read task per part,
tokenisation in parallel, the order preserved) run these same functions.

A mixture (`CorpusConfig.mixture`: BLOOM's ten languages) reads each source as a corpus of its own and
interleaves their sequences by a seeded schedule (`mixture_schedule`), so the sources are tokenised in
parallel and each keeps its own order.

The corpus hash is SHA-256 over a header (sequence count and length) and every sequence's own SHA-256
(`sequence_digests`), in order. A block of sequences is digested wherever it lies and only the 32-byte
digests are combined (`combine_digests`), so the hash is the same whether the corpus was read in one
process or in many blocks on many nodes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch  # NOTE: at import, not lazily: a Ray worker importing torch inside a task while it loads

#               another remote function's module (which imports torch) hits a partially initialised torch
from crossray.config import CorpusConfig
from crossray.tokens import pack

logger = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".txt")
DIGEST_BYTES = 32
DOCS_PER_BATCH = 256
"""Documents tokenised together (one call into the fast tokenizer)."""


class CorpusError(ValueError):
    """A corpus that cannot be read or yields no usable sequence."""


# -- parts and their documents ----------------------------------------------------------------------

def is_toy(source: str) -> bool:
    return source == "toy" or source.startswith("toy:")


def _filesystem(source: str):
    """(pyarrow file system, path on it) of a local path or a file system URI; None for neither."""
    import pyarrow.fs as pafs

    if "://" in source:
        try:
            return pafs.FileSystem.from_uri(source)
        except Exception as e:  # noqa: BLE001 (pyarrow raises several types for a bad URI)
            raise CorpusError(f"cannot open corpus {source}: {e}") from e
    path = Path(source).expanduser()
    return (pafs.LocalFileSystem(), str(path.resolve())) if path.exists() else None


def is_files(source: str) -> bool:
    """A local path that exists, or a file system URI (the hub and the toy are neither)."""
    return not is_toy(source) and ("://" in source or Path(source).expanduser().exists())


def _uri(source: str, path: str) -> str:
    return path if "://" not in source else f"{source.split('://', 1)[0]}://{path}"


def parts(cfg: CorpusConfig) -> list[str]:
    """The corpus's parts in reading order: its files (paths or URIs), or the one toy / hub stream.
    Raises CorpusError for a local path that does not exist or a folder with no corpus file."""
    source = cfg.source
    if is_toy(source):
        return [source]
    if not is_files(source):
        if source.startswith(("/", ".", "~")) or Path(source).suffix in SUFFIXES:
            raise CorpusError(f"corpus path {source} does not exist")
        return [f"hub:{source}"]
    import pyarrow.fs as pafs

    fs, path = _filesystem(source)  # type: ignore[misc]
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise CorpusError(f"corpus path {source} does not exist")
    if info.type == pafs.FileType.File:
        return [_uri(source, path)]
    found = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path))
                   if i.type == pafs.FileType.File and i.path.endswith(SUFFIXES))
    if not found:
        raise CorpusError(f"corpus folder {source} holds no {', '.join(SUFFIXES)} files")
    return [_uri(source, p) for p in found]


def part_stats(cfg: CorpusConfig) -> list[tuple[str, int, int | None]]:
    """(part, size, modification time in ns) of each file of a file corpus, from its file system's
    listing: what identifies a remote corpus without reading it."""
    fs, _ = _filesystem(cfg.source)  # type: ignore[misc]
    found = parts(cfg)
    infos = fs.get_file_info([p.split("://", 1)[-1] for p in found])
    return [(p, i.size, i.mtime_ns) for p, i in zip(found, infos, strict=True)]


def _jsonl_documents(lines: Iterable[bytes], name: str, text_field: str) -> Iterator[str]:
    for i, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
            row = json.loads(line) if line.strip() else None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorpusError(f"{name}:{i}: not a UTF-8 JSON line ({e})") from e
        if row is not None:
            if not isinstance(row, dict) or text_field not in row:
                raise CorpusError(f"{name}:{i}: no field {text_field!r}")
            yield row[text_field]


def _txt_documents(lines: Iterable[bytes], name: str) -> Iterator[str]:
    doc: list[str] = []
    for i, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise CorpusError(f"{name}:{i}: not UTF-8 ({e})") from e
        if line.strip():
            doc.append(line)
        elif doc:
            yield "".join(doc).strip()
            doc = []
    if doc:
        yield "".join(doc).strip()


def _file_documents(part: str, text_field: str) -> Iterator[str]:
    fs, path = _filesystem(part)  # type: ignore[misc]
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            if text_field not in pf.schema_arrow.names:
                raise CorpusError(f"{part}: no column {text_field!r} (has {pf.schema_arrow.names})")
            for batch in pf.iter_batches(batch_size=DOCS_PER_BATCH, columns=[text_field]):
                yield from batch.column(0).to_pylist()
        return
    with fs.open_input_stream(path, compression="detect") as f:
        lines = io.BufferedReader(f, buffer_size=1 << 20)  # type: ignore[arg-type]
        if path.endswith(".txt"):
            yield from _txt_documents(lines, part)
        else:
            yield from _jsonl_documents(lines, part, text_field)


def _toy_documents(spec: str) -> Iterator[str]:
    from crossray.toy.grammar import Grammar

    fields = spec.split(":")
    seed = int(fields[1]) if len(fields) > 1 and fields[1] else 0
    n_docs = int(fields[2]) if len(fields) > 2 else None
    grammar = Grammar(seed)
    i = 0
    while n_docs is None or i < n_docs:
        yield grammar.document(12)
        i += 1


def hub_documents(cfg: CorpusConfig) -> Iterator[str]:
    """A Hugging Face data set's documents, streamed in its order (needs the network or its cache)."""
    import datasets

    try:
        ds = datasets.load_dataset(cfg.source, cfg.hub_config, split=cfg.split, streaming=True)
    except Exception as e:  # noqa: BLE001 (datasets raises many types; all mean "not loadable")
        raise CorpusError(f"cannot load corpus {cfg.source!r}: {e}") from e
    for row in ds:
        if cfg.text_field not in row:
            raise CorpusError(f"corpus {cfg.source}: no field {cfg.text_field!r} (has {sorted(row)})")
        yield row[cfg.text_field]


def part_documents(part: str, cfg: CorpusConfig) -> Iterator[str]:
    """The documents of one part (from `parts`), in order."""
    if is_toy(part):
        return _toy_documents(part)
    if part.startswith("hub:"):
        return hub_documents(cfg)
    return _file_documents(part, cfg.text_field)


def documents(cfg: CorpusConfig) -> Iterator[str]:
    """Every document of the corpus, in order (one process)."""
    for part in parts(cfg):
        yield from part_documents(part, cfg)


def batched(docs: Iterable[str], size: int = DOCS_PER_BATCH) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# -- sequences --------------------------------------------------------------------------------------

def mixture_schedule(weights: Sequence[float], n: int, seed: int) -> np.ndarray:
    """The source of each of a mixture's first `n` sequences, (n,) int16.

    Source k's j-th sequence is due at time (j + u_k) / w_k, with w_k its normalised weight and u_k in
    [0, 1) drawn from `seed`; the n earliest are the corpus, in time order. So every prefix of the
    corpus holds each source's share of it to within one sequence, and the schedule of n sequences is a
    prefix of the schedule of more (the held-out sequences follow the training ones)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    u = np.random.default_rng(seed).random(len(w))
    times = [(np.arange(int(np.ceil(n * wk)) + 1) + u[k]) / wk for k, wk in enumerate(w)]
    owners = np.concatenate([np.full(len(t), k, np.int16) for k, t in enumerate(times)])
    return owners[np.argsort(np.concatenate(times), kind="stable")[:n]]


def mixture_counts(cfg: CorpusConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(schedule of the first n sequences, how many of them each source gives)."""
    schedule = mixture_schedule([m.weight for m in cfg.mixture], n, cfg.mixture_seed)
    return schedule, np.bincount(schedule, minlength=len(cfg.mixture))


def interleave(schedule: np.ndarray, parts: Sequence[np.ndarray]) -> np.ndarray:
    """Rows of each source's part placed where the schedule names the source, in order: row i is the
    next row of part `schedule[i]` (token ids in one process, digests in the driver)."""
    out = np.empty((len(schedule), *parts[0].shape[1:]), parts[0].dtype)
    for k, part in enumerate(parts):
        rows = schedule == k
        out[rows] = part[: int(rows.sum())]
    return out


def check_share(cfg: CorpusConfig, k: int, got: int, wanted: int) -> None:
    if got < wanted:
        m = cfg.mixture[k]
        raise CorpusError(f"mixture source {m.source}{'/' + m.hub_config if m.hub_config else ''} gave "
                          f"{got} sequences of {cfg.seq_len} tokens; its weight {m.weight:g} asks {wanted}")


def load_sequences(cfg: CorpusConfig, tokenizer) -> tuple[torch.Tensor, str]:
    """(token ids (N, seq_len), corpus hash) in one process; documents shorter than seq_len are dropped."""
    if cfg.mixture:
        return _load_mixture(cfg, tokenizer)
    blocks, n = [], 0
    for docs in batched(documents(cfg)):
        block = pack(tokenizer, docs, cfg.seq_len)
        if cfg.n_sequences is not None:
            block = block[: cfg.n_sequences - n]
        blocks.append(block)
        n += len(block)
        if cfg.n_sequences is not None and n >= cfg.n_sequences:
            break
    check_count(cfg, n)
    tokens = torch.from_numpy(np.concatenate(blocks)).long()
    return tokens, tokens_hash(tokens)


def _load_mixture(cfg: CorpusConfig, tokenizer) -> tuple[torch.Tensor, str]:
    assert cfg.n_sequences is not None  # CorpusConfig refuses a mixture without it
    schedule, counts = mixture_counts(cfg, cfg.n_sequences)
    parts = []
    for k, (part, n) in enumerate(zip(cfg.components(counts), counts, strict=True)):
        ids = load_sequences(part, tokenizer)[0].numpy() if n else np.zeros((0, cfg.seq_len), np.int64)
        check_share(cfg, k, len(ids), int(n))
        parts.append(ids)
    tokens = torch.from_numpy(interleave(schedule, parts))
    return tokens, tokens_hash(tokens)


def check_count(cfg: CorpusConfig, n: int) -> None:
    """Refuse a corpus with no usable sequence; warn when it has fewer than asked."""
    if n == 0:
        raise CorpusError(f"corpus {cfg.label} has no document of {cfg.seq_len} tokens")
    if cfg.n_sequences is not None and n < cfg.n_sequences:
        logger.warning("corpus %s gave %d sequences of %d asked", cfg.label, n, cfg.n_sequences)


def sequence_digests(tokens_NS: np.ndarray | torch.Tensor) -> bytes:
    """Each sequence's SHA-256 (of its ids as little-endian int64), concatenated: 32 bytes a sequence."""
    ids = np.asarray(tokens_NS, dtype="<i8")
    return b"".join(hashlib.sha256(row.tobytes()).digest() for row in ids)


def combine_digests(digests: bytes, seq_len: int) -> str:
    """The corpus hash of sequences given by their digests, in order."""
    n = len(digests) // DIGEST_BYTES
    h = hashlib.sha256(f"crossray corpus: {n} sequences of {seq_len} tokens\n".encode())
    h.update(digests)
    return h.hexdigest()


def tokens_hash(tokens_NS: np.ndarray | torch.Tensor) -> str:
    return combine_digests(sequence_digests(tokens_NS), int(tokens_NS.shape[1]))
