"""The shared cache under concurrent use: two builders of one toy family, a half-built or damaged
entry, weight hashes written by several processes, and the run lock taken before any build."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crossray.checkpoints import CheckpointError, Family
from crossray.toy.build import ToyConfig, build_toy_family, default_family_dir

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(n_documents=300, max_step=4, checkpoint_steps=(0, 2, 4), hidden_size=16, num_layers=1,
             num_heads=2, n_task_pairs=5)
BUILD = f"""
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
from crossray.toy.build import ToyConfig, build_toy_family
print("FAMILY", build_toy_family(None, ToyConfig(**{SMALL!r})))
"""


def _env(cache: Path) -> dict:
    return {**os.environ, "CROSSRAY_CACHE": str(cache), "PYTHONPATH": str(ROOT)}


def test_two_builders_on_an_empty_cache_share_one_build(tmp_path):
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", BUILD], env=_env(cache), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    folders = {line.split(" ", 1)[1] for out in outs for line in out.splitlines()
               if line.startswith("FAMILY ")}
    assert len(folders) == 1, outs  # both got the same family
    family = Path(folders.pop())
    assert sum("built toy family" in out for out in outs) == 1, outs  # one built it
    assert sum("built by another process" in out for out in outs) == 1, outs  # the other waited, reused it
    meta = json.loads((family / "family.json").read_text())
    assert meta["revisions"] == ["step0", "step2", "step4"]
    for rev in meta["revisions"]:
        assert (family / rev / "model.safetensors").is_file()
    assert sorted(p.name for p in cache.iterdir()) == [family.name]  # no lock or temporary folder left


def test_an_incomplete_family_is_rebuilt_not_reported_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSRAY_CACHE", str(tmp_path))
    cfg = ToyConfig(**SMALL)
    family = build_toy_family(None, cfg)
    shutil.rmtree(family / "step2")  # as a builder killed (or raced) half-way left it
    listed = Family.from_dir(family)
    with pytest.raises(CheckpointError) as e:
        listed.location("step2")
    assert "(available: step0, step4)" in str(e.value)  # only what is on disk
    assert "listed in" in str(e.value) and "missing on disk" in str(e.value)
    assert build_toy_family(None, cfg) == family == default_family_dir(cfg)
    assert (family / "step2" / "model.safetensors").is_file()
    Family.from_dir(family).location("step2")


HASH = """
import sys
from crossray.checkpoints import weights_hash
for folder in sys.argv[1:]:
    weights_hash(folder)
"""


def test_weight_hashes_written_by_two_processes_keep_every_entry(tmp_path):
    import torch
    from safetensors.torch import save_file

    folders = []
    for i in range(16):
        folder = tmp_path / "ckpt" / f"r{i}"
        folder.mkdir(parents=True)
        save_file({"w": torch.full((4,), float(i))}, folder / "model.safetensors")
        folders.append(str(folder))
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", HASH, *part], env=_env(cache), stderr=subprocess.PIPE,
                              text=True) for part in (folders[::2], folders[1::2])]
    assert [p.wait(timeout=120) for p in procs] == [0, 0], [p.stderr.read() for p in procs]
    known = json.loads((cache / "weight-hashes.json").read_text())
    assert len(known) == 16 and len(set(known.values())) == 16


def test_a_run_takes_its_lock_before_building_anything(tmp_path, monkeypatch, capsys):
    """A second run of a busy folder is refused before it builds the toy family (the first run holds
    the lock and may be building it)."""
    from crossray.lock import RunLock
    from jobs.cli import main

    monkeypatch.setenv("CROSSRAY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "runs"
    with RunLock(out / "tiny"):
        code = main(["run", str(ROOT / "configs" / "tiny.yaml"), "--pipeline.out", str(out)])
    assert code == 2
    assert "is in use by pid" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # nothing built, nothing hashed
