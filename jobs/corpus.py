"""The corpus read and tokenised by Ray Data, its sequences kept in the object store.

    corpus = read_corpus(ecfg, launch, extra=eval_sequences)   # a Corpus: TokenStore, count, hash
    tokens = corpus.store.get(0, 64)                             # (64, seq_len) int32, on any node

Steps (the rules are `crossray.corpus`'s, so one process gives the same sequences and hash):
1. one read task per part (a file on any pyarrow file system, or the toy / hub stream) yields its
   documents in blocks, in order;
2. tokenisation tasks (the tokenizer loaded once per worker process) cut each block into sequences,
   in parallel, and `preserve_order` keeps the corpus order;
3. the driver takes the blocks' refs as they come and stops the reading once it has the sequences
   it needs; each block becomes one int32 array in the object store, digested where it lies.
A small read (at most `DRIVER_BYTES` of tokens: a toy run, a smoke test) is done in the driver with
the same rules and put in the object store in blocks of at most BLOCK_BYTES, without Ray Data's
start-up (the same sequences and digests).
The driver holds only refs, offsets and 32 bytes of digest per sequence: at the paper's 400,240
sequences x 1,024 tokens that is 13 MB, against 1.6 GB of tokens, which stay spread over the nodes'
object stores (Ray spills them to disk if they do not fit).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
from dataclasses import dataclass

import numpy as np
import ray

from crossray import corpus as K
from crossray.config import ExtractConfig, LaunchConfig
from crossray.progress import Progress
from rayenv import torch_worker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenStore:
    """Sequences 0..n-1 as arrays in the object store, by block; picklable (refs, not data), so
    extraction actors and tasks fetch just the blocks they read."""

    refs: tuple
    """ObjectRef of an (n_i, seq_len) int32 array per block, in sequence order."""
    starts: tuple[int, ...]
    """The first sequence of each block."""
    n: int
    seq_len: int

    def get(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, seq_len) int32: sequences start..stop-1 (fetching only their blocks)."""
        if not 0 <= start <= stop <= self.n:
            raise IndexError(f"sequences {start}..{stop} outside 0..{self.n}")
        first = bisect.bisect_right(self.starts, start) - 1
        parts, i = [], max(first, 0)
        while i < len(self.refs) and self.starts[i] < stop:
            block = _cached_get(self.refs[i])
            lo, hi = max(start - self.starts[i], 0), min(stop - self.starts[i], len(block))
            parts.append(block[lo:hi])
            i += 1
        return np.concatenate(parts) if parts else np.zeros((0, self.seq_len), np.int32)


@dataclass(frozen=True)
class MixedStore:
    """A mixture's sequences 0..n-1: sequence i is the next unread one of source `schedule[i]`'s own
    store (`crossray.corpus.mixture_schedule`). Picklable: the stores' refs and the schedule (2 bytes a
    sequence: 0.8 MB at the paper's 400,240 sequences)."""

    stores: tuple[TokenStore, ...]
    schedule: np.ndarray
    n: int
    seq_len: int

    def get(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, seq_len) int32: sequences start..stop-1, each fetched from its source."""
        if not 0 <= start <= stop <= self.n:
            raise IndexError(f"sequences {start}..{stop} outside 0..{self.n}")
        before = np.bincount(self.schedule[:start], minlength=len(self.stores))  # each source's rows read
        wanted = np.bincount(self.schedule[start:stop], minlength=len(self.stores))
        return K.interleave(self.schedule[start:stop],
                            [store.get(int(a), int(a + n)) for store, a, n in zip(self.stores, before, wanted,
                                                                                   strict=True)])


@functools.lru_cache(maxsize=4)
def _cached_get(ref) -> np.ndarray:  # a worker reading consecutive ranges fetches each block once
    return ray.get(ref)


@dataclass(frozen=True)
class Corpus:
    store: TokenStore | MixedStore
    """Every sequence read: the training ones, then the `extra` held out after them."""
    n_train: int
    """Sequences for extraction (n_sequences, or fewer when the corpus is shorter)."""
    corpus_hash: str
    """Hash of the training sequences (`crossray.corpus.combine_digests`)."""


@functools.cache
def _tokenizer(family: str, revision: str, naming: str | None, tokenizer: str | None):
    from crossray.checkpoints import resolve_family
    from crossray.models.layer import load_tokenizer

    return load_tokenizer(resolve_family(family, revisions=(revision,), naming=naming,
                                         tokenizer=tokenizer), revision)


def _read(batch: dict, cfg) -> dict:
    """Generator UDF: one part's documents, a batch at a time, in order."""
    for part in batch["part"]:
        for docs in K.batched(K.part_documents(str(part), cfg)):
            yield {"text": np.array(docs, dtype=object)}


def _tokenize(batch: dict, ecfg: ExtractConfig) -> dict:
    tok = _tokenizer(ecfg.family, ecfg.revisions[0], ecfg.naming, ecfg.tokenizer)
    return {"ids": K.pack(tok, [str(t) for t in batch["text"]], ecfg.corpus.seq_len)}


HEAD_BYTES = 64 << 20
"""The most token bytes `head_sequences` reads in the driver (16M tokens, seconds to tokenise in one
process; the context scan of an analysis is a few MB)."""


def head_sequences(ecfg: ExtractConfig, stop: int) -> np.ndarray | None:
    """The corpus's first `stop` sequences (fewer at its end), read in this process with the same
    rules, when they are at most HEAD_BYTES of tokens; None when they are more (read with Ray Data)."""
    if stop * ecfg.corpus.seq_len * 4 > HEAD_BYTES:
        return None
    tok = _tokenizer(ecfg.family, ecfg.revisions[0], ecfg.naming, ecfg.tokenizer)
    tokens, _ = K.load_sequences(dataclasses.replace(ecfg.corpus, n_sequences=stop), tok)
    return tokens.numpy().astype(np.int32)


@ray.remote(num_returns=2, runtime_env=torch_worker())
def _index_block(block, seq_len: int) -> tuple[np.ndarray, bytes]:
    """A block as one int32 array (zero-copy for its readers) and its sequences' digests."""
    from ray.data.block import BlockAccessor

    acc = BlockAccessor.for_block(block)
    ids = acc.to_numpy("ids").reshape(-1, seq_len) if acc.num_rows() else np.zeros((0, seq_len))
    ids = np.ascontiguousarray(ids, dtype=np.int32)
    return ids, K.sequence_digests(ids)


BLOCK_BYTES = 1 << 20
"""Target block size: the reading stops at most a block past the sequences needed (and 1 MiB blocks
of 1,024-token sequences are 256 sequences: a fetch-sized unit for the extraction actors)."""


def sequence_dataset(ecfg: ExtractConfig, launch: LaunchConfig) -> ray.data.Dataset:
    """Rows `ids: (seq_len,) int32` of the corpus in its order, lazily (nothing read yet)."""
    corpus = ecfg.corpus
    parts = K.parts(corpus)
    ds = ray.data.from_items([{"part": p} for p in parts], override_num_blocks=len(parts))
    ds.context.execution_options.preserve_order = True
    ds.context.target_max_block_size = BLOCK_BYTES
    # different CPU requests keep Ray from fusing the two steps, so one file is tokenised in parallel
    ds = ds.map_batches(_read, batch_size=1, fn_kwargs={"cfg": corpus}, num_cpus=0.25,
                        runtime_env=torch_worker())
    return ds.map_batches(_tokenize, batch_size=None, fn_kwargs={"ecfg": ecfg},
                          num_cpus=max(launch.cpus_per_actor, 0.5), runtime_env=torch_worker())


def _cause(e: BaseException) -> BaseException:
    """The corpus's own error (a CorpusError naming file and line) inside Ray's wrappers."""
    while getattr(e, "cause", None) is not None or e.__cause__ is not None:
        e = getattr(e, "cause", None) or e.__cause__  # type: ignore[assignment]
        if isinstance(e, K.CorpusError):
            return e
    return e


def read_corpus(ecfg: ExtractConfig, launch: LaunchConfig | None = None, extra: int = 0) -> Corpus:
    """The corpus's first `n_sequences` sequences plus `extra` after them, in the object store; a
    mixture's sources each read as a corpus of their own, interleaved by the mixture's schedule."""
    launch = launch or LaunchConfig()
    corpus = ecfg.corpus
    wanted = None if corpus.n_sequences is None else corpus.n_sequences + extra
    if corpus.mixture:
        store, digests = _read_mixture(ecfg, launch, wanted)  # type: ignore[arg-type]
    else:
        store, digests = _read_source(ecfg, launch, wanted)
    n_train = store.n if corpus.n_sequences is None else min(store.n, corpus.n_sequences)
    K.check_count(corpus, n_train)
    corpus_hash = K.combine_digests(digests[: n_train * K.DIGEST_BYTES], corpus.seq_len)
    logger.info("corpus %s: %d sequences of %d tokens, the last %d held out", corpus.label, store.n,
                corpus.seq_len, store.n - n_train)
    return Corpus(store, n_train, corpus_hash)


def _read_mixture(ecfg: ExtractConfig, launch: LaunchConfig, wanted: int) -> tuple[MixedStore, bytes]:
    """Each source's share of `wanted` sequences, read as a corpus of its own, and the digests of the
    mixture in its order (the driver holds 32 bytes a sequence, as for one source)."""
    schedule, counts = K.mixture_counts(ecfg.corpus, wanted)
    stores, digests = [], []
    for k, part in enumerate(ecfg.corpus.components(counts)):
        store, d = _read_source(dataclasses.replace(ecfg, corpus=part), launch, int(counts[k]))
        K.check_share(ecfg.corpus, k, store.n, int(counts[k]))
        stores.append(store)
        digests.append(np.frombuffer(d, np.uint8).reshape(-1, K.DIGEST_BYTES))
    mixed = K.interleave(schedule, digests)
    return MixedStore(tuple(stores), schedule, wanted, ecfg.corpus.seq_len), mixed.tobytes()


DRIVER_BYTES = 4 << 20
"""A source whose wanted sequences are at most this many token bytes (1M tokens: a second or two to
tokenise in one process) is read in the driver and put in the object store in blocks: Ray Data's
start-up (seconds of task and worker start) would cost more than the reading. Larger ones, and a
whole corpus (`n_sequences: null`), go through Ray Data."""


def _read_source(ecfg: ExtractConfig, launch: LaunchConfig, wanted: int | None) -> tuple[TokenStore, bytes]:
    """One source's first `wanted` sequences (all when None) in the object store, and their digests.

    The driver iterates the blocks' refs as Ray Data produces them (in corpus order) and stops once
    it has enough, which cancels the reading; each block is indexed where it lies. A small read
    (`DRIVER_BYTES`) is done here, with the same rules: the same sequences and digests, in blocks of at
    most BLOCK_BYTES."""
    corpus = ecfg.corpus
    if wanted is not None and wanted * corpus.seq_len * 4 <= DRIVER_BYTES:
        ids = head_sequences(ecfg, wanted)
        assert ids is not None  # DRIVER_BYTES <= HEAD_BYTES
        rows = max(BLOCK_BYTES // (corpus.seq_len * 4), 1)
        starts = tuple(range(0, len(ids), rows))
        refs = tuple(ray.put(np.ascontiguousarray(ids[i:i + rows])) for i in starts)
        return TokenStore(refs, starts, len(ids), corpus.seq_len), K.sequence_digests(ids)
    indexed, seen = [], 0
    progress = Progress("corpus", wanted or 0, "sequences")
    try:
        bundles = sequence_dataset(ecfg, launch).iter_internal_ref_bundles()
        for bundle in bundles:
            indexed += [_index_block.remote(ref, corpus.seq_len) for ref in bundle.block_refs]
            rows = bundle.num_rows() or 0
            seen += rows
            progress.update(rows, tokens=rows * corpus.seq_len)
            if wanted is not None and seen >= wanted:
                break
        del bundles  # stops the reading
        progress.close()
        digests = ray.get([d for _, d in indexed])
    except Exception as e:
        cause = _cause(e)
        if isinstance(cause, K.CorpusError):  # a bad corpus file: its own line, not Ray's traceback
            raise K.CorpusError(str(cause).splitlines()[0]) from None
        raise
    sizes = [len(d) // K.DIGEST_BYTES for d in digests]
    n = sum(sizes) if wanted is None else min(sum(sizes), wanted)
    starts = np.cumsum([0, *sizes[:-1]]).tolist()
    keep = [i for i, s in enumerate(sizes) if s and starts[i] < n]
    store = TokenStore(tuple(indexed[i][0] for i in keep), tuple(starts[i] for i in keep), n, corpus.seq_len)
    return store, b"".join(digests)[: n * K.DIGEST_BYTES]
