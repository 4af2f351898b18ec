"""Checkpoint screening and automatic selection (method.md §9.6, §10).

- `activation_similarity`: every revision's residual at the layer on the task sentences (clean prefix
  + clean answer, real tokens only); the mean per-token cosine similarity between every pair of
  revisions, as an (R, R) matrix. One revision is in memory at a time.
- `select_checkpoints`: the shift between consecutive revisions is the mean absolute change of task
  accuracy plus the activation dissimilarity (1 - cosine), each scaled by its largest value; the N - 1
  largest shifts are taken, and the set is the revision before the earliest of them plus the revision
  after each, so it brackets what changed. The reason is recorded. A user-given set always wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from crossray.checkpoints import CheckpointError, Family
from crossray.models.layer import encode, left_pad, load_layer_model


@torch.inference_mode()
def revision_activations(family: Family, revision: str, layer: int, tokenizer, texts: Sequence[str],
                         batch_size: int = 64) -> torch.Tensor:
    """Unit-normalised residuals entering block `layer` at every real token of `texts`, (N_tok, D)."""
    lm = load_layer_model(family, revision, layer)
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = left_pad(tokenizer, [encode(tokenizer, t) for t in texts[i:i + batch_size]])
        acts = lm.resid_pre(ids, mask).float()[mask.bool()]  # (n_real, D)
        out.append(torch.nn.functional.normalize(acts, dim=-1).half())
    return torch.cat(out)


def activation_similarity(family: Family, revisions: Sequence[str], layer: int, tokenizer,
                          texts: Sequence[str]) -> torch.Tensor:
    """Mean per-token cosine similarity between every pair of revisions, (R, R)."""
    return similarity_matrix([revision_activations(family, r, layer, tokenizer, texts) for r in revisions])


def similarity_matrix(acts: Sequence[torch.Tensor]) -> torch.Tensor:
    """(R, R) mean per-token cosine from unit-normalised activations of the same tokens."""
    R = len(acts)
    sim = torch.eye(R)
    for a in range(R):
        for b in range(a + 1, R):
            sim[a, b] = sim[b, a] = (acts[a].float() * acts[b].float()).sum(-1).mean()
    return sim


@dataclass(frozen=True)
class Selection:
    revisions: tuple[str, ...]
    reasons: tuple[str, ...]
    shifts: tuple[float, ...]
    """Combined shift between consecutive revisions (length R - 1)."""


def select_checkpoints(revisions: Sequence[str], accuracy: dict[str, Sequence[float]],
                       similarity: torch.Tensor | None, n: int = 3,
                       given: Sequence[str] | None = None) -> Selection:
    """The checkpoint set at the largest shifts of the curves, or the user's set when given."""
    revisions = list(revisions)
    if given:
        missing = [r for r in given if r not in revisions]
        if missing:
            raise CheckpointError(f"given checkpoints {missing} are not among the screened {revisions}")
        if len(set(given)) < 2:
            raise CheckpointError(f"a checkpoint set needs at least 2 distinct revisions, got {list(given)}")
        return Selection(tuple(given), ("given by the user",), ())
    if n < 2 or len(revisions) < 2 or n > len(revisions):
        raise CheckpointError(f"cannot select {n} checkpoints from {len(revisions)} revisions")
    acc = torch.tensor([list(v) for v in accuracy.values()], dtype=torch.float32)  # (tasks, R)
    d_acc = (acc[:, 1:] - acc[:, :-1]).abs().nanmean(0) if len(acc) else torch.zeros(len(revisions) - 1)
    d_sim = (1 - similarity.diagonal(1)) if similarity is not None else torch.zeros_like(d_acc)
    scale = lambda v: v / v.max() if v.max() > 0 else v  # noqa: E731
    shift = scale(d_acc) + scale(d_sim)
    chosen = sorted(shift.topk(min(n - 1, len(shift))).indices.tolist())
    picked = sorted({chosen[0]} | {i + 1 for i in chosen})
    for i in reversed(range(len(revisions))):  # overlapping shifts: fill from the latest revisions
        if len(picked) >= n:
            break
        picked = sorted(set(picked) | {i})
    reasons = tuple(f"{revisions[i]} -> {revisions[i + 1]}: accuracy change {d_acc[i]:.2f}, "
                    f"activation cosine {1 - d_sim[i]:.2f}" for i in chosen)
    result = tuple(revisions[i] for i in picked[:n])
    if len(set(result)) < 2:
        raise CheckpointError(f"selection yields fewer than 2 distinct checkpoints: {list(result)}")
    return Selection(result, reasons, tuple(shift.tolist()))
