"""The corpus rules in one process: packing, document parsing, and a hash that does not depend on how
the sequences were split into blocks."""

import numpy as np
import pytest

from crossray.config import CorpusConfig
from crossray.corpus import (
    combine_digests,
    documents,
    hub_documents,
    pack,
    parts,
    sequence_digests,
    tokens_hash,
)


def test_pack_keeps_the_first_tokens_of_long_enough_documents(toy_tokenizer):
    docs = ["the man waits", "the dogs near the tables run. " * 20, "", "this cat sleeps. " * 3]
    full = [toy_tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    expected = [ids[:8] for ids in full if len(ids) >= 8]
    got = pack(toy_tokenizer, docs, 8)
    assert got.dtype == np.int32 and got.tolist() == expected and len(expected) == 2
    assert pack(toy_tokenizer, [], 8).shape == (0, 8)


def test_hash_is_the_same_for_any_split_into_blocks():
    tokens = np.random.default_rng(0).integers(0, 50_000, (100, 16))
    whole = tokens_hash(tokens)
    for cuts in ([50], [1, 2, 3, 99], list(range(1, 100))):
        parts = np.split(tokens, cuts)
        assert combine_digests(b"".join(sequence_digests(p) for p in parts), 16) == whole
    changed = tokens.copy()
    changed[57, 3] += 1
    assert tokens_hash(changed) != whole and tokens_hash(tokens[:99]) != whole


def test_text_documents_split_on_blank_lines(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbffirst doc\r\nstill first\r\n\r\n\r\nsecond\n \nthird")
    got = list(documents(CorpusConfig(source=str(tmp_path / "a.txt"), seq_len=2)))
    assert got == ["first doc\r\nstill first", "second", "third"]


def test_a_toy_stream_without_an_end_is_refused():
    with pytest.raises(ValueError, match="never ends"):
        CorpusConfig(source="toy:3", seq_len=8)
    CorpusConfig(source="toy:3:100", seq_len=8)  # a bounded stream needs no count


def test_a_hub_data_set_is_streamed_through_datasets(tmp_path):
    """A name that is not a local path is a hub data set, streamed by `datasets.load_dataset`; offline,
    the same call reads a local data set folder (the hub's JSON builder), in order."""
    pile = "monology/pile-uncopyrighted"
    assert parts(CorpusConfig(source=pile, seq_len=8)) == [f"hub:{pile}"]
    folder = tmp_path / "hub-like"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(f'{{"text": "doc {i}", "meta": {i}}}\n' for i in range(5)))
    assert list(hub_documents(CorpusConfig(source=str(folder), seq_len=8))) == [f"doc {i}" for i in range(5)]
    with pytest.raises(ValueError, match="no field 'body'"):
        list(hub_documents(CorpusConfig(source=str(folder), seq_len=8, text_field="body")))


def test_a_uri_corpus_is_fingerprinted_by_its_listing(tmp_path):
    """A corpus on a file system URI enters the extraction key by each file's size and modification
    time (never read for it): an edited file changes the key, an untouched one keeps it, and a file
    of another type in the folder does not count."""
    import os

    from crossray.pipeline.inputs import corpus_fingerprint

    (tmp_path / "a.jsonl").write_text('{"text": "the man waits"}\n')
    (tmp_path / "notes.md").write_text("not a corpus file")
    cfg = CorpusConfig(source=f"file://{tmp_path}", seq_len=8, n_sequences=1)
    before = corpus_fingerprint(cfg)
    (tmp_path / "notes.md").write_text("edited, still not a corpus file")
    assert corpus_fingerprint(cfg) == before
    (tmp_path / "a.jsonl").write_text('{"text": "the men wait"}\n')  # same size: the time tells
    os.utime(tmp_path / "a.jsonl", ns=(1, 10**18))
    assert corpus_fingerprint(cfg) != before
