"""PNG plots of a pipeline run (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def accuracy_curves(revisions: Sequence[str], accuracy: dict[str, Sequence[float]], chosen: Sequence[str],
                    path: Path) -> Path:
    """Task accuracy per revision, the crosscoded checkpoints marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = range(len(revisions))
    for task, acc in accuracy.items():
        ax.plot(x, acc, marker="o", label=task)
    for rev in chosen:
        ax.axvline(revisions.index(rev), color="black", linestyle="--", alpha=0.6)
    ax.axhline(0.5, color="grey", linewidth=0.8)
    ax.set_xticks(list(x), revisions, rotation=45, ha="right")
    ax.set_ylabel("prefix accuracy")
    ax.set_title("task accuracy per checkpoint (dashed: crosscoded)")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def reldec_histogram(share_LC: torch.Tensor, names: Sequence[str], path: Path) -> Path:
    """Histogram of each checkpoint's share of the decoder norm (RelDec, one-vs-all)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for c, name in enumerate(names):
        ax.hist(share_LC[:, c].numpy(), bins=40, range=(0, 1), alpha=0.5, label=name)
    ax.set_xlabel("relative decoder norm")
    ax.set_ylabel("features")
    ax.legend()
    return _save(plt, fig, path)


def relie_scatter(share_FC: torch.Tensor, names: Sequence[str], path: Path) -> Path:
    """RelIE of the selected features: a simplex for 3 checkpoints, else one strip per checkpoint."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    if share_FC.shape[1] == 3:
        corners = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 3**0.5 / 2]])
        xy = share_FC @ corners
        ax.plot(*torch.cat([corners, corners[:1]]).T, color="grey")
        for (cx, cy), name in zip(corners.tolist(), names, strict=True):
            ax.annotate(name, (cx, cy), ha="center", va="bottom" if cy > 0 else "top")
        ax.scatter(xy[:, 0], xy[:, 1], s=20)
        ax.set_aspect("equal")
        ax.axis("off")
    else:
        for c in range(share_FC.shape[1]):
            ax.scatter(share_FC[:, c], [c] * len(share_FC), s=15)
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("RelIE")
    ax.set_title("RelIE of the selected features")
    return _save(plt, fig, path)


def ie_evolution(ie_CF: torch.Tensor, features: Sequence[int], names: Sequence[str], path: Path) -> Path:
    """IE of the top features across checkpoints."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for j, f in enumerate(features):
        ax.plot(range(len(names)), ie_CF[:, j].numpy(), marker="o", label=f"#{f}")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("IE")
    ax.set_title("IE of the top features across checkpoints")
    ax.legend(fontsize=7, ncol=2)
    return _save(plt, fig, path)


def study_timeline(rows: Sequence[dict], order: Sequence[str], task: str, path: Path) -> Path:
    """One task's IE mass per checkpoint for every set of a study, on the checkpoints' training order
    (labelled with the tokens seen): one line per set."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    sets = list(dict.fromkeys(r["set"] for r in rows if r["task"] == task))
    for name in sets:
        mine = [r for r in rows if r["task"] == task and r["set"] == name]
        ax.plot([order.index(r["revision"]) for r in mine], [r["ie_mass"] for r in mine], marker="o",
                label=name)
    seen = {r["revision"]: r["tokens_seen"] for r in rows}
    ax.set_xticks(range(len(order)), [f"{rev}\n{_tokens(seen.get(rev))}" for rev in order])
    ax.set_ylabel("IE mass (sum of |IE| over features)")
    ax.set_title(f"{task}: IE mass per checkpoint, one line per checkpoint set")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _tokens(n: int | None) -> str:
    if n is None:
        return ""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit} tokens"
    return f"{n} tokens"
