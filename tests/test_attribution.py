"""Attribution: IG effects against the paper-style naive loop, completeness, aggregation, RelIE,
the ablation check, and the toy family's emergence (RelIE concentrated where accuracy is high)."""

import json

import numpy as np
import pytest
import torch

from bench.reference import paper_ie
from crossray.attribution import (
    AttributionConfig,
    _batch_inputs,
    attribute,
    check_crosscoder_fits,
    crosscoder_state,
    effects_rows,
    spearman,
    task_effects,
    token_effects,
    top_features,
)
from crossray.config import CrosscoderConfig, TrainConfig
from crossray.models.crosscoder import Crosscoder
from crossray.models.layer import load_layer_model
from crossray.tasks import TaskError, load_task

REVS = ("step0", "step128", "step1000")


@pytest.fixture(scope="module")
def toy_models(toy_family):
    return [load_layer_model(toy_family, r, 2, device="cpu") for r in REVS]


@pytest.fixture(scope="module")
def examples(toy_dir, toy_tokenizer):
    """Interleaved short and long prefixes, so batches are left-padded."""
    pp = load_task(toy_dir / "tasks" / "agreement_across_pp.jsonl", toy_tokenizer).examples
    simple = load_task(toy_dir / "tasks" / "simple_agreement.jsonl", toy_tokenizer).examples
    return [e for pair in zip(simple, pp, strict=False) for e in pair]


def _random_crosscoder():
    cc = Crosscoder(CrosscoderConfig(n_checkpoints=3, d_model=64, n_latents=128, seed=1,
                                     dec_init_norm=0.3, revisions=REVS, layer=2))
    with torch.no_grad():
        cc.norm_factors_C.copy_(torch.tensor([20.0, 6.0, 6.0]))
        cc.b_dec_CD.normal_(0, 0.3)
        cc.b_enc_L.normal_(0, 0.3)
    return cc


@pytest.mark.parametrize("m", [0, 1, 2])
def test_efficient_path_equals_paper_style_loop(toy_models, toy_tokenizer, examples, m):
    folded = _random_crosscoder().fold().requires_grad_(False)
    ids, mask, clean, patch = _batch_inputs(toy_tokenizer, examples[:5], "cpu")
    state = crosscoder_state(folded, toy_models, ids, mask)
    fast = token_effects(folded, toy_models[m], state, m, ids, mask, clean, patch, steps=10)
    ref_ie, ref_err = paper_ie(folded, toy_models, ids, mask, clean, patch, steps=10, ms=[m])[m]
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(fast.ie_BSL, ref_ie) <= 1e-5 and rel(fast.err_BS, ref_err) <= 1e-5
    assert (fast.ie_BSL != 0).any() and (mask == 0).any()  # real work, with left padding


def test_completeness_with_many_steps(toy_models, toy_tokenizer, examples):
    """Features + error effects sum to metric(baseline) - metric(clean)."""
    folded = _random_crosscoder().fold().requires_grad_(False)
    ids, mask, clean, patch = _batch_inputs(toy_tokenizer, examples[:4], "cpu")
    state = crosscoder_state(folded, toy_models, ids, mask)
    from crossray.attribution import metric

    for m in range(3):
        eff = token_effects(folded, toy_models[m], state, m, ids, mask, clean, patch, steps=200)
        base = folded.b_dec_CD[m].detach().expand_as(state.x_CBSD[m])
        with torch.no_grad():
            m_base = metric(toy_models[m].last_logits_from(base, ids, mask), clean, patch)
        total = eff.ie_BSL.sum(dim=(1, 2)) + eff.err_BS.sum(1)
        want = m_base - eff.metric_B
        assert torch.allclose(total, want, rtol=0.02, atol=0.02 * want.abs().max().item()), (total, want)


@pytest.mark.parametrize("skip_first_position", [True, False])
def test_completeness_holds_with_uncounted_positions(toy_models, toy_tokenizer, examples,
                                                     skip_first_position):
    """Positions that do not count (padding; position 0 when skipped) stay at their real activations
    along the path, so the counted features' effects plus the error effect equal the metric change of
    moving the counted positions alone to the baseline, within 2%."""
    from crossray.attribution import effect_positions, metric

    folded = _random_crosscoder().fold().requires_grad_(False)
    ids, mask, clean, patch = _batch_inputs(toy_tokenizer, examples[:6], "cpu")
    state = crosscoder_state(folded, toy_models, ids, mask)
    counted = effect_positions(mask, skip_first_position)
    for m in range(3):
        eff = token_effects(folded, toy_models[m], state, m, ids, mask, clean, patch, steps=200,
                            positions_BS=counted)
        base = torch.where(counted[..., None], folded.b_dec_CD[m], state.x_CBSD[m])
        with torch.no_grad():
            m_base = metric(toy_models[m].last_logits_from(base, ids, mask), clean, patch)
        total = eff.ie_BSL.sum(dim=(1, 2)) + eff.err_BS.sum(1)
        want = m_base - eff.metric_B
        assert want.abs().max() > 0.1  # the counted positions move the metric
        assert torch.allclose(total, want, rtol=0.02, atol=0.02 * want.abs().max().item()), (m, total, want)


def test_aggregation_weights_examples_and_thresholds(toy_models, toy_tokenizer, examples):
    cc = _random_crosscoder()
    cfg = AttributionConfig(steps=2, threshold=None, batch_size=3)
    a = task_effects(cc, toy_models, toy_tokenizer, examples[:7], cfg, checkpoint_indices=[2])
    b = task_effects(cc, toy_models, toy_tokenizer, examples[:7],
                     AttributionConfig(steps=2, threshold=None, batch_size=7), checkpoint_indices=[2])
    assert a.n_examples == 7  # the short last batch counts 1 example, not a batch (§16.5)
    torch.testing.assert_close(a.means()[0], b.means()[0], rtol=1e-4, atol=1e-6)
    high = task_effects(cc, toy_models, toy_tokenizer, examples[:7],
                        AttributionConfig(steps=2, threshold=1e9, batch_size=7), checkpoint_indices=[2])
    assert not high.ie_sum_CL.any() and high.err_sum_C[2] == b.err_sum_C[2]  # error never thresholded
    with pytest.raises(TaskError, match="no example"):
        task_effects(cc, toy_models, toy_tokenizer, [], cfg)


def test_relie_rows_and_selection():
    ie = torch.tensor([[0.0, 2.0, 0.0, -1.0], [0.0, 2.0, 3.0, 0.0], [0.0, 0.0, 1.0, 1.5]])  # (C, L)
    rows = effects_rows("t", ie, ["a", "b", "c"], AttributionConfig())
    by = {(r["feature"], r["checkpoint"]): r for r in rows}
    assert by[0, "a"]["all_zero"] and by[0, "b"]["relie"] == pytest.approx(1 / 3)
    assert by[1, "a"]["relie"] == 0.5 and by[1, "c"]["relie"] == 0 and by[1, "a"]["group"] == "a-b shared"
    assert by[2, "b"]["relie"] == 0.75 and by[2, "b"]["group"] == "b specific"
    assert by[3, "a"]["ie"] == -1.0 and by[3, "a"]["relie"] == pytest.approx(0.4)  # |IE|
    assert top_features(ie, 1) == [1, 2, 3] and top_features(ie, 10) == [1, 2, 3]
    # pairwise RelIE (the paper's 3-way tables): share of b in a + b, for every pair
    assert by[2, "a"]["relie_pair/a-b"] == 1.0 and by[2, "a"]["relie_pair/b-c"] == 0.25
    assert by[3, "c"]["relie_pair/a-c"] == pytest.approx(0.6) and by[0, "a"]["relie_pair/a-b"] == 0.5
    assert "relie_pair/a-b" not in effects_rows("t", ie[:2], ["a", "b"], AttributionConfig())[0]
    # a pair that sums to 0 gets 0.5 and says so, pair by pair
    zero = effects_rows("t", torch.tensor([[0.0, 1.0], [0.0, 0.0], [2.0, 0.0]]), ["a", "b", "c"],
                        AttributionConfig())
    flags = [[zero[r][f"relie_pair_all_zero/{p}"] for p in ("a-b", "a-c", "b-c")] for r in (0, 3)]
    assert flags == [[True, False, False], [False, False, True]]  # feature 0: a-b; feature 1: b-c
    assert zero[0]["relie_pair/a-b"] == 0.5 and zero[3]["relie_pair/b-c"] == 0.5


def test_ablation_rho_pairwise_is_the_papers_two_way_rho():
    """For every pair, rho between the paper's |d_b| / |d_a| and b's pairwise RelIE; with 2
    checkpoints it is the N-way rho, with 3 it is not (the N-way mean is not the paper's number)."""
    from crossray.attribution import ablation_correlations

    gen = torch.Generator().manual_seed(1)
    deltas = torch.rand(14, 3, generator=gen) + 0.01
    ie = deltas * (0.5 + torch.rand(14, 3, generator=gen))
    dec = torch.rand(14, 3, generator=gen)
    out = ablation_correlations(deltas, ie, dec, ["a", "b", "c"])
    for (a, b) in [(0, 1), (0, 2), (1, 2)]:
        ratio = (deltas[:, b].abs() / (deltas[:, a].abs() + 1e-16)).numpy()  # the paper's ratio, eps 1e-16
        relie_b = (ie[:, b].abs() / (ie[:, a].abs() + ie[:, b].abs())).numpy()
        pair = out["pairs"]["abc"[a] + "-" + "abc"[b]]
        assert pair["rho_relie"] == pytest.approx(spearman(ratio, relie_b))
        assert pair["all_zero_features"] == 0
    pair_rhos = [p["rho_relie"] for p in out["pairs"].values()]
    assert out["mean_pair_rho_relie"] == pytest.approx(np.mean(pair_rhos))
    assert abs(out["mean_pair_rho_relie"] - out["mean_rho_relie"]) > 0.05
    two = ablation_correlations(deltas[:, :2], ie[:, :2], dec[:, :2], ["a", "b"])
    assert two["pairs"]["a-b"]["rho_relie"] == pytest.approx(two["mean_rho_relie"])
    assert two["mean_pair_rho_relie"] == pytest.approx(two["mean_rho_relie"])


def test_spearman():
    assert spearman(np.array([1, 2, 3]), np.array([1, 3, 2])) == pytest.approx(0.5)
    assert spearman(np.array([1, 2, 2, 4]), np.array([1, 2, 2, 4])) == pytest.approx(1.0)
    assert np.isnan(spearman(np.array([1, 1]), np.array([1, 2])))


def test_wrong_crosscoder_is_refused(toy_models):
    cc = _random_crosscoder()
    with pytest.raises(ValueError, match=r"trained on checkpoints \['step0', 'step128', 'step1000'\], "
                                         r"not on \['step0', 'step64', 'step1000'\]"):
        check_crosscoder_fits(cc, toy_models, ("step0", "step64", "step1000"))
    cc.cfg = CrosscoderConfig(**{**cc.cfg.__dict__, "layer": 1})
    with pytest.raises(ValueError, match=r"trained at layer 1.*layer\(s\) \[2\]"):
        check_crosscoder_fits(cc, toy_models, REVS)


def test_task_without_single_token_answers(toy_tokenizer, tmp_path):
    rows = [{"sentence_good": "Zyx qqqqxxxxzzzz.", "sentence_bad": "Zyx w.", "one_prefix_method": True,
             "one_prefix_prefix": "Zyx", "one_prefix_word_good": "qqqqxxxxzzzz", "one_prefix_word_bad": "w"}]
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    task = load_task(f, toy_tokenizer)
    assert not task.examples and sum(task.skipped.values()) == 1  # skipped and counted
    with pytest.raises(TaskError, match="no example with single-token answers"):
        task_effects(_random_crosscoder(), [], toy_tokenizer, task.examples, AttributionConfig())


def test_toy_emergence_relie_and_ablation(toy_dir, toy_models, toy_tokenizer):
    """A crosscoder over chance / middle / late checkpoints: simple agreement's top features matter
    at the late checkpoint, and zero-ablation agrees with RelIE (the paper: rho 0.945 on Pythia)."""
    from crossray.corpus import CorpusConfig
    from crossray.extract import CheckpointSetExtractor, ExtractConfig
    from crossray.train import Trainer, estimate_norm_factors

    ecfg = ExtractConfig(family=str(toy_dir), revisions=REVS, layer=2,
                         corpus=CorpusConfig(source="toy:0:1200", seq_len=64))
    from crossray.corpus import load_sequences

    tokens, _ = load_sequences(ecfg.corpus, toy_tokenizer)
    acts = CheckpointSetExtractor(ecfg, "cpu")(tokens)[:, 1:].reshape(-1, 3, 64)
    batches = list(acts[torch.randperm(len(acts), generator=torch.Generator().manual_seed(0))].split(512))
    ccfg = CrosscoderConfig(n_checkpoints=3, d_model=64, n_latents=256, seed=0, revisions=REVS, layer=2)
    cc = Crosscoder(ccfg)
    cc.norm_factors_C.copy_(estimate_norm_factors(batches, 20))
    Trainer(cc, TrainConfig(crosscoder=ccfg, n_steps=3 * len(batches), batch_size=512, lr=1e-3,
                            metrics_every=10**6), "cpu").fit(batches * 3, progress=False)
    task = load_task(toy_dir / "tasks" / "simple_agreement.jsonl", toy_tokenizer)
    res = attribute(cc, toy_models, REVS, toy_tokenizer, task, AttributionConfig())
    top10 = [res["ie_CL"][c].abs().topk(10).values.sum().item() for c in range(3)]
    abl = res["ablation"]
    print(f"\ntoy simple agreement: summed |IE| of the top-10 features per checkpoint {top10}; "
          f"chance/last = {top10[0] / top10[2]:.4f}; ablation rho vs RelIE {abl['rho_relie']} "
          f"(mean {abl['mean_rho_relie']:.3f}), vs RelDec mean {abl['mean_rho_reldec']:.3f}; "
          f"{len(res['selected'])} features selected")
    assert top10[0] < 0.2 * top10[2]
    assert abl["mean_rho_relie"] >= 0.8
    assert len(res["rows"]) == 256 * 3 and res["examples"] == 200


def test_patch_prefix_baseline_completeness(toy_models, toy_tokenizer, toy_dir):
    """With a counterfactual prefix, effects sum to metric(patch run) - metric(clean run)."""
    import dataclasses

    from crossray.attribution import metric, patch_inputs

    simple = load_task(toy_dir / "tasks" / "simple_agreement.jsonl", toy_tokenizer).examples[:4]
    flip = {"dog": "dogs", "dogs": "dog", "cat": "cats", "cats": "cat"}
    examples = []
    for e in simple:
        words = e.clean_prefix.split()
        words[-1] = flip.get(words[-1], words[-1] + "s" if not words[-1].endswith("s") else words[-1][:-1])
        examples.append(dataclasses.replace(e, patch_prefix=" ".join(words)))
    folded = _random_crosscoder().fold().requires_grad_(False)
    ids, mask, clean, patch = _batch_inputs(toy_tokenizer, examples, "cpu")
    patch_ids = patch_inputs(toy_tokenizer, examples, "auto", "cpu")
    assert patch_ids is not None and not torch.equal(patch_ids, ids)
    state = crosscoder_state(folded, toy_models, ids, mask)
    base = crosscoder_state(folded, toy_models, patch_ids, mask)
    eff = token_effects(folded, toy_models[2], state, 2, ids, mask, clean, patch, steps=200, base=base)
    with torch.no_grad():
        m_patch = metric(toy_models[2].model(input_ids=patch_ids, attention_mask=mask,
                                             position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1],
                         clean, patch)
    total = eff.ie_BSL.sum(dim=(1, 2)) + eff.err_BS.sum(1)
    want = m_patch - eff.metric_B
    assert torch.allclose(total, want, rtol=0.02, atol=0.02 * want.abs().max().item()), (total, want)
    assert patch_inputs(toy_tokenizer, simple, "auto", "cpu") is None  # no patch prefix: zero baseline
    with pytest.raises(TaskError, match="baseline 'patch' needs a patch_prefix"):
        patch_inputs(toy_tokenizer, simple, "patch", "cpu")


def test_clams_rows_carry_patch_prefix(toy_tokenizer):
    from crossray.tasks import rows_to_task

    row = {"clean_prefix": "The dog", "patch_prefix": "The dogs", "clean_answer": " is",
           "patch_answer": " are"}
    task = rows_to_task([row], toy_tokenizer, "c", "mem")
    assert task.examples[0].patch_prefix == "The dogs"


def test_first_position_is_left_out_by_default(toy_models, toy_tokenizer, examples):
    """Training never sees position 0, so by default neither do the effects (the first real token of
    each left-padded example); `skip_first_position=False` is the paper's attribution."""
    from crossray.attribution import effect_positions

    assert AttributionConfig().skip_first_position is True
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert effect_positions(mask, True).tolist() == [[False, False, False, True, True],
                                                     [False, True, True, True, True]]
    cc, chunk = _random_crosscoder(), examples[:6]
    folded = cc.fold().requires_grad_(False)
    ids, mask, clean, patch = _batch_inputs(toy_tokenizer, chunk, "cpu")
    state = crosscoder_state(folded, toy_models, ids, mask)
    eff = token_effects(folded, toy_models[2], state, 2, ids, mask, clean, patch, steps=2)
    later = token_effects(folded, toy_models[2], state, 2, ids, mask, clean, patch, steps=2,
                          positions_BS=effect_positions(mask, True)).ie_BSL
    assert not later[~effect_positions(mask, True)].any()
    cfg = AttributionConfig(steps=2, threshold=None, batch_size=6)
    skipped = task_effects(cc, toy_models, toy_tokenizer, chunk, cfg, checkpoint_indices=[2]).ie_sum_CL[2]
    every = task_effects(cc, toy_models, toy_tokenizer, chunk,
                         AttributionConfig(steps=2, threshold=None, batch_size=6, skip_first_position=False),
                         checkpoint_indices=[2]).ie_sum_CL[2]
    torch.testing.assert_close(skipped, later.sum(dim=(0, 1)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(every, eff.ie_BSL.sum(dim=(0, 1)), rtol=1e-4, atol=1e-5)
    assert (skipped - every).abs().max() > 1e-3  # the first position carried effects


def test_checkpoints_run_in_fp32_whatever_they_were_saved_in(tmp_path):
    """A checkpoint saved in fp16 is scored and differentiated in fp32 unless asked otherwise."""
    from transformers import AutoModelForCausalLM

    from crossray.checkpoints import Family
    from crossray.models.layer import load_model
    from tests.conftest import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("gpt_neox")).half()
    model.save_pretrained(tmp_path / "fam" / "step1")
    family = Family.from_dir(tmp_path / "fam")
    assert next(load_model(family, "step1", device="cpu").parameters()).dtype == torch.float32
    assert next(load_layer_model(family, "step1", 1, device="cpu").model.parameters()).dtype == torch.float32
    bf16 = load_model(family, "step1", dtype="bfloat16", device="cpu")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert AttributionConfig().dtype == "float32"


def test_baseline_is_decided_per_task(toy_tokenizer, toy_dir):
    """One definition of IE per task: patch when every example has a usable patch prefix, zero when
    none has, and a task that mixes them is refused unless asked for (then recorded as mixed)."""
    import dataclasses

    from crossray.attribution import task_baseline

    task = load_task(toy_dir / "tasks" / "simple_agreement.jsonl", toy_tokenizer)
    flip = [dataclasses.replace(e, patch_prefix=e.clean_prefix.replace(" dog ", " cat ")
                                if " dog " in e.clean_prefix else e.clean_prefix) for e in task.examples]
    every = dataclasses.replace(task, examples=flip)
    some = dataclasses.replace(task, examples=flip[:5] + task.examples[5:])
    assert task_baseline(task, toy_tokenizer, AttributionConfig()) == "zero"
    assert task_baseline(every, toy_tokenizer, AttributionConfig()) == "patch"
    with pytest.raises(TaskError, match=r"simple_agreement: 5 of 200 examples have a usable patch_prefix"):
        task_baseline(some, toy_tokenizer, AttributionConfig())
    assert task_baseline(some, toy_tokenizer, AttributionConfig(allow_mixed_baseline=True)) == "mixed"
    assert task_baseline(some, toy_tokenizer, AttributionConfig(baseline="zero")) == "zero"
