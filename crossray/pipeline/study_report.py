"""A study's comparison, written: tables (Parquet/CSV), timeline plots, `study.html`, and the study's
MLflow parent run (its description the timeline table, its metrics each set's headline numbers)."""

from __future__ import annotations

import html
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from crossray import plots
from crossray import study as ST
from crossray.checkpoints import Family
from crossray.pipeline.stages import RunOutcome
from crossray.pipeline.summary import summary_json
from crossray.store import SUMMARY, RunLayout, column, load_crosscoder, write_tables
from crossray.tracking import Tracker

logger = logging.getLogger(__name__)


@dataclass
class StudyOutcome:
    name: str
    revisions: list[str]
    """The union of the sets' revisions (what was extracted, once each)."""
    shared: RunOutcome
    """The shared stages (screen, select, extract)."""
    sets: dict[str, RunOutcome] = field(default_factory=dict)
    set_revisions: dict[str, list[str]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    """Sets that failed, with the error."""
    mlflow_run_id: str = ""
    comparison: dict[str, list[dict]] = field(default_factory=dict)


def set_tables(layout: RunLayout, name: str, revisions: list[str], tokens_seen: list[int | None],
               tasks: dict) -> ST.SetTables:
    """What the comparison reads of a finished set; of its crosscoder, the selected features' decoders."""
    selected = {t: list(info.selected) for t, info in tasks.items()}
    W_dec_LCD = load_crosscoder(layout.crosscoder).W_dec_LCD.detach()
    decoders = {f: W_dec_LCD[f].clone() for f in sorted({f for fs in selected.values() for f in fs})}
    return ST.SetTables(name, revisions, tokens_seen, pd.read_parquet(layout.effects),
                        pd.read_parquet(layout.features), selected, decoders)


def finish_study(layout: RunLayout, family: Family, tracker: Tracker, o: StudyOutcome) -> None:
    """Compare the finished sets, write the tables, plots and report, describe the study's run."""
    tables = []
    for name, outcome in o.sets.items():
        revisions = o.set_revisions[name]
        assert outcome.attribute is not None
        seen = [family.revision(r).tokens_seen for r in revisions]
        tables.append(set_tables(RunLayout(layout.set_root(name)), name, revisions, seen,
                                 outcome.attribute.tasks))
    o.comparison = ST.compare(tables)
    folder = layout.study_tables
    summary = study_summary(o)
    write_tables(folder, o.comparison, {SUMMARY: summary})
    for task in sorted({r["task"] for r in o.comparison["timeline"]}):
        plots.study_timeline(o.comparison["timeline"], o.revisions, task, layout.timeline_plot(task))
    write_report(layout, o, summary)
    tracker.log_folder(folder, "study")
    tracker.describe_parent(study_markdown(o, summary), study_metrics(summary),
                            {"sets": ",".join(o.set_revisions), "revisions": ",".join(o.revisions),
                             "method": o.shared.method})
    logger.info("%s", study_text(summary))


def study_markdown(o: StudyOutcome, summary: dict) -> str:
    """The study run's description: its sets, and per task the timeline table."""
    lines = [f"# Study {o.name}", "", f"Revisions extracted once each: {', '.join(o.revisions)}.", "",
             "| set | revisions | status | FVE per checkpoint |", "|---|---|---|---|"]
    for name, s in summary["sets"].items():
        fve = ", ".join(f"{r} {_fmt(v)}" for r, v in s.get("fve", {}).items()) or s.get("error", "")
        lines.append(f"| {name} | {', '.join(s['revisions'])} | {s['status']} | {fve} |")
    rows = pd.DataFrame(o.comparison.get("timeline", []))
    for task, sub in rows.groupby("task", sort=True) if len(rows) else []:
        lines += ["", f"## {task}: IE mass per checkpoint (timeline)", "",
                  "| set | revision | tokens seen | IE mass | top IE mass | top specific (RelIE) | "
                  "top shared (RelDec) |", "|---|---|---|---|---|---|---|"]
        for _, r in sub.iterrows():
            lines.append(f"| {r['set']} | {r['revision']} | {r['tokens_seen']} | {_fmt(r['ie_mass'])} | "
                         f"{_fmt(r['top_ie_mass'])} | {r['top_specific_by_relie']} | "
                         f"{r['top_shared_by_reldec']} |")
    return "\n".join(lines)


def write_report(layout: RunLayout, o: StudyOutcome, summary: dict) -> Path:
    """study.html: the sets with links to their reports, then per task the timeline plot and tables."""
    from crossray.report import STYLE, _img

    path = layout.study_report
    parts = ["<!doctype html><meta charset='utf-8'>", f"<title>{html.escape(o.name)}: study</title>",
             f"<style>{STYLE}</style>", f"<h1>Study {html.escape(o.name)}</h1>",
             f"<p>Revisions extracted once each: {html.escape(', '.join(o.revisions))}.</p>",
             "<h2>Checkpoint sets</h2><ul>"]
    for name, s in summary["sets"].items():
        link = Path(os.path.relpath(RunLayout(layout.set_root(name)).report, path.parent))
        state = "" if s["status"] == "done" else f" — failed: {html.escape(s.get('error', ''))}"
        parts.append(f'<li><a href="{html.escape(link.as_posix())}">{html.escape(name)}</a> '
                     f"({html.escape(', '.join(s['revisions']))}){state}</li>")
    parts.append("</ul>")
    frames = {k: pd.DataFrame(v) for k, v in o.comparison.items()}
    for task in sorted(frames["timeline"].task.unique()) if len(frames["timeline"]) else []:
        parts.append(f'<h2 id="{html.escape(task)}">{html.escape(task)}</h2>')
        png = layout.timeline_plot(task)
        if png.exists():
            parts.append(_img(png))
        for name, caption in (("timeline", "IE mass and top features per checkpoint"),
                              ("new_features", "share of a later checkpoint's IE from features new to it"),
                              ("matched", "top features matched by decoder cosine where sets share a "
                                          "checkpoint")):
            sub = frames[name]
            sub = sub[sub.task == task].drop(columns="task") if len(sub) else sub
            if len(sub):
                parts += [f"<h3>{caption}</h3>", sub.to_html(index=False, float_format=lambda x: f"{x:.3f}",
                                                               border=0)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path


def _fmt(x) -> str:
    return "–" if x is None or x != x else f"{x:.3f}" if isinstance(x, float) else str(x)


def study_summary(o: StudyOutcome) -> dict:
    """{"study", "mlflow_run_id", "revisions", "stages": {shared stage: status}, "devices": {shared stage:
    device}, "sets": {set: {"revisions", "status", "stages", "devices", "fve", "delta_ce", "tasks": {task:
    {"ablation_rho", ...}}}}}."""
    sets: dict[str, Any] = {}
    for name, revisions in o.set_revisions.items():
        if name in o.failed:
            sets[name] = {"revisions": revisions, "status": "failed", "error": o.failed[name]}
            continue
        s = summary_json(o.sets[name])
        sets[name] = {"revisions": revisions, "status": "done", "mlflow_run_id": s["mlflow_run_id"],
                      "registered": s["registered"],
                      "stages": {k: v for k, v in s["stages"].items() if v != "shared"},
                      "devices": {k: v for k, v in s["devices"].items() if s["stages"][k] != "shared"},
                      "fve": {ck["revision"]: ck["fve"] for ck in s["checkpoints"]},
                      "delta_ce": {ck["revision"]: ck["delta_ce"] for ck in s["checkpoints"]},
                      "l0": s["l0"], "dead_latents": s["dead_latents"], "tasks": s["tasks"]}
    return {"study": o.name, "method": o.shared.method, "mlflow_run_id": o.mlflow_run_id,
            "revisions": o.revisions,
            "stages": {k: o.shared.status.get(k, "not run") for k in ("screen", "select", "extract")},
            "devices": {k: v for k, v in o.shared.devices.items() if k in ("screen", "select", "extract")},
            "sets": sets, "failed": sorted(o.failed)}


def study_metrics(summary: dict) -> dict[str, float]:
    """The headline per set as the study run's metrics: `fve/<set>/<rev>`, `ablation_rho/<set>/<task>`."""
    out = {}
    for name, s in summary["sets"].items():
        for rev, value in s.get("fve", {}).items():
            out[column("fve", f"{name}/{rev}")] = value
        for task, info in s.get("tasks", {}).items():
            out[column("ablation_rho", f"{name}/{task}")] = info["ablation_rho"]
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}


def study_text(summary: dict) -> str:
    lines = [f"study {summary['study']} ({summary['method']} method): {len(summary['sets'])} sets over "
             f"{', '.join(summary['revisions'])}; shared stages: "
             + ", ".join(f"{k} {v}" for k, v in summary["stages"].items())]
    for name, s in summary["sets"].items():
        if s["status"] == "failed":
            lines.append(f"  {name}: FAILED ({s['error']})")
            continue
        fve = ", ".join(f"{r} {v:.3f}" if v is not None else f"{r} –" for r, v in s["fve"].items())
        rho = ", ".join(f"{t} {i['ablation_rho']:.2f}" if i["ablation_rho"] is not None else f"{t} –"
                        for t, i in s["tasks"].items())
        lines.append(f"  {name}: FVE {fve}; ablation rho {rho}")
    return "\n".join(lines)

