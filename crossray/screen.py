"""Checkpoint screening and automatic selection (method.md §9.6, §10).

- `activation_similarity`: every revision's residual at the layer on the task sentences (clean prefix
  + clean answer, real tokens only); the mean per-token cosine similarity between every pair of
  revisions, as an (R, R) matrix. One revision is in memory at a time.
- `select_checkpoints`: the screened revisions are split into N phases at the change points of all
  task accuracy curves at once (optimal segmentation, so a drop starts a phase as a rise does); the
  last phase is represented by the final model (every set of the paper ends with it), each other
  phase by its most typical revision (activation similarity breaks ties), so a transient phase (a
  dip at a single revision) is kept rather than averaged away. Revisions with identical weights count
  once (the later name stays: `main` over `step143000`). The reasons say which phase each checkpoint
  stands for and what changed. A user-given set always wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from crossray.checkpoints import CheckpointError, Family
from crossray.models.layer import encode, left_pad, load_layer_model


@torch.inference_mode()
def revision_activations(family: Family, revision: str, layer: int, tokenizer, texts: Sequence[str],
                         batch_size: int = 64, dtype: str = "float32", *, device: str | torch.device
                         ) -> torch.Tensor:
    """Unit-normalised residuals entering block `layer` at every real token of `texts`, (N_tok, D), the
    model on `device` (the result on the CPU)."""
    lm = load_layer_model(family, revision, layer, dtype=dtype, device=device)
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = left_pad(tokenizer, [encode(tokenizer, t) for t in texts[i:i + batch_size]])
        acts = lm.resid_pre(ids.to(device), mask.to(device)).float()[mask.to(device).bool()]  # (n_real, D)
        out.append(torch.nn.functional.normalize(acts, dim=-1).half().cpu())
    return torch.cat(out)


def activation_similarity(family: Family, revisions: Sequence[str], layer: int, tokenizer,
                          texts: Sequence[str], device: str | torch.device = "cpu") -> torch.Tensor:
    """Mean per-token cosine similarity between every pair of revisions, (R, R)."""
    return similarity_matrix([revision_activations(family, r, layer, tokenizer, texts, device=device)
                              for r in revisions])


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
    phases: tuple[tuple[str, str], ...] = ()
    """(first, last) revision of each phase the selected checkpoints stand for."""


def segment(curves_RT: torch.Tensor, n: int) -> list[tuple[int, int]]:
    """Split R revisions into n contiguous phases minimising the squared deviation of the task curves
    from each phase's mean (optimal segmentation by dynamic programming); [(start, end)] inclusive."""
    R = curves_RT.shape[0]
    csum = torch.cat([torch.zeros(1, curves_RT.shape[1]), curves_RT.cumsum(0)]).double()
    csq = torch.cat([torch.zeros(1, curves_RT.shape[1]), (curves_RT**2).cumsum(0)]).double()

    def cost(i: int, j: int) -> float:  # revisions i..j inclusive
        k = j - i + 1
        s, q = csum[j + 1] - csum[i], csq[j + 1] - csq[i]
        return float((q - s * s / k).sum())

    best = [[float("inf")] * (R + 1) for _ in range(n + 1)]
    cut = [[0] * (R + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for m in range(1, n + 1):
        for j in range(m, R + 1):  # first j revisions in m phases
            for i in range(m - 1, j):
                c = best[m - 1][i] + cost(i, j - 1)
                if c < best[m][j] - 1e-12:
                    best[m][j], cut[m][j] = c, i
    phases, j = [], R
    for m in range(n, 0, -1):
        phases.append((cut[m][j], j - 1))
        j = cut[m][j]
    return phases[::-1]


def _representative(curves_RT: torch.Tensor, similarity: torch.Tensor | None, i: int, j: int) -> int:
    """The revision most typical of phase i..j: closest to the phase's mean accuracies, ties broken by
    the highest mean activation similarity to the phase's other revisions."""
    idx = list(range(i, j + 1))
    mean = curves_RT[i:j + 1].mean(0)
    dist = [round(float(((curves_RT[r] - mean) ** 2).sum()), 6) for r in idx]
    sim = [float(similarity[r, i:j + 1].mean()) if similarity is not None else 0.0 for r in idx]
    return min(zip(dist, [-s for s in sim], idx, strict=True))[2]


def _describe(revisions: Sequence[str], tasks: Sequence[str], curves_RT: torch.Tensor, phase: tuple[int, int],
              pick: int, previous: tuple[int, int] | None) -> str:
    i, j = phase
    span = revisions[i] if i == j else f"{revisions[i]}..{revisions[j]}"
    accs = ", ".join(f"{t} {curves_RT[pick, k]:.2f}" for k, t in enumerate(tasks))
    final = " (the final model, always kept)" if pick == len(revisions) - 1 else ""
    text = f"{revisions[pick]}{final} stands for {span} ({accs})"
    if previous is not None:
        change = curves_RT[i:j + 1].mean(0) - curves_RT[previous[0]:previous[1] + 1].mean(0)
        moves = [f"{tasks[k]} {'rises' if change[k] > 0 else 'drops'} {abs(float(change[k])):.2f}"
                 for k in change.abs().argsort(descending=True)[:3].tolist() if abs(change[k]) >= 0.05]
        text += "; from the previous phase " + (", ".join(moves) or "little changes")
    return text


def distinct_weights(revisions: Sequence[str], hashes: Sequence[str] | None) -> list[int]:
    """Indices of the revisions selection chooses from: of several with identical weights, the last."""
    if hashes is None:
        return list(range(len(revisions)))
    last = {h: i for i, h in enumerate(hashes)}
    return [i for i, h in enumerate(hashes) if last[h] == i]


def select_checkpoints(revisions: Sequence[str], accuracy: dict[str, Sequence[float]],
                       similarity: torch.Tensor | None, n: int = 3,
                       given: Sequence[str] | None = None, hashes: Sequence[str] | None = None) -> Selection:
    """One checkpoint per phase of the task accuracy curves, or the user's set when given.

    The screened revisions (in training order; of several with identical `hashes`, the last) are
    split into `n` phases at the change points of all task curves at once, drops included (a task
    that is learned, then unlearned for a heuristic, then learned again has three phases). The last
    phase is represented by the final model, each other phase by its most typical revision. So a
    transient phase, like the toy's nearest-noun dip on agreement across a prepositional phrase, is
    crosscoded rather than jumped over, and the set ends where training ended, as the paper's sets
    do. Without accuracy curves the activation dissimilarity is segmented instead.
    """
    revisions = list(revisions)
    if given:
        missing = [r for r in given if r not in revisions]
        if missing:
            raise CheckpointError(f"given checkpoints {missing} are not among the screened {revisions}")
        if len(set(given)) < 2:
            raise CheckpointError(f"a checkpoint set needs at least 2 distinct revisions, got {list(given)}")
        return Selection(tuple(given), ("given by the user",))
    keep = distinct_weights(revisions, hashes)
    if n < 2 or len(keep) < 2 or n > len(keep):
        raise CheckpointError(f"cannot select {n} checkpoints from {len(keep)} revisions with distinct "
                              "weights")
    tasks = list(accuracy)
    if tasks:
        curves_RT = torch.tensor([list(accuracy[t]) for t in tasks], dtype=torch.float32).T.nan_to_num(0.5)
    else:  # no task: the activations' own drift (1 - cosine to the first revision)
        assert similarity is not None, "selection needs accuracy curves or activation similarity"
        curves_RT, tasks = (1 - similarity[:, :1]).float(), ["activation drift"]
    revisions, curves_RT = [revisions[i] for i in keep], curves_RT[keep]
    similarity = similarity[keep][:, keep] if similarity is not None else None
    phases = segment(curves_RT, n)
    picks = [_representative(curves_RT, similarity, i, j) for i, j in phases[:-1]] + [len(revisions) - 1]
    reasons = tuple(_describe(revisions, tasks, curves_RT, ph, pick, phases[k - 1] if k else None)
                    for k, (ph, pick) in enumerate(zip(phases, picks, strict=True)))
    return Selection(tuple(revisions[p] for p in picks), reasons,
                     tuple((revisions[i], revisions[j]) for i, j in phases))
