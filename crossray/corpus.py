"""Token sequences of fixed length for activation extraction, with a corpus hash.

Like the paper (method.md §2): each sequence is the first `seq_len` tokens of one document at least that
long (shorter documents are dropped, longer ones truncated), no BOS prepended, in a deterministic order.
Sources:
- local files: `.jsonl` (field `text_field`), `.parquet` (column `text_field`), `.txt` (one document
  per blank-line-separated block), or a folder of them (sorted by name);
- `toy:SEED` / `toy:SEED:N_DOCS`: documents from the toy grammar, generated on the fly;
- anything else is a Hugging Face data set name (`datasets.load_dataset`, needs the network).
The hash covers the token ids, so the same tokens from any source give the same hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from crossray.config import CorpusConfig
from crossray.models.layer import encode

logger = logging.getLogger(__name__)


class CorpusError(ValueError):
    """A corpus that cannot be read or yields no usable sequence."""


def _local_documents(path: Path, text_field: str) -> Iterator[str]:
    files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".parquet", ".txt")) \
        if path.is_dir() else [path]
    if not files:
        raise CorpusError(f"corpus folder {path} holds no .jsonl, .parquet or .txt files")
    for f in files:
        match f.suffix:
            case ".jsonl":
                with open(f, "rb") as fh:
                    for i, raw in enumerate(fh, 1):
                        try:
                            line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
                            row = json.loads(line) if line.strip() else None
                        except (UnicodeDecodeError, json.JSONDecodeError) as e:
                            raise CorpusError(f"{f}:{i}: not a UTF-8 JSON line ({e})") from e
                        if row is not None:
                            if text_field not in row:
                                raise CorpusError(f"{f}:{i}: no field {text_field!r}")
                            yield row[text_field]
            case ".parquet":
                import pyarrow.parquet as pq

                table = pq.read_table(f)
                if text_field not in table.column_names:
                    raise CorpusError(f"{f}: no column {text_field!r} (has {table.column_names})")
                yield from table.column(text_field).to_pylist()
            case ".txt":
                yield from (d.strip() for d in f.read_text().split("\n\n") if d.strip())
            case other:
                raise CorpusError(f"{f}: unsupported corpus file type {other!r}")


def _toy_documents(spec: str) -> Iterator[str]:
    from crossray.toy.grammar import Grammar

    parts = spec.split(":")
    seed = int(parts[1]) if len(parts) > 1 and parts[1] else 0
    n_docs = int(parts[2]) if len(parts) > 2 else None
    grammar = Grammar(seed)
    i = 0
    while n_docs is None or i < n_docs:
        yield grammar.document(12)
        i += 1


def documents(cfg: CorpusConfig) -> Iterator[str]:
    if cfg.source.startswith("toy:") or cfg.source == "toy":
        return _toy_documents(cfg.source)
    path = Path(cfg.source)
    if path.exists():
        return _local_documents(path, cfg.text_field)
    if cfg.source.startswith(("/", ".", "~")) or path.suffix:
        raise CorpusError(f"corpus path {cfg.source} does not exist")
    import datasets

    try:
        ds = datasets.load_dataset(cfg.source, cfg.hub_config, split=cfg.split, streaming=True)
    except Exception as e:  # noqa: BLE001 (datasets raises many types; all mean "not loadable")
        raise CorpusError(f"cannot load corpus {cfg.source!r}: {e}") from e
    return (row[cfg.text_field] for row in ds)


def load_sequences(cfg: CorpusConfig, tokenizer, max_documents: int | None = None
                   ) -> tuple[torch.Tensor, str]:
    """(token ids (N, seq_len), corpus hash); documents shorter than seq_len are dropped."""
    rows: list[list[int]] = []
    for n_docs, doc in enumerate(documents(cfg), 1):
        ids = encode(tokenizer, doc)
        if len(ids) >= cfg.seq_len:
            rows.append(ids[: cfg.seq_len])
            if cfg.n_sequences is not None and len(rows) >= cfg.n_sequences:
                break
        if max_documents is not None and n_docs >= max_documents:
            break
    if not rows:
        raise CorpusError(f"corpus {cfg.source} has no document of {cfg.seq_len} tokens")
    if cfg.n_sequences is not None and len(rows) < cfg.n_sequences:
        logger.warning("corpus %s gave %d sequences of %d asked", cfg.source, len(rows), cfg.n_sequences)
    tokens = torch.tensor(rows, dtype=torch.long)
    return tokens, tokens_hash(tokens)


def tokens_hash(tokens: torch.Tensor) -> str:
    h = hashlib.sha256(f"{tuple(tokens.shape)}".encode())
    h.update(tokens.to(torch.int64).numpy().tobytes())
    return h.hexdigest()
