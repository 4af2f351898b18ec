"""Save / load: safetensors + config.json, identical outputs, mismatches refused, nothing half-written."""

import json

import pytest
import torch

from crossray.models.crosscoder import Crosscoder
from crossray.store import ArtifactError, load_crosscoder, save_crosscoder
from tests.helpers import make_cc_cfg, make_train_cfg


@pytest.mark.parametrize("activation", ["relu", "batchtopk", "jumprelu"])
def test_save_load_identical_outputs(tmp_path, activation):
    cfg = make_cc_cfg(activation=activation, revisions=("step1", "step2"), layer=3, family="toy")
    cc = Crosscoder(cfg)
    with torch.no_grad():
        cc.norm_factors_C.copy_(torch.tensor([0.5, 2.0]))
        cc.b_dec_CD.normal_()
    if activation == "batchtopk":
        cc.threshold.fill_(0.3)
    folder = save_crosscoder(cc, tmp_path / "cc", make_train_cfg(cfg), meta={"note": "x"})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "weights.safetensors"]
    assert not list(tmp_path.glob("*.tmp"))
    config = json.loads((folder / "config.json").read_text())
    assert config["crosscoder"]["revisions"] == ["step1", "step2"] and config["train"]["n_steps"] == 20
    loaded = load_crosscoder(folder)
    x = torch.randn(8, 2, 16)
    assert torch.equal(cc(x).recon_BCD, loaded(x).recon_BCD)
    assert torch.equal(loaded.norm_factors_C, cc.norm_factors_C)


def test_config_weight_mismatch_is_refused(tmp_path):
    folder = save_crosscoder(Crosscoder(make_cc_cfg()), tmp_path / "cc")
    config = json.loads((folder / "config.json").read_text())
    config["crosscoder"]["n_latents"] = 32
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=r"W_dec_LCD has shape \(64, 2, 16\).*\(32, 2, 16\)"):
        load_crosscoder(folder)
    config["crosscoder"].update(n_latents=64, activation="batchtopk")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=r"missing \['threshold'\]"):
        load_crosscoder(folder)
    config["crosscoder"].update(activation="relu", colour="red")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: unknown key\(s\) \['colour'\]"):
        load_crosscoder(folder)
    with pytest.raises(ArtifactError, match="does not exist"):
        load_crosscoder(tmp_path / "nothing")


def test_overwrite_replaces_atomically(tmp_path):
    a, b = Crosscoder(make_cc_cfg(seed=1)), Crosscoder(make_cc_cfg(seed=2))
    save_crosscoder(a, tmp_path / "cc")
    save_crosscoder(b, tmp_path / "cc")
    assert torch.equal(load_crosscoder(tmp_path / "cc").W_dec_LCD, b.W_dec_LCD)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cc"]
