"""What each stage reads, resolved to content, and the stage keys hashed from it.

A stage's key is the hash of exactly what it reads (design.md, Decisions), so a change re-runs the
stages that depend on it and nothing else:

    screen    family, screened revisions with weight hashes, task contents, layer, screen settings
    select    screen key, selection settings (checkpoint count, a user-pinned set)
    extract   *selected* revisions with weight hashes, layer, corpus fingerprint, extraction settings
    train     extraction manifest key, training settings
    evaluate  train key, held-out settings
    attribute train key, task contents, attribution settings
    analyse   attribute key, screen key (its accuracy plots), analysis settings

Contents, not names: a task file is identified by the SHA-256 of its bytes, a local corpus by its
files' bytes, a checkpoint by the hash of its tensors. Launch settings (actors, workers, resources)
never enter a key.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from crossray.checkpoints import Family, checkpoint_hash
from crossray.config import CorpusConfig
from crossray.corpus import part_stats
from crossray.extract import sha256_file
from crossray.schema import schema_dict


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-able parts: a part with a `stage_identity()` is hashed by what it
    returns (content, not names: `graph`'s stage inputs), other dataclasses by their fields."""
    blob = json.dumps([schema_dict(p.stage_identity() if hasattr(p, "stage_identity") else p) for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@cache
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))  # once per file version in this process


def file_sha256(path: str | Path) -> str:
    st = os.stat(path)
    return _file_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def task_files(specs: Sequence[str], family: Family) -> list[str]:
    """Task specs with `toy` expanded to the toy family's task folder (files, folders or hub names)."""
    return [str(Path(family.source) / "tasks") if s == "toy" else s for s in specs]


def task_contents(specs: Sequence[str]) -> dict[str, str]:
    """Each task file's SHA-256 (a folder: its *.jsonl files); a hub data set: its name."""
    out = {}
    for spec in specs:
        p = Path(spec)
        files = sorted(p.glob("*.jsonl")) if p.is_dir() else [p] if p.is_file() else []
        if not files:
            out[spec] = f"hub:{spec}"
        for f in files:
            key = f.name if p.is_dir() else spec
            if key in out:  # two folders' files of one name: never one key for two contents
                raise ValueError(f"two task files are named {key} ({spec} and an earlier folder): rename one")
            out[key] = file_sha256(f)
    return out


def corpus_fingerprint(corpus: CorpusConfig) -> str:
    """The corpus's settings plus its content: local files by their bytes, files on a file system URI
    (s3://, gs://, ...) by their listing (size and modification time: reading a remote corpus at
    every run would cost as much as tokenising it), the toy generator by its spec, a hub data set
    by its name, config and split (the token hash goes in the manifest); a mixture by its sources'
    contents, its weights and its seed."""
    if corpus.mixture:
        return digest(corpus, [_content(part) for part in corpus.components([1] * len(corpus.mixture))])
    return digest(corpus, _content(corpus))


def _content(corpus: CorpusConfig) -> Any:
    path = Path(corpus.source)
    if corpus.source.startswith("toy"):
        content: Any = corpus.source
    elif "://" in corpus.source:
        content = part_stats(corpus)
    elif path.is_dir():
        content = {f.name: file_sha256(f) for f in sorted(path.iterdir()) if f.is_file()}
    elif path.is_file():
        content = file_sha256(path)
    else:
        content = f"hub:{corpus.source}"
    return content


def weight_hashes(family: Family, revisions: Sequence[str]) -> list[str]:
    return [checkpoint_hash(family, r) for r in revisions]
