"""The corpus rules in one process: packing, document parsing, and a hash that does not depend on how
the sequences were split into blocks."""

import numpy as np
import pytest
import torch

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


@pytest.fixture(scope="module")
def two_languages(toy_dir, tmp_path_factory):
    """A local two-"language" corpus: the toy's training documents split into two files (the second
    with its text under another field), 700 and 500 documents."""
    import json

    docs = [json.loads(line)["text"] for line in (toy_dir / "corpus" / "train.jsonl").open()][:1200]
    folder = tmp_path_factory.mktemp("languages")
    (folder / "en.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:700]))
    (folder / "fr.jsonl").write_text("".join(json.dumps({"text": d, "body": d}) + "\n" for d in docs[700:]))
    return folder


def _mixture(folder, n=300, weights=(0.7, 0.3), seed=0):
    from crossray.config import MixtureSource

    return CorpusConfig(mixture=(MixtureSource(source=str(folder / "en.jsonl"), weight=weights[0]),
                                 MixtureSource(source=str(folder / "fr.jsonl"), weight=weights[1],
                                               text_field="body")),
                        seq_len=16, n_sequences=n, mixture_seed=seed)


def test_a_mixture_interleaves_its_sources_by_their_weights(two_languages, toy_tokenizer):
    """Token shares match the weights within 1% (every sequence has seq_len tokens); each source keeps
    its own order; the interleaving is fixed by the seed; the held-out tail extends the same schedule;
    a source too short for its share is named."""
    from crossray.corpus import CorpusError, load_sequences, mixture_schedule

    cfg = _mixture(two_languages)
    tokens, digest = load_sequences(cfg, toy_tokenizer)
    en, _ = load_sequences(CorpusConfig(source=str(two_languages / "en.jsonl"), seq_len=16), toy_tokenizer)
    fr, _ = load_sequences(CorpusConfig(source=str(two_languages / "fr.jsonl"), seq_len=16,
                                        text_field="body"), toy_tokenizer)
    from_fr = np.array([any((row == f).all() for f in fr[:120]) for row in tokens])
    assert abs(from_fr.mean() - 0.3) <= 0.01 and abs((~from_fr).mean() - 0.7) <= 0.01
    assert (tokens[~torch.from_numpy(from_fr)] == en[: int((~from_fr).sum())]).all()  # en in its order
    assert (tokens[torch.from_numpy(from_fr)] == fr[: int(from_fr.sum())]).all()
    assert load_sequences(cfg, toy_tokenizer)[1] == digest  # fixed by the seed
    assert load_sequences(_mixture(two_languages, seed=1), toy_tokenizer)[1] != digest
    longer, _ = load_sequences(_mixture(two_languages, n=340), toy_tokenizer)
    assert (longer[:300] == tokens).all()  # the held-out sequences follow the training ones
    ten = mixture_schedule([0.35, 0.19, 0.15, 0.13, 0.06, 0.05, 0.03, 0.02, 0.01, 0.01], 4000, 0)
    assert np.abs(np.bincount(ten) / 4000 - [0.35, 0.19, 0.15, 0.13, 0.06, 0.05, 0.03, 0.02, 0.01, 0.01]
                  ).max() <= 1 / 4000 + 1e-12  # BLOOM's ten languages, each within one sequence
    with pytest.raises(CorpusError, match=r"mixture source .*fr.jsonl gave \d+ sequences .* asks 1200"):
        load_sequences(_mixture(two_languages, n=1500, weights=(0.2, 0.8)), toy_tokenizer)


def test_a_mixture_config_is_checked():
    from crossray.config import MixtureSource

    with pytest.raises(ValueError, match="exactly one of source and mixture"):
        CorpusConfig(source="a.jsonl", mixture=(MixtureSource(source="b", weight=1.0),), n_sequences=4)
    with pytest.raises(ValueError, match="needs n_sequences"):
        CorpusConfig(mixture=(MixtureSource(source="b", weight=1.0),))
    with pytest.raises(ValueError, match="exactly one"):
        CorpusConfig()
