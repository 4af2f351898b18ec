"""Ray Data extraction: exactly-once rows, manifest, idempotence, resume, streaming, faults, bad input."""

import dataclasses
import json
import os
import shutil
import signal
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from crossray.checkpoints import CheckpointError
from crossray.corpus import CorpusConfig, CorpusError
from crossray.extract import (
    CheckpointSetExtractor,
    ExtractConfig,
    Manifest,
    ManifestError,
    extract_family,
    read_shard,
)
from jobs.extract import estimate_norm_policies, estimate_norms, prepare, row_stream, run_extract, stream_plan
from tests.conftest import save_tiny_family

pytestmark = pytest.mark.ray


def _all_rows(folder):
    m = Manifest.read(folder)
    parts = [read_shard(p) for p in m.shard_paths(folder)]
    seq = np.concatenate([p[0] for p in parts])
    pos = np.concatenate([p[1] for p in parts])
    return seq, pos, torch.cat([p[2] for p in parts])


def _assert_exactly_once(folder, n_sequences=192, seq_len=64):
    seq, pos, acts = _all_rows(folder)
    keys = seq.astype(np.int64) * 1000 + pos
    assert len(keys) == len(np.unique(keys)) == n_sequences * (seq_len - 1)  # position 0 dropped
    assert set(np.unique(seq)) == set(range(n_sequences)) and pos.min() == 1
    return seq, pos, acts


def test_parquet_extraction(toy_acts, toy_extract_cfg):
    m = Manifest.read(toy_acts)
    assert m.revisions == ["step0", "step128", "step1000"] and m.layer == 2 and m.d_model == 64
    assert len(m.weight_hashes) == 3 and len(m.corpus_hash) == 64 and m.token_count == 192 * 63
    assert len(m.shards) == 12 and all(len(s["sha256"]) == 64 for s in m.shards)
    assert len(m.norm_factors) == 3 and all(f > 0 for f in m.norm_factors)
    m.verify(toy_acts)
    seq, pos, acts = _assert_exactly_once(toy_acts)
    # plain pyarrow reads the activations as (n, C, D)
    table = pq.read_table(m.shard_paths(toy_acts)[0])
    assert table.column("acts").combine_chunks().to_numpy_ndarray().shape == (16 * 63, 3, 64)
    # rows hold exactly what the checkpoints compute (up to bf16 storage)
    from crossray.corpus import load_sequences
    from crossray.models.layer import load_tokenizer

    family = extract_family(toy_extract_cfg)
    tokens, corpus_hash = load_sequences(toy_extract_cfg.corpus, load_tokenizer(family, "step0"))
    assert m.corpus_hash == corpus_hash  # Ray Data's tokenisation = one process's
    direct = CheckpointSetExtractor(toy_extract_cfg, "cpu")(tokens[5:6])[0, 1:]  # (63, C, D)
    got = acts[seq == 5][np.argsort(pos[seq == 5])]
    torch.testing.assert_close(got, direct, rtol=1e-2, atol=1e-2)


def test_rerun_is_a_noop(toy_acts, toy_extract_cfg):
    stamps = {p: p.stat().st_mtime_ns for p in toy_acts.iterdir()}
    run_extract(toy_extract_cfg, toy_acts)
    assert {p: p.stat().st_mtime_ns for p in toy_acts.iterdir()} == stamps


def test_interrupted_extraction_resumes(toy_acts, toy_extract_cfg, tmp_path):
    out = tmp_path / "acts"
    shutil.copytree(toy_acts, out)
    (out / "manifest.json").unlink()  # as if the run died before finishing
    for name in ("shard-000003.parquet", "shard-000007.parquet.json"):
        (out / name).unlink()
    (out / "shard-000009.parquet").write_bytes(b"half written")  # sidecar no longer matches
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-00000[0-2].parquet")}
    run_extract(toy_extract_cfg, out)
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept  # finished shards untouched
    _assert_exactly_once(out)
    Manifest.read(out).verify(out)


def test_streaming_gives_the_same_rows(ray_cluster, toy_acts, toy_extract_cfg):
    prep = prepare(toy_extract_cfg)
    manifest = Manifest.read(toy_acts)
    assert estimate_norms(prep) == pytest.approx(manifest.norm_factors)
    both = manifest.norm_factors_by_policy  # both position-0 policies recorded; training's view scales
    assert both["without_position0"] == manifest.norm_factors
    assert estimate_norm_policies(prep)["with_position0"] == pytest.approx(both["with_position0"])
    assert both["with_position0"] != pytest.approx(both["without_position0"], rel=1e-4)  # position 0 counts
    assert prep.key == Manifest.read(toy_acts).key  # the same extraction, streamed
    plan = stream_plan(prep, rows=1)  # the fewest epochs: 2 (one more for what buffers hold back)
    rows = row_stream(prep, plan).dataset.take_all()
    assert len(rows) == 2 * 192 * 63
    rows = [r for r in rows if r["item"] < plan.n_blocks]  # the first epoch
    assert all(plan.block(r["item"])[0] <= r["seq"] < plan.block(r["item"])[1] for r in rows)
    seq = np.array([r["seq"] for r in rows])
    pos = np.array([r["pos"] for r in rows])
    acts = torch.from_numpy(np.stack([r["acts"] for r in rows]))
    pseq, ppos, pacts = _all_rows(toy_acts)
    order, porder = np.lexsort((pos, seq)), np.lexsort((ppos, pseq))
    assert np.array_equal(seq[order], pseq[porder]) and np.array_equal(pos[order], ppos[porder])
    torch.testing.assert_close(acts[order].float(), pacts[porder], rtol=1e-2, atol=1e-2)


def test_killed_actor_still_gives_every_row_once(ray_cluster, toy_extract_cfg, tmp_path):
    out = tmp_path / "acts"
    cfg = ExtractConfig(**{**toy_extract_cfg.__dict__, "shard_sequences": 8})  # 24 shards
    killed = []

    def killer():
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            sidecars = list(out.glob("*.parquet.json")) if out.exists() else []
            if sidecars:
                pid = json.loads(sidecars[0].read_text())["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)

    thread = threading.Thread(target=killer)
    thread.start()
    run_extract(cfg, out)
    thread.join()
    assert killed, "no actor was killed: the extraction finished too fast"
    seq, _, _ = _assert_exactly_once(out)
    pids = {json.loads(p.read_text())["pid"] for p in out.glob("*.parquet.json")}
    assert len(pids) >= 2  # a replacement actor wrote shards after the kill


def test_killed_actor_in_a_stream_still_gives_every_row_once(ray_cluster, toy_extract_cfg):
    """SIGKILL an extraction actor while the stream is consumed (as Ray Train consumes it): it is
    replaced, its in-flight sequences are extracted again, and every (seq, pos) arrives exactly once."""
    cfg = ExtractConfig(**{**toy_extract_cfg.__dict__, "batch_sequences": 4})  # 48 items an epoch
    seen, killed = [], []
    prep = prepare(cfg)
    stream = row_stream(prep, dataclasses.replace(stream_plan(prep, rows=1), epochs=1))
    batches = stream.dataset.iter_batches(batch_size=63 * 4, batch_format="numpy")
    for i, batch in enumerate(batches):
        seen.append(batch["seq"] * 1000 + batch["pos"])
        if i == 3 and not killed:
            import psutil

            actors = [q for q in psutil.process_iter(["cmdline"])
                      if any("RowExtractor" in part for part in (q.info["cmdline"] or []))]
            assert actors, "no extraction actor to kill"
            actors[0].kill()
            killed.append(actors[0].pid)
    keys = np.concatenate(seen)
    assert killed and len(keys) == len(np.unique(keys)) == 192 * 63  # none twice, none missing


def test_bad_inputs_fail_before_any_work(tmp_path, toy_extract_cfg, toy_acts):
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    root = save_tiny_family(tmp_path / "fam", "gpt_neox", ("step1",))
    AutoModelForCausalLM.from_config(tiny_config("gpt_neox", d=48)).save_pretrained(root / "step2")
    cfg = ExtractConfig(family=str(root), revisions=("step1", "step2"), layer=1,
                        corpus=CorpusConfig(source="toy:0:10", seq_len=8))
    with pytest.raises(CheckpointError, match=r"share a hidden size.*'step1': 32, 'step2': 48"):
        run_extract(cfg, tmp_path / "out1")
    assert not (tmp_path / "out1").exists()
    missing = ExtractConfig(**{**toy_extract_cfg.__dict__,
                               "corpus": CorpusConfig(source=str(tmp_path / "nope.jsonl"), seq_len=64)})
    with pytest.raises(CorpusError, match="does not exist"):
        run_extract(missing, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    bad = tmp_path / "corrupt"
    shutil.copytree(toy_acts, bad)
    with open(bad / "shard-000004.parquet", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ManifestError, match=r"shard-000004.parquet does not match its manifest checksum"):
        Manifest.read(bad).verify(bad)
    with pytest.raises(ManifestError, match="checksum"):
        run_extract(toy_extract_cfg, bad)
