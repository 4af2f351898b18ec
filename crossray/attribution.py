"""Indirect effects (IE) of crosscoder features per checkpoint, RelIE, and the ablation check.

method.md §11-§12, for any number C of checkpoints, with §16.5-6 fixed. For checkpoint m and a batch:
1. the residual entering block L of every checkpoint is computed once (`resid_pre`), encoded jointly
   by the folded crosscoder into the shared latents f, and split into the reconstruction of
   checkpoint m plus its error e_m = x_m - x^_m;
2. integrated gradients along the straight path from the real state (f, e_m) to the baseline state
   (zero, or the patch prefix's state when the task gives one, `baseline`) at the positions that count
   (step 4; the others stay real all along), K steps (1 = attribution patching), left Riemann sum (the paper's
   alpha_k = k/K): x_k = x_base + (1 - alpha_k)(x_m - x_base); all K interpolants go through the
   suffix of the model (blocks L..) in one batch, with frozen parameters, and only the two answer
   rows of the unembedding at the last position;
3. with g = mean_k grad_x metric, the per-token effect of feature i is (f_base_i - f_i) <W_dec[i, m], g>
   and the error-term effect <e_base - e_m, g> (reported, not discarded);
4. per-token effects are thresholded (|IE| > threshold), summed over an example's real positions
   (less its first token by default, `skip_first_position`, as in training), and averaged over
   examples (weighted by examples).
Metric: logit(patch_answer) - logit(clean_answer) at the last real position (left padding), so a
positive IE means the feature supports the correct answer.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from crossray import analysis as A
from crossray.config import AttributionConfig
from crossray.models.crosscoder import Crosscoder
from crossray.models.layer import LayerModel, encode, left_pad
from crossray.tasks import Example, Task, TaskError

logger = logging.getLogger(__name__)


class EffectSums(NamedTuple):
    """Sums over examples, so shards of a task can be merged by adding them."""

    ie_sum_CL: Tensor
    err_sum_C: Tensor
    metric_sum_C: Tensor
    n_examples: int

    def __add__(self, other: EffectSums) -> EffectSums:  # type: ignore[override]
        return EffectSums(self.ie_sum_CL + other.ie_sum_CL, self.err_sum_C + other.err_sum_C,
                          self.metric_sum_C + other.metric_sum_C, self.n_examples + other.n_examples)

    def means(self) -> tuple[Tensor, Tensor, Tensor]:
        n = max(self.n_examples, 1)
        return self.ie_sum_CL / n, self.err_sum_C / n, self.metric_sum_C / n


def check_crosscoder_fits(cc: Crosscoder, models: Sequence[LayerModel], revisions: Sequence[str]) -> None:
    """Refuse a crosscoder trained on other checkpoints or another layer, naming both."""
    cfg = cc.cfg
    if cfg.revisions and tuple(cfg.revisions) != tuple(revisions):
        raise ValueError(f"crosscoder was trained on checkpoints {list(cfg.revisions)}, "
                         f"not on {list(revisions)}")
    layers = {m.layer for m in models}
    if cfg.layer is not None and layers != {cfg.layer}:
        raise ValueError(f"crosscoder was trained at layer {cfg.layer}, the models are hooked at "
                         f"layer(s) {sorted(layers)}")
    if len(models) != cfg.n_checkpoints or any(m.d_model != cfg.d_model for m in models):
        raise ValueError(f"crosscoder expects {cfg.n_checkpoints} checkpoints of width {cfg.d_model}")


def _batch_inputs(tokenizer, examples: Sequence[Example], device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    ids, mask = left_pad(tokenizer, [encode(tokenizer, e.clean_prefix) for e in examples])
    clean = torch.tensor([e.clean_answer_id for e in examples])
    patch = torch.tensor([e.patch_answer_id for e in examples])
    return ids.to(device), mask.to(device), clean.to(device), patch.to(device)


def _patch_usable(tokenizer, e: Example) -> bool:
    return e.patch_prefix is not None and \
        len(encode(tokenizer, e.patch_prefix)) == len(encode(tokenizer, e.clean_prefix))


def task_baseline(task: Task, tokenizer, cfg: AttributionConfig) -> str:
    """The IG baseline of a whole task, so its mean IE has one definition: "patch" when every example
    has a usable patch prefix (as many tokens as the clean one), "zero" when none has; a task where
    only some have one is refused, unless `allow_mixed_baseline` (then each batch decides, "mixed")."""
    if cfg.baseline == "zero":
        return "zero"
    usable = sum(_patch_usable(tokenizer, e) for e in task.examples)
    if usable == len(task.examples):
        return "patch"
    if cfg.baseline == "patch" or usable:
        if cfg.baseline == "auto" and cfg.allow_mixed_baseline:
            return "mixed"
        raise TaskError(f"task {task.name}: {usable} of {len(task.examples)} examples have a usable "
                        f"patch_prefix (as many tokens as the clean prefix); use baseline 'zero', give "
                        f"every example one, or set attribution.allow_mixed_baseline")
    return "zero"


def for_task(cfg: AttributionConfig, baseline: str) -> AttributionConfig:
    """The config a task's effects are computed with, its baseline decided (`task_baseline`)."""
    return dataclasses.replace(cfg, baseline="auto" if baseline == "mixed" else baseline)  # type: ignore[arg-type]


def patch_inputs(tokenizer, examples: Sequence[Example], mode: str, device) -> Tensor | None:
    """Left-padded patch-prefix ids aligned with the clean ones, or None for the zero baseline."""
    if mode == "zero":
        return None
    clean = [encode(tokenizer, e.clean_prefix) for e in examples]
    patch = [encode(tokenizer, e.patch_prefix) if e.patch_prefix is not None else None for e in examples]
    usable = all(p is not None and len(p) == len(c) for p, c in zip(patch, clean, strict=True))
    if not usable:
        if mode == "patch":
            raise TaskError("baseline 'patch' needs a patch_prefix with as many tokens as the clean "
                            "prefix in every example")
        return None
    return left_pad(tokenizer, patch)[0].to(device)  # type: ignore[arg-type]


def metric(logits_BV: Tensor, clean_B: Tensor, patch_B: Tensor) -> Tensor:
    rows = torch.arange(len(clean_B), device=logits_BV.device)
    return logits_BV[rows, patch_B].float() - logits_BV[rows, clean_B].float()


class _State(NamedTuple):
    x_CBSD: Tensor
    f_BSL: Tensor
    err_CBSD: Tensor


@torch.no_grad()
def crosscoder_state(cc_folded: Crosscoder, models: Sequence[LayerModel], ids: Tensor, mask: Tensor
                     ) -> _State:
    """Every checkpoint's residual at the layer (prefix computed once), latents and error terms."""
    x_CBSD = torch.stack([m.resid_pre(ids, mask).float() for m in models])
    C, B, S, D = x_CBSD.shape
    x_NCD = x_CBSD.permute(1, 2, 0, 3).reshape(B * S, C, D)  # (B*S, C, D)
    out = cc_folded(x_NCD, mode="eval")
    recon_CBSD = out.recon_BCD.view(B, S, C, D).permute(2, 0, 1, 3)  # (C, B, S, D)
    return _State(x_CBSD, out.latents_BL.view(B, S, -1), x_CBSD - recon_CBSD)


def ig_gradient(lm: LayerModel, x_BSD: Tensor, x_base_BSD: Tensor, ids: Tensor, mask: Tensor,
                clean: Tensor, patch: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """(mean over the K interpolants of d metric / d x, metric at the real state), one suffix batch."""
    K, B = steps, x_BSD.shape[0]
    scale_K = 1 - torch.arange(K, device=x_BSD.device, dtype=torch.float32) / K  # alpha_k = k/K
    delta = (x_BSD - x_base_BSD).float()
    x_KBSD = x_base_BSD.float()[None] + scale_K[:, None, None, None] * delta[None]
    x_leaf = x_KBSD.reshape(K * B, *x_BSD.shape[1:]).detach().requires_grad_(True)
    dtype = next(lm.model.parameters()).dtype
    m_KB = lm.logit_diff_from(x_leaf.to(dtype), ids.repeat(K, 1), mask.repeat(K, 1),
                              patch.repeat(K), clean.repeat(K)).view(K, B)
    (grad,) = torch.autograd.grad(m_KB.sum(), x_leaf)
    return grad.view(K, B, *x_BSD.shape[1:]).mean(0), m_KB[0].detach()  # alpha_0 = 0: the real state


def _threshold(ie: Tensor, threshold: float | None) -> Tensor:
    return ie if threshold is None else ie * (ie.abs() > threshold)


class TokenEffects(NamedTuple):
    ie_BSL: Tensor
    """Per-token effect of every feature (before thresholding; zero at padding)."""
    err_BS: Tensor
    """Per-token effect of the error term."""
    metric_B: Tensor
    """The metric at the real state."""


def effect_positions(mask: Tensor, skip_first_position: bool) -> Tensor:
    """Positions whose effects count, (B, S): real tokens, less each example's first one when asked
    (left padding: the first real token is where the cumulative mask reaches 1)."""
    real_BS = mask.bool()
    return real_BS & (mask.cumsum(-1) > 1) if skip_first_position else real_BS


def token_effects(cc_folded: Crosscoder, lm: LayerModel, state: _State, m: int, ids: Tensor,
                  mask: Tensor, clean: Tensor, patch: Tensor, steps: int, base: _State | None = None,
                  positions_BS: Tensor | None = None) -> TokenEffects:
    """Integrated-gradient effects of every feature and of the error term, for checkpoint m.

    The baseline is the zero state (f = 0, e = 0, so x = b_dec) or, given `base`, the patch prefix's
    crosscoder state (aligned position by position), at the positions that count (`positions_BS`,
    default every real token). The others (padding, and position 0 when it is skipped) stay at their
    real activations along the whole path, so the counted effects plus the error effect add up to
    the metric change of moving the counted positions alone (completeness).
    """
    if base is None:
        x_base, f_base, e_base = cc_folded.b_dec_CD[m].detach().expand_as(state.x_CBSD[m]), 0.0, 0.0
    else:
        x_base, f_base, e_base = base.x_CBSD[m], base.f_BSL, base.err_CBSD[m]
    real_BS = mask.bool() if positions_BS is None else positions_BS
    x_base = torch.where(real_BS[..., None], x_base, state.x_CBSD[m])
    g_BSD, met_B = ig_gradient(lm, state.x_CBSD[m], x_base, ids, mask, clean, patch, steps)
    with torch.no_grad():
        dec_LD = cc_folded.W_dec_LCD[:, m].detach()
        ie_BSL = (f_base - state.f_BSL) * (g_BSD @ dec_LD.T) * real_BS[..., None]
        err_BS = ((e_base - state.err_CBSD[m]) * g_BSD).sum(-1) * real_BS
    return TokenEffects(ie_BSL, err_BS, met_B)


def example_effects(cc_folded: Crosscoder, models: Sequence[LayerModel], tokenizer,
                    examples: Sequence[Example], cfg: AttributionConfig,
                    checkpoint_indices: Sequence[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example IE (C, B, L) (thresholded per token, summed over the counted positions), error-term
    effect (C, B) and metric (C, B) of one batch, for the given checkpoints (default: all; the others
    stay zero). Examples are independent, so a batch may mix the examples of several requests."""
    device = next(models[0].model.parameters()).device
    ids, mask, clean, patch = _batch_inputs(tokenizer, examples, device)
    state = crosscoder_state(cc_folded, models, ids, mask)
    patch_ids = patch_inputs(tokenizer, examples, cfg.baseline, device)
    base = crosscoder_state(cc_folded, models, patch_ids, mask) if patch_ids is not None else None
    C, B, L = len(models), len(examples), cc_folded.cfg.n_latents
    ie_CBL, err_CB, met_CB = torch.zeros(C, B, L), torch.zeros(C, B), torch.zeros(C, B)
    positions_BS = effect_positions(mask, cfg.skip_first_position)
    for m in checkpoint_indices if checkpoint_indices is not None else range(C):
        eff = token_effects(cc_folded, models[m], state, m, ids, mask, clean, patch, cfg.steps, base,
                            positions_BS)
        ie_CBL[m] = _threshold(eff.ie_BSL, cfg.threshold).sum(dim=1).cpu()
        err_CB[m] = eff.err_BS.sum(1).cpu()
        met_CB[m] = eff.metric_B.cpu()
    return ie_CBL, err_CB, met_CB


def effects_for_batch(cc_folded: Crosscoder, models: Sequence[LayerModel], tokenizer,
                      examples: Sequence[Example], cfg: AttributionConfig,
                      checkpoint_indices: Sequence[int] | None = None) -> EffectSums:
    """IE sums over the examples of one batch for the given checkpoints (default: all)."""
    ie_CBL, err_CB, met_CB = example_effects(cc_folded, models, tokenizer, examples, cfg, checkpoint_indices)
    return EffectSums(ie_CBL.sum(1), err_CB.sum(1), met_CB.sum(1), len(examples))


def task_effects(cc: Crosscoder, models: Sequence[LayerModel], tokenizer, examples: Sequence[Example],
                 cfg: AttributionConfig, checkpoint_indices: Sequence[int] | None = None) -> EffectSums:
    """IE sums over all examples (folds the crosscoder's normalisation first)."""
    if not examples:
        raise TaskError("no example with single-token answers is left for this tokenizer")
    folded = cc.fold().eval().requires_grad_(False)
    total = None
    for i in range(0, len(examples), cfg.batch_size):
        part = effects_for_batch(folded, models, tokenizer, examples[i:i + cfg.batch_size], cfg,
                                 checkpoint_indices)
        total = part if total is None else total + part
    assert total is not None
    return total


# -- RelIE, selection, tables ---------------------------------------------------------------------

def top_features(ie_CL: Tensor, k: int) -> list[int]:
    """Union over checkpoints of the top-k features by |IE| (nonzero only), like the paper."""
    chosen: set[int] = set()
    for row in ie_CL.abs():
        n = min(k, int((row > 0).sum()))
        chosen |= set(row.topk(n).indices.tolist()) if n else set()
    return sorted(chosen)


def effects_rows(task: str, ie_CL: Tensor, revisions: Sequence[str], cfg: AttributionConfig) -> list[dict]:
    """One row per (feature, checkpoint): IE, RelIE (one-vs-all), class, group, all-zero flag, and the
    feature's pairwise RelIE (`relie_pair/<a>-<b>`, for 3 or more checkpoints)."""
    shares = A.one_vs_all(ie_CL.T)  # (L, C)
    pair_shares = A.pair_columns(ie_CL.T, list(revisions), "relie_pair")
    classes = A.classify(shares.share_LC, cfg.low, cfg.high)
    groups = A.group_labels(shares.share_LC, list(revisions), cfg.low, cfg.high)
    rows = []
    for i in range(ie_CL.shape[1]):
        for c, rev in enumerate(revisions):
            rows.append({"task": task, "feature": i, "checkpoint": rev, "checkpoint_index": c,
                         "ie": float(ie_CL[c, i]), "relie": float(shares.share_LC[i, c]),
                         "relie_class": float(classes[i, c]), "group": groups[i],
                         "all_zero": bool(shares.all_zero_L[i]), **pair_shares[i]})
    return rows


# -- ablation check (method.md §12, for N checkpoints) --------------------------------------------

@torch.no_grad()
def ablated_logit_diffs(cc_folded: Crosscoder, models: Sequence[LayerModel], tokenizer,
                        examples: Sequence[Example], feature_sets: Sequence[Sequence[int]],
                        checkpoint_indices: Sequence[int] | None = None, skip_first_position: bool = True,
                        batch_size: int = 8) -> Tensor:
    """logit(clean) - logit(patch) (= log p(clean) - log p(patch)) per example, (1 + S, C, N): row 0
    the model as it is, row 1 + s with every feature of `feature_sets[s]` zero-ablated in checkpoint
    m's forward pass (x_m - sum_i f_i W_dec[i, m] at the positions IE counts: every real token, less
    the first with `skip_first_position`). Checkpoints not asked for stay NaN."""
    S_, C, N = len(feature_sets), len(models), len(examples)
    out = torch.full((1 + S_, C, N), float("nan"))
    L = cc_folded.cfg.n_latents
    select_SL = torch.zeros(S_, L)  # which features each set zeroes
    for s, feats in enumerate(feature_sets):
        select_SL[s, list(feats)] = 1.0
    device = next(models[0].model.parameters()).device
    select_SL = select_SL.to(device)
    for start in range(0, N, batch_size):
        chunk = examples[start:start + batch_size]
        rows = slice(start, start + len(chunk))
        ids, mask, clean, patch = _batch_inputs(tokenizer, chunk, device)
        state = crosscoder_state(cc_folded, models, ids, mask)
        B = len(chunk)
        f_BSL = state.f_BSL * effect_positions(mask, skip_first_position)[..., None]
        for m in checkpoint_indices if checkpoint_indices is not None else range(C):
            lm = models[m]
            dtype = next(lm.model.parameters()).dtype
            out[0, m, rows] = -metric(lm.last_logits_from(state.x_CBSD[m].to(dtype), ids, mask),
                                      clean, patch).cpu()
            dec_LD = cc_folded.W_dec_LCD[:, m]
            for s0 in range(0, S_, batch_size):  # a few ablated copies of the batch at a time
                sel = select_SL[s0:s0 + batch_size]
                n = len(sel)
                removed = torch.einsum("bsl,nl,ld->nbsd", f_BSL, sel, dec_LD)  # (n, B, S, D)
                x_abl = state.x_CBSD[m][None] - removed
                logits = lm.last_logits_from(x_abl.flatten(0, 1).to(dtype), ids.repeat(n, 1),
                                             mask.repeat(n, 1))
                diff = -metric(logits, clean.repeat(n), patch.repeat(n))
                out[1 + s0:1 + s0 + n, m, rows] = diff.view(n, B).cpu()
    return out


def ablation_deltas(cc: Crosscoder, models: Sequence[LayerModel], tokenizer, examples: Sequence[Example],
                    features: Sequence[int], batch_size: int = 8, skip_first_position: bool = True
                    ) -> Tensor:
    """Mean change of the log-probability difference log p(clean) - log p(patch) when feature i alone is
    zero-ablated in checkpoint m's forward pass (`ablated_logit_diffs`), (F, C)."""
    diffs = ablated_logit_diffs(cc.fold().eval(), models, tokenizer, examples, [[i] for i in features],
                                skip_first_position=skip_first_position, batch_size=batch_size)
    return (diffs[0][None] - diffs[1:]).mean(-1)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation with average ranks for ties."""
    def ranks(x):
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # average ties
            r[x == v] = r[x == v].mean()
        return r

    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def ablation_correlations(deltas_FC: Tensor, ie_FC: Tensor, dec_norms_FC: Tensor,
                          names: Sequence[str] | None = None) -> dict:
    """Spearman rho over features between the ablation share and RelIE, and between it and RelDec,
    in two forms.

    - N-way (`rho_relie`, `rho_reldec` per checkpoint, and their means): the share |d_m| / sum_j |d_j|
      against the one-vs-all RelIE (RelDec) of checkpoint m.
    - Pairwise (`pairs`, `mean_pair_rho_relie`, `mean_pair_rho_reldec`): for every pair a < b, the
      paper's 2-way rho (method.md §12, §15.2): |d_b| / |d_a| against b's share of a + b. The share
      |d_b| / (|d_a| + |d_b|) is monotone in that ratio, so the rank correlation is the paper's. With
      2 checkpoints both forms are the one number the paper reports (0.945 Pythia, 0.952 OLMo);
      with 3 or more only the pairwise rho is comparable with the paper's tables."""
    C = deltas_FC.shape[1]
    names = list(names) if names is not None else [str(c) for c in range(C)]
    abl = A.one_vs_all(deltas_FC).share_LC.numpy()
    relie = A.one_vs_all(ie_FC).share_LC.numpy()
    reldec = A.one_vs_all(dec_norms_FC).share_LC.numpy()
    out: dict = {"rho_relie": [spearman(abl[:, c], relie[:, c]) for c in range(C)],
                 "rho_reldec": [spearman(abl[:, c], reldec[:, c]) for c in range(C)]}
    out["mean_rho_relie"] = float(np.nanmean(out["rho_relie"]))
    out["mean_rho_reldec"] = float(np.nanmean(out["rho_reldec"]))
    pair_abl, pair_ie, pair_dec = (A.pairwise(v) for v in (deltas_FC, ie_FC, dec_norms_FC))
    out["pairs"] = {f"{names[a]}-{names[b]}": {
        "rho_relie": spearman(s.share_LC.numpy(), pair_ie[(a, b)].share_LC.numpy()),
        "rho_reldec": spearman(s.share_LC.numpy(), pair_dec[(a, b)].share_LC.numpy()),
        "all_zero_features": int((s.all_zero_L | pair_ie[(a, b)].all_zero_L).sum())}
        for (a, b), s in pair_abl.items()}
    for form in ("relie", "reldec"):
        values = np.array([p[f"rho_{form}"] for p in out["pairs"].values()])
        out[f"mean_pair_rho_{form}"] = float(values[~np.isnan(values)].mean()) if (~np.isnan(values)).any() \
            else float("nan")
    return out


@dataclasses.dataclass(frozen=True)
class AblationCheck:
    """The zero-ablation check of a task's selected features (`ablation_correlations`), both forms."""

    rho_relie: list[float]
    rho_reldec: list[float]
    mean_rho_relie: float
    """The N-way form: the mean over checkpoints of rho(ablation share, one-vs-all RelIE)."""
    mean_rho_reldec: float
    pairs: dict[str, dict]
    """Per pair `a-b`: the paper's 2-way `rho_relie`, `rho_reldec` and `all_zero_features`."""
    mean_pair_rho_relie: float
    """The paper's form: the mean over pairs of the 2-way rho."""
    mean_pair_rho_reldec: float
    deltas: list[list[float]]
    """(selected features, checkpoints): the logit-difference change of ablating each feature."""


@dataclasses.dataclass(frozen=True)
class TaskSummary:
    """One task's attribution: examples kept and skipped, metric and error-term effect per checkpoint,
    the selected features, the settings that mattered, the ablation check (3 or more features)."""

    examples: int
    skipped: dict[str, int]
    selected: list[int]
    metric: list[float]
    error_effect: list[float]
    baseline: str
    skip_first_position: bool
    dtype: str
    ablation: AblationCheck | None = None

    def to_json(self) -> dict:
        """As `summary.json` holds it (no `ablation` key when there is no check)."""
        out = dataclasses.asdict(self)
        if self.ablation is None:
            del out["ablation"]
        return out

    @classmethod
    def from_json(cls, data: dict) -> TaskSummary:
        fields = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in fields and k != "ablation"}
        ablation = data.get("ablation")
        if ablation is not None:
            names = {f.name for f in dataclasses.fields(AblationCheck)}
            ablation = AblationCheck(**{"pairs": {}, "mean_pair_rho_relie": float("nan"),
                                        "mean_pair_rho_reldec": float("nan"),  # (runs before the 2-way form)
                                        **{k: v for k, v in ablation.items() if k in names}})
        return cls(**known, ablation=ablation)


def summarise(task: Task, sums: EffectSums, cc: Crosscoder, revisions: Sequence[str], cfg: AttributionConfig,
              ablate: Callable[[Sequence[Example], list[int]], Tensor], baseline: str
              ) -> tuple[TaskSummary, list[dict]]:
    """A task's summary (examples kept and skipped, metric and error-term effect per checkpoint, the
    selected features, the ablation check) and its effects rows, from its effect sums.

    `ablate(examples, features)` returns the ablation deltas (F, C), wherever the models live."""
    ie_CL, err_C, met_C = sums.means()
    selected = top_features(ie_CL, cfg.top_k)
    ablation = None
    if len(selected) >= 3:
        deltas = ablate(task.examples, selected)
        norms = cc.decoder_norms().detach()[selected]
        ablation = AblationCheck(**ablation_correlations(deltas, ie_CL[:, selected].T, norms, revisions),
                                 deltas=deltas.tolist())
    info = TaskSummary(sums.n_examples, dict(task.skipped), selected, met_C.tolist(), err_C.tolist(),
                       baseline, cfg.skip_first_position, cfg.dtype, ablation)
    return info, effects_rows(task.name, ie_CL, revisions, cfg)


def attribute(cc: Crosscoder, models: Sequence[LayerModel], revisions: Sequence[str], tokenizer,
              task: Task, cfg: AttributionConfig) -> dict:
    """IE for every feature and checkpoint on a task, RelIE rows, selection, ablation check, in-process."""
    check_crosscoder_fits(cc, models, revisions)
    baseline = task_baseline(task, tokenizer, cfg)
    sums = task_effects(cc, models, tokenizer, task.examples, for_task(cfg, baseline))
    info, rows = summarise(task, sums, cc, revisions, cfg, lambda ex, feats: ablation_deltas(
        cc, models, tokenizer, ex, feats, skip_first_position=cfg.skip_first_position), baseline)
    return {**info.to_json(), "task": task.name, "ie_CL": sums.means()[0], "rows": rows}
