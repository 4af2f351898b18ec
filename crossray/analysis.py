"""Feature analyses on crosscoder weights and activations, for any number C of checkpoints.

- decoder norms per checkpoint, and their shares: one-vs-all `v_c / sum_j v_j` and every pair
  `v_b / (v_a + v_b)` (RelDec, method.md §8.1; the same share functions serve RelIE; `pair_columns`
  writes the pairs as table columns for 3 or more checkpoints);
- the paper's classes (share < 0.3 -> 0, > 0.7 -> 1, else 0.5) and group labels generalised to any C:
  "<c> specific" when one share exceeds the high threshold, else the set of checkpoints whose share
  reaches the low threshold ("A-B shared", "shared by all"), else "others" (§8.2);
- emerging / maintained / discontinued / transient along the checkpoint order, from presence
  (decoder norm at least `presence` of the feature's largest norm);
- decoder cosine similarity between checkpoints (§8.3, for every pair);
- top-activating contexts per feature, jointly and per checkpoint.

Dimension legend: L latents, C checkpoints, D d_model, N tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import combinations
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from crossray.store import all_zero_column, column

if TYPE_CHECKING:
    from crossray.models.crosscoder import Crosscoder


class Shares(NamedTuple):
    share_LC: Tensor
    all_zero_L: Tensor
    """Features whose values are zero at every checkpoint (given share 1/C, flagged)."""


def decoder_norms(W_dec_LCD: Tensor) -> Tensor:
    assert W_dec_LCD.ndim == 3, "W_dec must be (L, C, D)"
    return W_dec_LCD.norm(dim=-1)


def one_vs_all(values_LC: Tensor) -> Shares:
    """v_c / sum_j v_j per feature; all-zero features get 1/C and are flagged."""
    values_LC = values_LC.abs().float()
    total_L = values_LC.sum(-1)
    zero_L = total_L == 0
    share = values_LC / total_L.clamp_min(torch.finfo(values_LC.dtype).tiny)[:, None]
    share[zero_L] = 1.0 / values_LC.shape[1]
    return Shares(share, zero_L)


def pairwise(values_LC: Tensor) -> dict[tuple[int, int], Shares]:
    """For every pair a < b: v_b / (v_a + v_b); a pair that sums to 0 gets 0.5 and is flagged (§16.6)."""
    values_LC = values_LC.abs().float()
    out = {}
    for a, b in combinations(range(values_LC.shape[1]), 2):
        s = one_vs_all(values_LC[:, [a, b]])
        out[(a, b)] = Shares(s.share_LC[:, 1], s.all_zero_L)
    return out


def pair_columns(values_LC: Tensor, names: Sequence[str], prefix: str) -> list[dict[str, float | bool]]:
    """Per feature, the share of b in every pair a < b as `<prefix>/<a>-<b>` (method.md's 3-way
    tables), and whether the pair summed to 0 (its share then 0.5) as `<prefix>_all_zero/<a>-<b>`;
    empty dicts for 2 checkpoints, where the one pair is the one-vs-all share and its flag."""
    if values_LC.shape[1] < 3:
        return [{} for _ in range(values_LC.shape[0])]
    cols: dict[str, list] = {}
    for (a, b), s in pairwise(values_LC).items():
        name = column(prefix, f"{names[a]}-{names[b]}")
        cols[name] = s.share_LC.tolist()
        cols[all_zero_column(name)] = s.all_zero_L.tolist()
    return [{k: v[i] for k, v in cols.items()} for i in range(values_LC.shape[0])]


def classify(share: Tensor, low: float = 0.3, high: float = 0.7) -> Tensor:
    """The paper's scalar classes: 0 below `low`, 1 above `high`, 0.5 between."""
    out = torch.full_like(share, 0.5)
    out[share < low] = 0.0
    out[share > high] = 1.0
    return out


def group_labels(share_LC: Tensor, names: Sequence[str], low: float = 0.3, high: float = 0.7
                 ) -> list[str]:
    """Paper's group of each feature from its one-vs-all shares, for any number of checkpoints."""
    C = share_LC.shape[1]
    assert len(names) == C, "one name per checkpoint"
    labels = []
    for row in share_LC.tolist():
        top = max(range(C), key=row.__getitem__)
        if row[top] > high:
            labels.append(f"{names[top]} specific")
            continue
        members = [names[c] for c in range(C) if row[c] >= low]
        if len(members) == C:
            labels.append("shared by all")
        elif len(members) >= 2:
            labels.append("-".join(members) + " shared")
        else:
            labels.append("others")
    return labels


def trajectory_classes(norms_LC: Tensor, presence: float = 0.3) -> list[str]:
    """emerging / discontinued / maintained / transient / absent along the checkpoint order."""
    peak_L = norms_LC.max(-1).values.clamp_min(torch.finfo(torch.float32).tiny)
    present_LC = norms_LC >= presence * peak_L[:, None]
    present_LC &= norms_LC > 0
    out = []
    for first, last, any_ in zip(present_LC[:, 0].tolist(), present_LC[:, -1].tolist(),
                                 present_LC.any(-1).tolist(), strict=True):
        if first and last:
            out.append("maintained")
        elif last:
            out.append("emerging")
        elif first:
            out.append("discontinued")
        else:
            out.append("transient" if any_ else "absent")
    return out


def decoder_cosine(W_dec_LCD: Tensor) -> Tensor:
    """Cosine similarity of each feature's decoder vectors between checkpoints, shape (L, C, C)."""
    unit = F.normalize(W_dec_LCD.float(), dim=-1)
    return torch.einsum("lcd,led->lce", unit, unit)


# -- top-activating contexts ------------------------------------------------------------------------

class TopContexts:
    """Streaming top-k token positions per feature (and per checkpoint) over batches of activations.

    `update(scores_NL, ids_N)` keeps, for each feature, the k largest scores seen so far and the
    integer ids (e.g. seq * 2**20 + pos) of the tokens that produced them.
    """

    def __init__(self, n_latents: int, k: int, n_views: int = 1):
        self.k = k
        self.values_VkL = torch.full((n_views, k, n_latents), float("-inf"))
        self.ids_VkL = torch.full((n_views, k, n_latents), -1, dtype=torch.long)

    def update(self, scores_VNL: Tensor, ids_N: Tensor) -> None:
        V, N, L = scores_VNL.shape
        ids_VNL = ids_N.view(1, N, 1).expand(V, N, L)
        values = torch.cat([self.values_VkL, scores_VNL.float().cpu()], dim=1)
        ids = torch.cat([self.ids_VkL, ids_VNL.cpu()], dim=1)
        top = values.topk(self.k, dim=1)
        self.values_VkL, self.ids_VkL = top.values, ids.gather(1, top.indices)


def checkpoint_contributions(W_enc_CDL: Tensor, x_NCD: Tensor) -> Tensor:
    """Each checkpoint's share of every pre-activation, x_c @ W_enc[c], shape (C, N, L).

    The latent is shared, so its joint activation ranks contexts once; these per-checkpoint terms say
    which contexts each checkpoint's own activations tie to the feature.
    """
    return torch.einsum("ncd,cdl->cnl", x_NCD.float(), W_enc_CDL.float())


@torch.no_grad()
def top_contexts(crosscoder: Crosscoder, batches: Iterable[tuple[Tensor, Tensor]], k: int) -> TopContexts:
    """Top-k token ids per feature: view 0 ranks by the joint activation, view 1 + c by checkpoint
    c's encoder contribution. `batches` yields (raw acts (N, C, D), token ids (N,))."""
    C, _, L = crosscoder.shape
    top = TopContexts(L, k, n_views=1 + C)
    for x_NCD, ids_N in batches:  # scored where the crosscoder is, ranked on the CPU
        x = crosscoder.normalise(x_NCD.to(crosscoder.norm_factors_C.device).float())
        joint_NL = crosscoder.encode(x, mode="eval")
        per_CNL = checkpoint_contributions(crosscoder.W_enc_CDL, x)
        top.update(torch.cat([joint_NL[None], per_CNL]).cpu(), ids_N)
    return top


def window_scores(crosscoder: Crosscoder, top: TopContexts, batches: Iterable[tuple[Tensor, Tensor]],
                  before: int, after: int) -> Tensor:
    """Each top entry's scores over its window of positions pos-before .. pos+after, (V, k, L, W).

    A second pass over the same batches (raw acts (N, C, D), token ids seq * 2**20 + pos): the score of
    entry (view v, feature l) at every position of its window, so a page can shade each token of a
    top context. Positions outside the stored rows stay NaN.
    """
    V, k, L = top.ids_VkL.shape
    offsets = torch.arange(-before, after + 1)
    keys_VkLW = top.ids_VkL[..., None] + offsets  # the token ids each window needs
    keys_VkLW[top.ids_VkL < 0] = -1
    out = torch.full(keys_VkLW.shape, float("nan"))
    v_idx = torch.arange(V).view(V, 1, 1, 1).expand_as(keys_VkLW)
    l_idx = torch.arange(L).view(1, 1, L, 1).expand_as(keys_VkLW)
    with torch.no_grad():
        for x_NCD, ids_N in batches:
            ids_sorted, order = ids_N.sort()
            pos = torch.searchsorted(ids_sorted, keys_VkLW).clamp(max=len(ids_N) - 1)
            hit = ids_sorted[pos] == keys_VkLW
            if not hit.any():
                continue
            x = crosscoder.normalise(x_NCD.to(crosscoder.norm_factors_C.device).float())
            scores_VNL = torch.cat([crosscoder.encode(x, mode="eval")[None],
                                    checkpoint_contributions(crosscoder.W_enc_CDL, x)]).cpu()
            rows = order[pos[hit]]
            out[hit] = scores_VNL[v_idx[hit], rows, l_idx[hit]].float()
    return out


def context_rows(top: TopContexts, windows_VkLW: Tensor, tokens_NS: Tensor, decode, views: Sequence[str],
                 before: int) -> list[dict]:
    """Table rows, one per (feature, view, rank) with a positive score: the window's tokens (decoded
    one by one with `decode(id)`), their scores, and the index of the top token in the window."""
    rows = []
    W = windows_VkLW.shape[-1]
    keep = (top.values_VkL > 0) & (top.ids_VkL >= 0)
    for v, r, f in keep.nonzero().tolist():
        token_id = int(top.ids_VkL[v, r, f])
        seq, pos = token_id >> 20, token_id & (2**20 - 1)
        lo, hi = max(0, pos - before), min(tokens_NS.shape[1], pos - before + W)
        scores = windows_VkLW[v, r, f, lo - (pos - before): hi - (pos - before)]
        rows.append({"feature": f, "view": views[v], "rank": r, "value": float(top.values_VkL[v, r, f]),
                     "seq": seq, "pos": pos, "target": pos - lo,
                     "tokens": [decode(int(t)) for t in tokens_NS[seq, lo:hi]],
                     "scores": [0.0 if s != s else round(float(s), 5) for s in scores.tolist()]})
    rows.sort(key=lambda row: (row["feature"], views.index(row["view"]), row["rank"]))
    return rows


def feature_rows(crosscoder: Crosscoder) -> list[dict]:
    """The features table: decoder norm, RelDec share and cosine per checkpoint (every pair), the
    RelDec group and the trajectory class."""
    revs = list(crosscoder.cfg.revisions)
    norms = crosscoder.decoder_norms().detach()
    shares = one_vs_all(norms)
    groups = group_labels(shares.share_LC, revs)
    trajectory = trajectory_classes(norms)
    cos = decoder_cosine(crosscoder.W_dec_LCD.detach())
    pairs = list(combinations(range(len(revs)), 2))
    pair_shares = pair_columns(norms, revs, "reldec_pair")
    return [{"feature": i, **{column("dec_norm", r): float(norms[i, c]) for c, r in enumerate(revs)},
             **{column("reldec", r): float(shares.share_LC[i, c]) for c, r in enumerate(revs)},
             **pair_shares[i],
             **{column("cos", f"{revs[a]}-{revs[b]}"): float(cos[i, a, b]) for a, b in pairs},
             "group": groups[i], "trajectory": trajectory[i]} for i in range(norms.shape[0])]


def shard_batches(paths: Sequence, n_sequences: int, columns: Sequence[int] | None = None
                  ) -> Iterable[tuple[Tensor, Tensor]]:
    """(acts (N, C, D), token ids seq * 2**20 + pos) of the shard rows whose sequence is below
    `n_sequences` (`columns`: those checkpoints of the shards' axis)."""
    from crossray.extract import read_shard

    for path in paths:
        seq, pos, x = read_shard(path)
        x = x if columns is None else x[:, list(columns)]
        keep = torch.from_numpy(seq < n_sequences)
        yield x[keep], torch.from_numpy(seq * 2**20 + pos).long()[keep]


def extracted_batches(extractor, tokens_NS: Tensor, drop_first_position: bool
                      ) -> Iterable[tuple[Tensor, Tensor]]:
    """The same batches, extracted from the checkpoints (stream mode stores no shard)."""
    from crossray.extract import to_rows

    step = extractor.cfg.batch_sequences
    for start in range(0, len(tokens_NS), step):
        rows = to_rows(np.arange(start, start + len(tokens_NS[start:start + step])),
                       extractor(tokens_NS[start:start + step]), drop_first_position)
        yield torch.from_numpy(rows["acts"]), torch.from_numpy(rows["seq"] * 2**20 + rows["pos"]).long()


def contexts_table(crosscoder: Crosscoder, batches: Callable[[], Iterable], tokens_NS: Tensor, decode,
                   k: int, before: int, after: int) -> list[dict]:
    """Top-k contexts table over `batches()` (called twice: the top tokens, then their windows)."""
    top = top_contexts(crosscoder, batches(), k)
    windows = window_scores(crosscoder, top, batches(), before, after)
    return context_rows(top, windows, tokens_NS, decode, ["joint", *crosscoder.cfg.revisions], before)
