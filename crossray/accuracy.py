"""Task accuracy of every checkpoint of a family: the curve that checkpoint selection reads.

One row per (revision, task): prefix-logit accuracy over single-token examples, full-sentence
log-probability accuracy over every pair, and the counts behind both. Written as Parquet, CSV and
JSON in one folder, atomically (a temp folder renamed into place).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from crossray.checkpoints import Family
from crossray.models.layer import load_model, load_tokenizer
from crossray.store import write_tables
from crossray.tasks import Task, load_tasks, score_task

logger = logging.getLogger(__name__)


def accuracy_curves(family: Family, task_specs: list[str | Path],
                    revisions: list[str] | None = None, batch_size: int = 64, dtype: str = "float32", *,
                    device: str | torch.device) -> tuple[list[dict], list[Task]]:
    """Score every revision on every task (models in `dtype`, on `device`); tasks are tokenised once
    with the first revision's tokenizer."""
    revisions = revisions or family.available_revisions()
    for rev in revisions:
        family.location(rev)  # fail on a missing revision before any model is loaded
    tokenizer = load_tokenizer(family, revisions[0])
    tasks = load_tasks(task_specs, tokenizer)
    rows = []
    for rev in tqdm(revisions, desc="scoring checkpoints", disable=None):
        model = load_model(family, rev, dtype=dtype, device=device)
        info = family.revision(rev)
        for task in tasks:
            rows.append({"revision": rev, "step": info.step, "tokens_seen": info.tokens_seen,
                         **score_task(model, tokenizer, task, batch_size)})
        del model
    return rows, tasks


def write_accuracy(rows: list[dict], tasks: list[Task], out: str | Path) -> Path:
    """accuracy.parquet, accuracy.csv and accuracy.json (rows plus kept/skipped counts per task)."""
    payload = {"rows": rows, "tasks": [t.summary() for t in tasks]}
    return write_tables(out, {"accuracy": rows}, {"accuracy.json": payload})


def format_curves(rows: list[dict], metric: str = "prefix_accuracy") -> str:
    """A text table: one line per task, one column per revision."""
    revisions = list(dict.fromkeys(r["revision"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    by = {(r["task"], r["revision"]): r[metric] for r in rows}
    width = max(len(t) for t in tasks)
    lines = [f"{metric}".ljust(width) + " " + " ".join(f"{r:>8}" for r in revisions)]
    for t in tasks:
        lines.append(t.ljust(width) + " " + " ".join(f"{by[t, r]:8.2f}" for r in revisions))
    return "\n".join(lines)
