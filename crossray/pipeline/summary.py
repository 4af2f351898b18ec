"""A finished run in two forms: the text a person reads, and one JSON object for scripts (`--json`)."""

from __future__ import annotations

import math

from crossray.pipeline.stages import STAGES, RunOutcome
from crossray.store import metric_name


def _num(x) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def summary_json(o: RunOutcome) -> dict:
    """{"run", "mlflow_run_id", "registered", "revisions", "stages", "screen", "checkpoints", "l0",
    "dead_latents", "tasks"} (the pipeline issue's schema)."""
    r = o.results
    revisions = r["select"].revisions
    metrics = r["evaluate"].metrics
    screen = r["screen"]
    return {
        "run": o.name,
        "mlflow_run_id": o.mlflow_run_id,
        "registered": o.registered["uri"] if o.registered else None,
        "revisions": revisions,
        "stages": {s: o.status.get(s, "not run") for s in STAGES},
        "screen": {task: dict(zip(screen.revisions, map(_num, acc), strict=True))
                   for task, acc in screen.accuracy.items()},
        "checkpoints": [{"revision": rev, "tokens_seen": o.family.revision(rev).tokens_seen,
                         **{m: _num(metrics.get(metric_name(m, rev))) for m in ("fve", "delta_ce",
                                                                                 "ce_recovered")}}
                        for rev in revisions],
        "l0": _num(metrics["l0"]),
        "dead_latents": int(metrics["dead"]),
        "tasks": {task: {"examples": info["examples"],
                         "ablation_rho": _num(info.get("ablation", {}).get("mean_rho_relie")),
                         "selected": info["selected"]}
                  for task, info in r["attribute"].tasks.items()},
    }


def summary_text(o: RunOutcome) -> str:
    s = summary_json(o)
    lines = ["stages: " + ", ".join(f"{k} {v}" for k, v in s["stages"].items()),
             "checkpoint      FVE     ΔCE"]
    for ck in s["checkpoints"]:
        fve, dce = (math.nan if ck[m] is None else ck[m] for m in ("fve", "delta_ce"))
        lines.append(f"{ck['revision']:12s} {fve:7.3f} {dce:7.3f}")
    lines.append(f"L0 {s['l0']:.1f}, dead latents {s['dead_latents']}")
    lines.append(f"features by decoder-norm group: {o.results['analyse'].groups_by_reldec}")
    for task, info in s["tasks"].items():
        rho = info["ablation_rho"]
        groups = o.results["analyse"].groups_by_relie.get(task, {})
        lines.append(f"{task}: {len(info['selected'])} top features by RelIE, groups {groups}, "
                     f"ablation rho {rho if rho is None else round(rho, 3)}")
    if s["registered"]:
        lines.append(f"crosscoder: {s['registered']} (version {o.registered['version']}), "  # type: ignore[index]
                     f"MLflow parent run {s['mlflow_run_id']}")
    return "\n".join(lines)


def summary_markdown(o: RunOutcome) -> str:
    """The parent run's description (MLflow's run note): the checkpoint set and why, the
    reconstruction table, the feature groups, and per task the top features and the ablation check."""
    s, r = summary_json(o), o.results
    lines = [f"# {o.name}: {o.family.name}, layer {o.layer}", "",
             "## Checkpoints", ", ".join(f"`{rev}`" for rev in s["revisions"]), ""]
    lines += [f"- {reason}" for reason in r["select"].reasons]
    lines += ["", "| revision | tokens seen | FVE | ΔCE | CE recovered |", "|---|---|---|---|---|"]
    for ck in s["checkpoints"]:
        cells = [_fmt(ck[m]) for m in ("fve", "delta_ce", "ce_recovered")]
        lines.append(f"| {ck['revision']} | {ck['tokens_seen']} | " + " | ".join(cells) + " |")
    lines += ["", f"L0 {_fmt(s['l0'])}, dead latents {s['dead_latents']}", "", "## Feature groups (RelDec)"]
    lines += [f"- {group}: {n}" for group, n in r["analyse"].groups_by_reldec.items()]
    lines += ["", "## Tasks", "| task | examples | ablation ρ (RelIE) | top features |", "|---|---|---|---|"]
    for task, info in s["tasks"].items():
        top = ", ".join(f"#{f}" for f in info["selected"][:10])
        lines.append(f"| {task} | {info['examples']} | {_fmt(info['ablation_rho'])} | {top} |")
    lines += _relie_tables(o, s["revisions"])
    if s["registered"]:
        lines += ["", f"Crosscoder: `{s['registered']}`"]
    return "\n".join(lines)


def _relie_tables(o: RunOutcome, revisions: list[str]) -> list[str]:
    lines = ["", "## Top features per task (RelIE one-vs-all; pairwise: share of b in a+b)"]
    import pandas as pd

    from crossray.report import pair_cell, top_feature_table

    effects = pd.read_parquet(f"{o.results['attribute'].effects}/effects.parquet")
    for task, info in o.results["attribute"].tasks.items():
        table = top_feature_table(effects, task, info["selected"], revisions)
        if table.empty:
            continue
        pairs = [c for c in table.columns if c.startswith("relie_pair/")]
        head = ["feature", "group", *[f"RelIE {r}" for r in revisions], *[c.split("/", 1)[1] for c in pairs]]
        lines += ["", f"### {task}", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for _, row in table.iterrows():
            values = [str(int(row["feature"])), str(row["group"])]
            values += [_fmt(float(row[f"relie/{r}"])) for r in revisions] + [pair_cell(row, c) for c in pairs]
            lines.append("| " + " | ".join(values) + " |")
    return lines


def parent_metrics(o: RunOutcome) -> dict[str, float]:
    """The headline numbers as parent-run metrics, so the experiment table compares checkpoint sets."""
    s = summary_json(o)
    out = {metric_name(m, ck["revision"]): ck[m] for ck in s["checkpoints"] for m in ("fve", "delta_ce")}
    out.update(l0=s["l0"], dead_latents=s["dead_latents"])
    out.update({metric_name("ablation_rho", t): i["ablation_rho"] for t, i in s["tasks"].items()})
    return {k: float(v) for k, v in out.items() if v is not None}


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)
