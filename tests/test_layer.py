"""Model at a layer: the truncated forward equals output_hidden_states[L] and never runs later blocks."""

import pytest
import torch

from crossray.checkpoints import CheckpointError, Family
from crossray.models.layer import find_blocks, load_layer_model, model_inputs
from tests.conftest import save_tiny_family

ARCHS = ["gpt_neox", "gpt2", "llama", "bloom"]


@pytest.fixture(scope="module", params=ARCHS)
def family(request, tmp_path_factory):
    root = save_tiny_family(tmp_path_factory.mktemp(request.param), request.param, ("step1",))
    return Family.from_dir(root)


def _inputs():
    ids = torch.randint(3, 128, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in one row
    ids[0, :3] = 0
    return ids, mask


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_resid_pre_equals_hidden_states(family, layer):
    lm = load_layer_model(family, "step1", layer, device="cpu")
    ids, mask = _inputs()
    with torch.no_grad():
        full = lm.model(**model_inputs(lm.model, ids, mask), output_hidden_states=True)
        acts = lm.resid_pre(ids, mask)
    assert acts.shape == (3, 7, lm.d_model)
    real = mask.bool()
    torch.testing.assert_close(acts[real], full.hidden_states[layer][real], rtol=1e-5, atol=1e-6)


def test_suffix_only_forward_equals_the_full_model(family):
    lm = load_layer_model(family, "step1", 1, device="cpu")
    ids, mask = _inputs()
    with torch.no_grad():
        full = lm.model(**model_inputs(lm.model, ids, mask)).logits[:, -1]
        h = lm.resid_pre(ids, mask)
        torch.testing.assert_close(lm.last_logits_from(h, ids, mask), full, rtol=1e-5, atol=1e-5)
        plus, minus = torch.tensor([5, 9, 11]), torch.tensor([7, 3, 11])
        diff = lm.logit_diff_from(h, ids, mask, plus, minus)
    torch.testing.assert_close(diff, full[torch.arange(3), plus] - full[torch.arange(3), minus],
                               rtol=1e-5, atol=1e-5)
    assert len(lm.blocks) == 3  # the block list is restored afterwards


def test_truncated_forward_never_runs_later_blocks(family):
    lm = load_layer_model(family, "step1", 1, device="cpu")
    calls = []
    blocks = find_blocks(lm.model)
    for i, b in enumerate(blocks):
        b.register_forward_hook(lambda *a, i=i: calls.append(f"block{i}"))
    lm.model.get_output_embeddings().register_forward_hook(lambda *a: calls.append("lm_head"))
    lm.resid_pre(*_inputs())
    assert calls == ["block0"]


def test_layer_out_of_range(family):
    with pytest.raises(CheckpointError, match=r"layer 3 out of range .* 3 blocks"):
        load_layer_model(family, "step1", 3, device="cpu")
    with pytest.raises(CheckpointError, match="layer -1 out of range"):
        load_layer_model(family, "step1", -1, device="cpu")


def test_unknown_architecture_needs_block_path(family):
    lm = load_layer_model(family, "step1", 0, device="cpu")
    lm.model.config.model_type = "mystery"
    with pytest.raises(ValueError, match="pass block_path"):
        find_blocks(lm.model)
    arch = lm.model.__class__.__name__.lower()
    path = "gpt_neox.layers" if "neox" in arch else "model.layers" if "llama" in arch else "transformer.h"
    assert find_blocks(lm.model, path) is not None
    with pytest.raises(ValueError, match="does not exist"):
        find_blocks(lm.model, "model.nope")


def test_toy_family_at_a_layer(toy_family):
    lm = load_layer_model(toy_family, "step1000", 2, device="cpu")
    acts = lm.resid_pre(torch.tensor([[5, 6, 7, 8]]))
    assert acts.shape == (1, 4, 64) and torch.isfinite(acts).all()
