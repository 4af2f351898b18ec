"""The corpus read and tokenised by Ray Data: the same sequences and the same hash as one process,
however many blocks and files it comes in; bad files named by file and line; no token in the driver."""

import dataclasses
import gzip
import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crossray.config import CorpusConfig, ExtractConfig, LaunchConfig
from crossray.corpus import CorpusError, load_sequences, tokens_hash
from jobs import corpus as corpus_job

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def corpus_folder(toy_dir, tmp_path_factory):
    """The toy corpus's documents in four parts of four kinds: JSONL with a BOM and CRLF line ends,
    gzipped JSONL, Parquet, and text with blank lines between documents (read in name order)."""
    docs = [json.loads(line)["text"] for line in (toy_dir / "corpus" / "train.jsonl").open()][:600]
    folder = tmp_path_factory.mktemp("corpus")
    lines = [json.dumps({"text": d, "meta": {"i": i}}) for i, d in enumerate(docs[:150])]
    (folder / "a.jsonl").write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode())
    with gzip.open(folder / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[150:300])
    pq.write_table(pa.table({"text": docs[300:450]}), folder / "c.parquet", row_group_size=40)
    (folder / "d.txt").write_text("\n\n".join(docs[450:]) + "\n")
    (folder / "notes.md").write_text("not a corpus file")
    return folder


def _ecfg(toy_dir, source, n_sequences=None, seq_len=32) -> ExtractConfig:
    return ExtractConfig(family=str(toy_dir), revisions=("step0", "step128"), layer=2,
                         corpus=CorpusConfig(source=str(source), seq_len=seq_len, n_sequences=n_sequences))


def test_ray_data_gives_one_process_sequences_and_hash(ray_cluster, toy_dir, toy_tokenizer, corpus_folder,
                                                       monkeypatch):
    ecfg = _ecfg(toy_dir, corpus_folder)
    tokens, one_process_hash = load_sequences(ecfg.corpus, toy_tokenizer)
    assert len(tokens) > 400  # every part contributes (most toy documents have 32 tokens)
    whole = corpus_job.read_corpus(ecfg)
    monkeypatch.setattr(corpus_job, "BLOCK_BYTES", 4096)  # 32 sequences a block
    blocks = corpus_job.read_corpus(ecfg)
    assert len(whole.store.refs) < len(blocks.store.refs) and len(blocks.store.refs) >= 10
    for got in (whole, blocks):
        assert got.n_train == got.store.n == len(tokens)
        assert np.array_equal(got.store.get(0, got.store.n), tokens.numpy())
        assert got.corpus_hash == one_process_hash == tokens_hash(tokens)
    assert np.array_equal(blocks.store.get(30, 70), tokens[30:70].numpy())  # a range across blocks
    # the same files through a pyarrow file system URI
    uri = corpus_job.read_corpus(_ecfg(toy_dir, corpus_folder.as_uri()))
    assert uri.corpus_hash == one_process_hash
    # the driver holds refs and offsets, never the tokens
    assert len(pickle.dumps(blocks.store)) < tokens.numel() * 4 / 10


@pytest.mark.parametrize("where", ["ray data", "driver"])
def test_first_sequences_and_the_held_out_tail(ray_cluster, toy_dir, toy_tokenizer, corpus_folder, where,
                                               monkeypatch):
    """The first sequences and the held-out ones after them, read by Ray Data or (a small read,
    `DRIVER_BYTES`) in the driver: the same sequences and hash, in blocks of at most BLOCK_BYTES."""
    ecfg = _ecfg(toy_dir, corpus_folder, n_sequences=200)
    tokens, train_hash = load_sequences(ecfg.corpus, toy_tokenizer)
    monkeypatch.setattr(corpus_job, "BLOCK_BYTES", 4096)  # 32 sequences a block
    if where == "ray data":
        monkeypatch.setattr(corpus_job, "DRIVER_BYTES", 0)
    got = corpus_job.read_corpus(ecfg, LaunchConfig(), extra=16)
    assert (got.n_train, got.store.n) == (200, 216) and got.corpus_hash == train_hash
    assert len(got.store.refs) > 3 and (where == "ray data" or got.store.starts[:3] == (0, 32, 64))
    assert np.array_equal(got.store.get(0, 200), tokens.numpy())
    everything, _ = load_sequences(CorpusConfig(source=str(corpus_folder), seq_len=32), toy_tokenizer)
    assert np.array_equal(got.store.get(200, 216), everything[200:216].numpy())
    assert np.array_equal(got.store.get(30, 70), everything[30:70].numpy())  # a range across blocks
    # a small head (a reused extraction's context scan) is read in the driver, the same sequences
    assert np.array_equal(corpus_job.head_sequences(ecfg, 216), got.store.get(0, 216))
    assert corpus_job.head_sequences(ecfg, corpus_job.HEAD_BYTES // (32 * 4) + 1) is None


def test_bad_corpus_files_name_file_and_line(ray_cluster, toy_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "also fine"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(CorpusError, match=r"x\.jsonl:3: not a UTF-8 JSON line"):
        corpus_job.read_corpus(_ecfg(toy_dir, bad))
    (bad / "x.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(CorpusError, match=r"x\.jsonl:1: no field 'text'"):
        corpus_job.read_corpus(_ecfg(toy_dir, bad))
    (bad / "x.jsonl").write_text('{"text": "short"}\n')
    with pytest.raises(CorpusError, match="has no document of 32 tokens"):
        corpus_job.read_corpus(_ecfg(toy_dir, bad))
    with pytest.raises(CorpusError, match="does not exist"):
        corpus_job.read_corpus(_ecfg(toy_dir, tmp_path / "nowhere.jsonl"))


def test_a_mixture_through_ray_data_is_the_one_process_mixture(ray_cluster, toy_dir, toy_tokenizer, tmp_path,
                                                               monkeypatch):
    """Each source read as a corpus of its own by Ray Data, interleaved by the schedule: the same
    sequences and hash as one process, the held-out tail after them, and only refs in the driver."""
    from crossray.config import MixtureSource

    docs = [json.loads(line)["text"] for line in (toy_dir / "corpus" / "train.jsonl").open()][:900]
    for name, part in (("en.jsonl", docs[:600]), ("fr.jsonl", docs[600:])):
        (tmp_path / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    mixture = CorpusConfig(mixture=(MixtureSource(source=str(tmp_path / "en.jsonl"), weight=2.0),
                                    MixtureSource(source=str(tmp_path / "fr.jsonl"), weight=1.0)),
                           seq_len=32, n_sequences=240, mixture_seed=3)
    ecfg = ExtractConfig(family=str(toy_dir), revisions=("step0", "step128"), layer=2, corpus=mixture)
    tokens, one_process_hash = load_sequences(mixture, toy_tokenizer)
    monkeypatch.setattr(corpus_job, "DRIVER_BYTES", 0)  # (a small read is done in the driver)
    got = corpus_job.read_corpus(ecfg, LaunchConfig(), extra=30)
    assert (got.n_train, got.store.n) == (240, 270) and got.corpus_hash == one_process_hash
    assert np.array_equal(got.store.get(0, 240), tokens.numpy())
    assert np.array_equal(got.store.get(100, 130), tokens[100:130].numpy())  # a range from the middle
    longer, _ = load_sequences(dataclasses.replace(mixture, n_sequences=270), toy_tokenizer)
    assert np.array_equal(got.store.get(240, 270), longer[240:].numpy())
    assert len(pickle.dumps(got.store)) < tokens.numel() * 4 / 10
