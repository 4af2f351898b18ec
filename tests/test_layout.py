"""The run layout is spelled in one place: no module but crossray/store.py names a stage folder, a
table or file of a run, or a `metric/<revision>` column pattern (issue 21's grep, as an AST scan)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from crossray.store import STAGES, RunLayout

ROOT = Path(__file__).resolve().parents[1]
RUN_FILES = {"done.json", "started.json", "summary.json", "report.html", "mlflow.db", "metrics.json",
             "stream_position.json", "tables", "effects", "acts", "crosscoder", "mlartifacts", "ray",
             *STAGES}
COLUMN = re.compile(r"(?:^|[\s\"'(\[])([a-z][a-z0-9_]*)/$")
"""The literal head of a column built in an f-string (`f"relie/{rev}"`) or matched by prefix."""


def _sources():
    for package in ("crossray", "jobs", "serve", "rayenv"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path != ROOT / "crossray" / "store.py":
                yield path


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) \
                and isinstance(node.right, ast.Constant) and node.right.value in RUN_FILES:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: path part {node.right.value!r}")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                node.value in ("done.json", "summary.json", "report.html", "mlflow.db")
                or (node.value.endswith((".parquet", ".csv")) and not node.value.startswith("."))):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: file name {node.value!r}")
        if isinstance(node, ast.JoinedStr):
            for part in node.values:
                if isinstance(part, ast.Constant) and (m := COLUMN.search(part.value)) \
                        and not part.value.endswith(("://", ":/")):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: column pattern {m.group(1)}/")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("startswith", "removeprefix", "replace") and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str) \
                and COLUMN.search(node.args[0].value):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: column prefix {node.args[0].value!r}")
    return found


def test_only_the_store_spells_the_run_layout():
    found = [v for path in _sources() for v in _violations(path)]
    assert not found, "spelled outside crossray/store.py:\n" + "\n".join(found)


def test_the_layout_names_every_stage_folder_and_refuses_others(tmp_path):
    layout = RunLayout(tmp_path / "run")
    assert [layout.stage(s).name for s in STAGES] == list(STAGES)
    assert layout.effects.parent == layout.effects_folder and layout.summary.parent == layout.effects_folder
    assert layout.tracking_db.parent == tmp_path
    with pytest.raises(ValueError, match="unknown stage 'trian'"):
        layout.stage("trian")
