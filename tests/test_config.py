"""One config schema and one loader: typed sections, errors naming the key path, flags from fields,
and the layering rule (the library never imports Ray, jobs or serve)."""

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from crossray.config import Config, add_config_flags, load_config, resolve_train
from crossray.schema import leaf_fields, overrides_from

ROOT = Path(__file__).resolve().parents[1]


def _parse(argv):
    p = argparse.ArgumentParser()
    add_config_flags(p)
    args = p.parse_args(["--config", str(ROOT / "configs" / "tiny.yaml"), *argv])
    return load_config(args.config, overrides_from(args))


def test_flags_override_fields_with_their_types():
    cfg = _parse(["--attribution.steps", "8", "--attribution.threshold", "null", "--pipeline.name", "123",
                  "--pipeline.revisions", "step0,step1000", "--train.crosscoder.n_latents", "64",
                  "--train.lr", "3e-4", "--extract.corpus.drop_first_position", "false"])
    assert cfg.attribution.steps == 8 and cfg.attribution.threshold is None
    assert cfg.pipeline.name == "123" and cfg.pipeline.revisions == ("step0", "step1000")
    assert cfg.train.crosscoder.n_latents == 64 and cfg.train.lr == pytest.approx(3e-4)
    assert cfg.extract.corpus.drop_first_position is False
    with pytest.raises(ValueError, match=r"tiny.yaml:attribution.steps: expected int, got str 'many'"):
        _parse(["--attribution.steps", "many"])


def test_every_field_has_its_flag_in_every_job(capsys, monkeypatch):
    """The jobs' flags are generated from the schema, so none can drift from a config field."""
    from jobs import attribute, extract, pipeline, train

    fields = [dotted for dotted, _ in leaf_fields(Config)]
    assert "train.crosscoder.n_latents" in fields and "launch.workers" in fields
    monkeypatch.setenv("COLUMNS", "200")
    for job in (extract, train, attribute, pipeline):
        with pytest.raises(SystemExit) as exit_:
            job.main(["--help"])
        text = capsys.readouterr().out
        assert exit_.value.code == 0 and text.startswith("usage:")
        missing = [f for f in fields if f"--{f} " not in text and f"--{f}\n" not in text]
        assert not missing, f"{job.__name__} lacks flags {missing}"


def test_method_sets_what_the_config_leaves_out():
    """`pipeline.method` fills the position-0 policies the config is silent on; an explicit setting
    wins; an unknown method is refused by name."""
    crossray, paper = _parse([]), _parse(["--pipeline.method", "paper"])
    assert crossray.pipeline.method == "crossray" and paper.pipeline.method == "paper"
    assert crossray.attribution.skip_first_position is True and crossray.extract.norm_first_position is False
    assert paper.attribution.skip_first_position is False and paper.extract.norm_first_position is True
    mixed = _parse(["--pipeline.method", "paper", "--attribution.skip_first_position", "true"])
    assert mixed.attribution.skip_first_position is True and mixed.extract.norm_first_position is True
    assert paper.train == crossray.train and paper.attribution.threshold == crossray.attribution.threshold
    with pytest.raises(ValueError, match="pipeline.method.*'papr'"):
        _parse(["--pipeline.method", "papr"])


def test_unknown_keys_name_the_path(tmp_path):
    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    data["train"]["crosscoder"]["n_latent"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"bad.yaml:train.crosscoder: unknown key\(s\) \['n_latent'\]"):
        load_config(bad)
    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    data["pipeline"]["actors"] = 4  # launch settings have their own section
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"bad.yaml:pipeline: unknown key\(s\) \['actors'\]"):
        load_config(bad)


def test_derived_values_come_from_the_data():
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    assert not hasattr(cfg.train.crosscoder, "n_checkpoints")  # no placeholder in the user's settings
    resolved = resolve_train(cfg.train, 3, 64, revisions=("a", "b", "c"), layer=2)
    assert (resolved.crosscoder.n_checkpoints, resolved.crosscoder.d_model) == (3, 64)
    assert resolved.crosscoder.n_latents == 512 and resolved.n_steps == cfg.train.n_steps
    assert {f.name for f in dataclasses.fields(cfg.launch)} >= {"actors", "workers", "gpus_per_actor",
                                                                "experiment", "register_name", "alias"}
    with pytest.raises(ValueError, match="revisions lists 2 names but n_checkpoints is 3"):
        resolve_train(cfg.train, 3, 64, revisions=("a", "b"))


def test_library_never_imports_ray_jobs_or_serve():
    """Every crossray module imports with ray, jobs and serve blocked."""
    code = """
import importlib, pkgutil, sys
for name in ("ray", "jobs", "serve"):
    sys.modules[name] = None  # any import of them now fails
import crossray
names = [m.name for m in pkgutil.walk_packages(crossray.__path__, "crossray.")]
for name in names:
    importlib.import_module(name)
print(len(names))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.strip().splitlines()[-1]) >= 20
