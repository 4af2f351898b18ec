"""The findings report of a run: one self-contained HTML page (plots inlined), written by the analyse
stage and logged to MLflow, whose artifact view shows it.

Per task: the accuracy curve with the crosscoded checkpoints, the top features by |IE| with their IE,
RelIE (one-vs-all and pairwise), group and trajectory, each feature's top-activating contexts through
each checkpoint's encoder, and the ablation check; first, why these checkpoints were selected.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from crossray.store import all_zero_column, column, suffixes

if TYPE_CHECKING:
    from crossray.attribution import AblationCheck, TaskSummary

STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#f3f3f3}td.l{text-align:left}mark{background:#ffd54f}.ctx{font-family:monospace;font-size:12px}
h2{border-bottom:2px solid #444;margin-top:2em}img{max-width:100%}"""


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _context(row) -> str:
    tokens = [html.escape(t) for t in row["tokens"]]
    tokens[row["target"]] = f"<mark>{tokens[row['target']]}</mark>"
    return "".join(tokens)


def _fmt(x) -> str:
    return "–" if x is None or x != x else f"{x:.3f}"


def pair_cell(row, name: str) -> str:
    """A pairwise share as a table shows it: `0/0` where the pair summed to 0 (its share 0.5 is a
    convention, not a measurement; method.md §16.6)."""
    return "0/0" if bool(row.get(all_zero_column(name), False)) else _fmt(row[name])


def top_feature_table(effects: pd.DataFrame, task: str, selected: Sequence[int], revisions: Sequence[str],
                      k: int = 8) -> pd.DataFrame:
    """A task's selected features with the largest |IE| at any checkpoint, one row each: group, IE and
    RelIE per checkpoint (`ie/<rev>`, `relie/<rev>`) and pairwise RelIE (`relie_pair/<a>-<b>`, with
    its 0/0 flag `relie_pair_all_zero/<a>-<b>`)."""
    sub = effects[(effects.task == task) & effects.feature.isin(list(selected))]
    if sub.empty:
        return pd.DataFrame()
    per = sub.drop_duplicates("feature").set_index("feature")
    wide = sub.pivot(index="feature", columns="checkpoint", values=["ie", "relie"])
    table = pd.DataFrame({"feature": wide.index, "group": per.loc[wide.index, "group"].to_numpy()})
    for rev in revisions:
        table[column("ie", rev)] = wide["ie"][rev].to_numpy()
        table[column("relie", rev)] = wide["relie"][rev].to_numpy()
    for pair in suffixes(sub.columns, "relie_pair"):
        name = column("relie_pair", pair)
        for c in (name, all_zero_column(name)):
            if c in per.columns:
                table[c] = per.loc[wide.index, c].to_numpy()
    strength = table[[column("ie", r) for r in revisions]].abs().max(axis=1)
    return table.loc[strength.sort_values(ascending=False).index[:k]].reset_index(drop=True)


def feature_table(top: pd.DataFrame, features: pd.DataFrame, contexts: pd.DataFrame,
                  revisions: Sequence[str]) -> str:
    """Rows: feature, group, trajectory, IE and RelIE per checkpoint, pairwise RelIE, and the top
    context through each checkpoint's encoder."""
    pairs = suffixes(top.columns, "relie_pair")
    head = ["feature", "group (RelIE)", "trajectory", *[f"IE {r}" for r in revisions],
            *[f"RelIE {r}" for r in revisions], *pairs,
            *[f"top context via {r}" for r in revisions]]
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    trajectory = features.set_index("feature")["trajectory"]
    for _, row in top.iterrows():
        f = int(row["feature"])
        cells = [f"<td>#{f}</td>", f'<td class="l">{html.escape(str(row["group"]))}</td>',
                 f'<td class="l">{html.escape(str(trajectory.get(f, "")))}</td>']
        cells += [f"<td>{_fmt(row[column('ie', r)])}</td>" for r in revisions]
        cells += [f"<td>{_fmt(row[column('relie', r)])}</td>" for r in revisions]
        cells += [f"<td>{pair_cell(row, column('relie_pair', p))}</td>" for p in pairs]
        for r in revisions:
            best = contexts[(contexts.feature == f) & (contexts.view == r)].sort_values("rank").head(1)
            cells.append(f'<td class="l ctx">{_context(best.iloc[0]) if len(best) else ""}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out + ["</table>"])


def write_report(path: Path, title: str, reasons: Sequence[str], revisions: Sequence[str],
                 tasks: dict[str, TaskSummary], tops: dict[str, pd.DataFrame], features: pd.DataFrame,
                 contexts: pd.DataFrame, plots: Path) -> Path:
    """report.html: selection reasons, then per task its plots, feature table and ablation check."""
    parts = [f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><style>{STYLE}</style>",
             f"<h1>{html.escape(title)}</h1>", "<h2>Checkpoints</h2><ul>",
             *[f"<li>{html.escape(r)}</li>" for r in reasons], "</ul>"]
    if (plots / "accuracy_curves.png").exists():
        parts.append(_img(plots / "accuracy_curves.png"))
    for task, info in tasks.items():
        parts.append(f'<h2 id="{html.escape(task)}">{html.escape(task)}</h2>')
        baseline = html.escape(str(info.baseline))
        parts.append(f"<p>{info.examples} examples; IG baseline {baseline}; {len(info.selected)} "
                     "features selected (top-k by |IE| at any checkpoint).</p>")
        for name in (f"ie_evolution_{task}.png", f"relie_{task}.png"):
            if (plots / name).exists():
                parts.append(_img(plots / name))
        if task in tops and not tops[task].empty:
            parts.append(feature_table(tops[task], features, contexts, revisions))
        if info.ablation is not None:
            parts.append(_ablation_paragraph(info.ablation, revisions))
    path.write_text("\n".join(parts))
    return path


def _ablation_paragraph(ablation: AblationCheck, revisions: Sequence[str]) -> str:
    """The ablation check in both forms: per checkpoint (N-way) and per pair (the paper's 2-way rho)."""
    rhos = ", ".join(f"{r} {_fmt(v)}" for r, v in zip(revisions, ablation.rho_relie, strict=True))
    text = ("<p>Ablation check: Spearman ρ between each checkpoint's share of the zero-ablation effect "
            f"and RelIE: {rhos} (mean {_fmt(ablation.mean_rho_relie)}); against RelDec: mean "
            f"{_fmt(ablation.mean_rho_reldec)}.")
    if ablation.pairs:  # runs before the pairwise form have none
        each = ", ".join(f"{html.escape(p)} {_fmt(v['rho_relie'])}" for p, v in ablation.pairs.items())
        text += (f" Per pair, the paper's 2-way ρ (|Δ<sub>b</sub>|/|Δ<sub>a</sub>| against b's share "
                 f"of a + b): {each} (mean {_fmt(ablation.mean_pair_rho_relie)}; against RelDec: "
                 f"mean {_fmt(ablation.mean_pair_rho_reldec)}).")
    return text + "</p>"
