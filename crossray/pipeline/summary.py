"""A finished run in two forms: the text a person reads, and one JSON object for scripts (`--json`)."""

from __future__ import annotations

import math

from crossray.attribution import TaskSummary
from crossray.pipeline.stages import RunOutcome
from crossray.store import STAGES, column, suffixes


def _num(x) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


# Which form of ΔCE and of the ablation rho each method puts first (both are always recorded):
# ΔCE with position 0 left real (`delta_ce`) or spliced like the paper (`delta_ce_pos0`); rho as the
# mean over checkpoints of the N-way rho, or the mean over pairs of the paper's 2-way rho.
HEADLINE = {"crossray": {"delta_ce": "delta_ce", "ablation_rho": "mean_rho_relie"},
            "paper": {"delta_ce": "delta_ce_pos0", "ablation_rho": "mean_pair_rho_relie"}}


def _ablation(info: TaskSummary, method: str) -> dict:
    a = info.ablation
    if a is None:  # fewer than 3 selected features: no check
        return {"ablation_rho": None, "ablation_rho_nway": None, "ablation_rho_2way": None,
                "ablation_rho_pairs": {}}
    return {"ablation_rho": _num(getattr(a, HEADLINE[method]["ablation_rho"])),
            "ablation_rho_nway": _num(a.mean_rho_relie), "ablation_rho_2way": _num(a.mean_pair_rho_relie),
            "ablation_rho_pairs": {p: _num(v["rho_relie"]) for p, v in a.pairs.items()}}


def _checkpoint(o: RunOutcome, metrics: dict, rev: str) -> dict:
    value = lambda m: _num(metrics.get(column(m, rev)))  # noqa: E731
    head = HEADLINE[o.method]["delta_ce"]
    return {"revision": rev, "tokens_seen": o.family.revision(rev).tokens_seen, "fve": value("fve"),
            "delta_ce": value(head), "ce_recovered": value(head.replace("delta_ce", "ce_recovered")),
            "delta_ce_skip_pos0": value("delta_ce"), "delta_ce_pos0": value("delta_ce_pos0")}


def summary_json(o: RunOutcome) -> dict:
    """{"run", "method", "mlflow_run_id", "registered", "revisions", "stages", "devices", "screen",
    "checkpoints", "l0", "dead_latents", "tasks"} (the pipeline issue's schema; `devices`: each stage's
    device, beside `stages` so that their statuses stay plain strings). A checkpoint's `delta_ce` and a
    task's `ablation_rho` are the method's headline form (`HEADLINE`); both forms sit beside them."""
    assert o.select and o.evaluate and o.screen and o.attribute, "a finished run"
    revisions = o.select.revisions
    metrics = o.evaluate.metrics
    screen = o.screen
    return {
        "run": o.name,
        "method": o.method,
        "mlflow_run_id": o.mlflow_run_id,
        "registered": o.registered["uri"] if o.registered else None,
        "revisions": revisions,
        "stages": {s: o.status.get(s, "not run") for s in STAGES},
        "devices": {s: o.devices[s] for s in STAGES if s in o.devices},
        "screen": {task: dict(zip(screen.revisions, map(_num, acc), strict=True))
                   for task, acc in screen.accuracy.items()},
        "checkpoints": [_checkpoint(o, metrics, rev) for rev in revisions],
        "l0": _num(metrics["l0"]),
        "dead_latents": int(metrics["dead"]),
        "tasks": {task: {"examples": info.examples, **_ablation(info, o.method), "selected": info.selected}
                  for task, info in o.attribute.tasks.items()},
    }


def summary_text(o: RunOutcome) -> str:
    s = summary_json(o)
    lines = [f"method: {s['method']}", "stages: " + ", ".join(f"{k} {v}" for k, v in s["stages"].items()),
             "devices: " + ", ".join(f"{k} {v}" for k, v in s["devices"].items()),
             "checkpoint      FVE     ΔCE"]
    for ck in s["checkpoints"]:
        fve, dce = (math.nan if ck[m] is None else ck[m] for m in ("fve", "delta_ce"))
        lines.append(f"{ck['revision']:12s} {fve:7.3f} {dce:7.3f}")
    lines.append(f"L0 {s['l0']:.1f}, dead latents {s['dead_latents']}")
    assert o.analyse is not None
    lines.append(f"features by decoder-norm group: {o.analyse.groups_by_reldec}")
    for task, info in s["tasks"].items():
        rho = info["ablation_rho"]
        groups = o.analyse.groups_by_relie.get(task, {})
        lines.append(f"{task}: {len(info['selected'])} top features by RelIE, groups {groups}, "
                     f"ablation rho {rho if rho is None else round(rho, 3)}")
    if s["registered"]:
        lines.append(f"crosscoder: {s['registered']} (version {o.registered['version']}), "  # type: ignore[index]
                     f"MLflow parent run {s['mlflow_run_id']}")
    return "\n".join(lines)


def summary_markdown(o: RunOutcome) -> str:
    """The parent run's description (MLflow's run note): the checkpoint set and why, the
    reconstruction table, the feature groups, and per task the top features and the ablation check."""
    s = summary_json(o)
    assert o.select is not None and o.analyse is not None
    lines = [f"# {o.name}: {o.family.name}, layer {o.layer}", "", f"Method: `{o.method}` ("
             + ("the paper's computation: ΔCE with position 0 spliced, the 2-way ablation ρ per pair"
                if o.method == "paper" else "ΔCE with position 0 left real, the N-way ablation ρ")
             + "; both forms of each are in the tables below).", "",
             "## Checkpoints", ", ".join(f"`{rev}`" for rev in s["revisions"]), ""]
    lines += [f"- {reason}" for reason in o.select.reasons]
    lines += ["", "| revision | tokens seen | FVE | ΔCE | CE recovered | ΔCE, position 0 real | "
              "ΔCE, position 0 spliced (paper) |", "|---|---|---|---|---|---|---|"]
    for ck in s["checkpoints"]:
        cells = [_fmt(ck[m]) for m in ("fve", "delta_ce", "ce_recovered", "delta_ce_skip_pos0",
                                       "delta_ce_pos0")]
        lines.append(f"| {ck['revision']} | {ck['tokens_seen']} | " + " | ".join(cells) + " |")
    lines += ["", f"L0 {_fmt(s['l0'])}, dead latents {s['dead_latents']}", "", "## Feature groups (RelDec)"]
    lines += [f"- {group}: {n}" for group, n in o.analyse.groups_by_reldec.items()]
    lines += ["", "## Tasks", "| task | examples | ablation ρ (RelIE) | N-way ρ | 2-way ρ per pair | "
              "top features |", "|---|---|---|---|---|---|"]
    for task, info in s["tasks"].items():
        top = ", ".join(f"#{f}" for f in info["selected"][:10])
        pairs = ", ".join(f"{p} {_fmt(v)}" for p, v in info["ablation_rho_pairs"].items()) or "–"
        lines.append(f"| {task} | {info['examples']} | {_fmt(info['ablation_rho'])} | "
                     f"{_fmt(info['ablation_rho_nway'])} | {pairs} | {top} |")
    lines += _relie_tables(o, s["revisions"])
    if s["registered"]:
        lines += ["", f"Crosscoder: `{s['registered']}`"]
    return "\n".join(lines)


def _relie_tables(o: RunOutcome, revisions: list[str]) -> list[str]:
    lines = ["", "## Top features per task (RelIE one-vs-all; pairwise: share of b in a+b)"]
    import pandas as pd

    from crossray.report import pair_cell, top_feature_table
    from crossray.store import EFFECTS
    from crossray.store import table as table_path

    assert o.attribute is not None
    effects = pd.read_parquet(table_path(o.attribute.effects, EFFECTS))
    for task, info in o.attribute.tasks.items():
        table = top_feature_table(effects, task, info.selected, revisions)
        if table.empty:
            continue
        pairs = suffixes(table.columns, "relie_pair")
        head = ["feature", "group", *[f"RelIE {r}" for r in revisions], *pairs]
        lines += ["", f"### {task}", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for _, row in table.iterrows():
            values = [str(int(row["feature"])), str(row["group"])]
            values += [_fmt(float(row[column("relie", r)])) for r in revisions]
            values += [pair_cell(row, column("relie_pair", p)) for p in pairs]
            lines.append("| " + " | ".join(values) + " |")
    return lines


def parent_metrics(o: RunOutcome) -> dict[str, float]:
    """The headline numbers as parent-run metrics, so the experiment table compares checkpoint sets."""
    s = summary_json(o)
    forms = (("fve", "fve"), ("delta_ce", "delta_ce_skip_pos0"), ("delta_ce_pos0", "delta_ce_pos0"))
    out = {column(name, ck["revision"]): ck[m] for ck in s["checkpoints"] for name, m in forms}
    out.update(l0=s["l0"], dead_latents=s["dead_latents"])
    for t, i in s["tasks"].items():  # names fixed by form, whatever the method: one experiment table
        out[column("ablation_rho", t)] = i["ablation_rho_nway"]
        out[column("ablation_rho_2way", t)] = i["ablation_rho_2way"]
    return {k: float(v) for k, v in out.items() if v is not None}


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)
