"""A finished pipeline run's results, loaded for queries: what the Serve API answers from.

A run is found by its pipeline folder (`<out>/<name>`), its MLflow parent run id, or a registered
crosscoder `models:/<name>@<alias>` (or `models:/<name>/<version>`), whose source run leads to the
parent. From MLflow only the stage artifacts the queries read are downloaded (the tables, the
evaluation metrics and the crosscoder's config, not its weights), into a cache folder that mirrors
the pipeline folder, so both ways end in `load_folder`.

`RunIndex` answers the queries with precomputed arrays: a feature card, features ranked by RelIE or
|IE| for a task at a checkpoint with filters and pagination, accuracy curves, the run's summary.
Values that are not finite become None, so every answer is valid JSON.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from crossray.store import CONFIG, WEIGHTS, RunLayout, all_zero_column, column, suffixes, table


def stage_files(layout: RunLayout) -> dict[str, Path]:
    """Per stage, the file or folder of it that the queries read (what is downloaded from MLflow)."""
    return {"screen": layout.accuracy, "evaluate": layout.eval_metrics, "attribute": layout.effects_folder,
            "analyse": layout.analyse_tables, "train": layout.crosscoder / CONFIG}


class ResultsError(ValueError):
    """A source that is not a usable pipeline run."""


class NotFound(LookupError):
    """An unknown run, feature, task or checkpoint; the message names it and what exists."""


@dataclass
class RunResults:
    id: str
    name: str
    family: str
    layer: int
    revisions: list[str]
    steps: list[int | None]
    tokens_seen: list[int | None]
    n_latents: int
    metrics: dict
    features: pd.DataFrame
    effects: pd.DataFrame
    accuracy: pd.DataFrame
    contexts: pd.DataFrame
    tasks: dict = field(default_factory=dict)
    """Per task: examples, skipped, selected features, ablation summary (from the attribute stage)."""
    registered: str | None = None


def _read(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise ResultsError(f"{path} is missing: not a finished crossray pipeline run")
    return pd.read_parquet(path)


def load_folder(folder: str | Path, run_id: str | None = None, name: str | None = None,
                registered: str | None = None) -> RunResults:
    """A run from its pipeline folder (the stage sub-folders that `jobs.pipeline` writes)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ResultsError(f"{folder} is not a folder")
    check_finished(folder)
    layout = RunLayout(folder)
    cfg_path = layout.crosscoder / CONFIG
    if not cfg_path.exists():
        raise ResultsError(f"{cfg_path} is missing: not a finished crossray pipeline run")
    cc = json.loads(cfg_path.read_text())["crosscoder"]
    revisions = list(cc["revisions"])
    accuracy = _read(layout.accuracy)
    by_rev = accuracy.drop_duplicates("revision").set_index("revision")

    def meta(field_name: str) -> list[int | None]:
        known = lambda r: r in by_rev.index and pd.notna(by_rev.at[r, field_name])  # noqa: E731
        return [int(by_rev.at[r, field_name]) if known(r) else None for r in revisions]

    summary = json.loads(layout.summary.read_text()) if layout.summary.exists() else {"tasks": {}}
    contexts = pd.read_parquet(layout.contexts) if layout.contexts.exists() else pd.DataFrame(
        columns=["feature", "view", "rank", "value", "seq", "pos", "target", "tokens", "scores"])
    metrics_path = layout.eval_metrics
    return RunResults(
        id=run_id or folder.name, name=name or folder.name,
        family=str(cc.get("family", "")), layer=int(cc.get("layer", -1)), revisions=revisions,
        steps=meta("step"), tokens_seen=meta("tokens_seen"), n_latents=int(cc["n_latents"]),
        metrics=json.loads(metrics_path.read_text()) if metrics_path.exists() else {},
        features=_read(layout.features), effects=_read(layout.effects),
        accuracy=accuracy, contexts=contexts, tasks=summary.get("tasks", {}), registered=registered)


def check_finished(folder: str | Path) -> None:
    """Refuse a pipeline folder that is not one finished run: a stage left unfinished (a re-run under
    way, or interrupted), or one made from another crosscoder or extraction than the one there now (the
    `after` keys its done file recorded). A folder without done files (tables alone) is not checked."""
    from crossray.store import DONE, STAGES

    layout = RunLayout(Path(folder))
    done = {s: json.loads(layout.done(s).read_text()) for s in STAGES if layout.done(s).exists()}
    if not done:
        return
    for stage in ("train", "evaluate", "attribute", "analyse"):
        if stage not in done:
            raise ResultsError(f"{folder}: stage {stage} is not finished (no {stage}/{DONE}: a re-run is "
                               f"under way or was interrupted): serve it once the run has finished")
    for stage, record in done.items():
        for up, key in record.get("after", {}).items():
            if up not in done:
                continue
            now = done[up]["result"].get("manifest_key") if up == "extract" else done[up]["key"]
            if now != key:
                raise ResultsError(f"{folder}: stage {stage} was made from another {up} (key {key}) than the "
                                   f"one there now ({now}): re-run the pipeline to finish it before serving")


def parent_run_id(ref: str) -> str:
    """The pipeline's parent run id for a run id (parent or stage child) or a `models:/` reference."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        if ref.startswith("models:/"):
            name, _, rest = ref.removeprefix("models:/").partition("@")
            if rest:
                version = client.get_model_version_by_alias(name, rest)
            else:
                name, _, number = name.partition("/")
                version = client.get_model_version(name, number)
            ref = version.run_id
        run = client.get_run(ref)
    except MlflowException as e:
        raise ResultsError(f"MLflow has no run or model {ref!r}: {e.message.splitlines()[0]}") from e
    if "crossray.stage" not in run.data.tags:  # a pipeline's (or a study set's) own run
        return run.info.run_id
    return run.data.tags.get("mlflow.parentRunId", run.info.run_id)


def mlflow_folder(ref: str, cache_dir: str | Path, weights: bool = False):
    """(folder, parent run): the newest finished stage runs under the parent, the files the queries
    read downloaded into `<cache_dir>/<parent id>` in the layout of a pipeline folder (plus the
    parent's `config.json`); `weights` adds the crosscoder's weights, which live queries need. The
    download holds the cache entry's lock (`crossray.cache`): replicas sharing the cache download once."""
    from mlflow import MlflowClient

    parent = parent_run_id(ref)
    client = MlflowClient()
    parent_run = client.get_run(parent)
    folder = Path(cache_dir) / parent
    layout = RunLayout(folder)
    files = stage_files(layout)
    stages: dict[str, str] = {}
    tags = parent_run.data.tags
    study = tags.get("mlflow.parentRunId") if "crossray.study" in tags else None
    for holder in [parent, *([study] if study else [])]:  # a study's set: its shared stages under the study
        for child in client.search_runs([parent_run.info.experiment_id],
                                        filter_string=f"tags.`mlflow.parentRunId` = '{holder}'",
                                        order_by=["attributes.start_time DESC"]):
            stage = child.data.tags.get("crossray.stage")
            if stage in files and stage not in stages and child.info.status == "FINISHED":
                stages[stage] = child.info.run_id
    missing = sorted(set(files) - set(stages))
    if missing:
        raise ResultsError(f"MLflow run {parent} has no finished stage run for {missing}: "
                           "not a finished crossray pipeline run")
    wanted = [(stages[stage], layout.relative(path)) for stage, path in files.items()]
    wanted += [(parent, layout.relative(layout.config))]
    wanted += [(stages["train"], layout.relative(layout.crosscoder / WEIGHTS))] * weights
    if any(not (folder / path).exists() for _, path in wanted):
        from crossray.cache import entry_lock

        with entry_lock(folder):  # replicas sharing the cache: one downloads, the others reuse it
            _download([(run_id, path) for run_id, path in wanted if not (folder / path).exists()],
                      folder, Path(cache_dir) / f".{parent}")
    return folder, parent_run


def _download(todo: list[tuple[str, str]], folder: Path, tmp: Path) -> None:
    """Artifacts (run id, path) into a private folder, then each file moved into `folder` whole."""
    import shutil

    import mlflow

    shutil.rmtree(tmp, ignore_errors=True)  # (the lock holder's: left by a killed download)
    try:
        for run_id, path in todo:
            (tmp / path).parent.mkdir(parents=True, exist_ok=True)
            try:
                mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                    dst_path=str((tmp / path).parent))
            except Exception:
                if path != CONFIG:  # older runs have none: live queries fall back
                    raise
        for source in sorted(p for p in tmp.rglob("*") if p.is_file()):
            target = folder / source.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            source.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_mlflow(ref: str, cache_dir: str | Path) -> RunResults:
    """A run from MLflow, its artifacts cached (`mlflow_folder`)."""
    folder, parent_run = mlflow_folder(ref, cache_dir)
    return load_folder(folder, run_id=parent_run.info.run_id, name=parent_run.info.run_name or folder.name,
                       registered=parent_run.data.tags.get("crossray.registered_model"))


@dataclass
class StudyResults:
    """A finished study: its sets (each loaded as a run) and its comparison tables."""

    name: str
    revisions: list[str]
    sets: list[dict]
    """name, run (the id its run is served under), revisions, status (done or failed)."""
    tables: dict[str, list[dict]]
    """timeline, new_features, matched (`crossray.study.compare`), values JSON-ready."""

    def info(self) -> dict:
        return {"study": self.name, "revisions": self.revisions, "sets": self.sets}

    def detail(self) -> dict:
        return {**self.info(), **self.tables}


def is_study_folder(source: str | Path) -> bool:
    return Path(source).is_dir() and RunLayout(source).study_summary.exists()


def load_study(folder: str | Path) -> tuple[StudyResults, list[RunResults]]:
    """A study folder: its finished sets as runs (id `<study>.<set>`) and its comparison tables."""
    layout = RunLayout(folder)
    summary = json.loads(layout.study_summary.read_text())
    name, sets, runs = summary["study"], [], []
    for set_name, s in summary["sets"].items():
        run_id = f"{name}.{set_name}"
        sets.append({"name": set_name, "run": run_id if s["status"] == "done" else None,
                     "revisions": s["revisions"], "status": s["status"]})
        if s["status"] == "done":
            runs.append(load_folder(layout.set_root(set_name), run_id=run_id, name=run_id,
                                    registered=s.get("registered")))
    tables = {}
    for kind in ("timeline", "new_features", "matched"):
        frame = _read(table(layout.study_tables, kind))
        tables[kind] = [{k: num(v) if isinstance(v, float) else v for k, v in row.items()}
                        for row in frame.astype(object).where(frame.notna(), None).to_dict("records")]
    return StudyResults(name, summary["revisions"], sets, tables), runs


def load_run(source: str, cache_dir: str | Path) -> RunResults:
    """A folder path if one exists, else an MLflow run id or `models:/` reference."""
    if Path(source).is_dir():
        return load_folder(source)
    if not (source.startswith("models:/") or re.fullmatch(r"[0-9a-f]{32}", source)):
        raise ResultsError(f"{source!r} is neither a pipeline folder, an MLflow run id nor a models:/ URI")
    return load_mlflow(source, cache_dir)


# -- queries ---------------------------------------------------------------------------------------

def num(x) -> float | None:
    """A float for JSON: NaN and infinities become null."""
    x = float(x)
    return x if math.isfinite(x) else None


def nums(xs) -> list[float | None]:
    return [num(x) for x in xs]


def _pairs(names: list[str], values, all_zero=None) -> list[dict]:
    """Pairwise shares; `all_zero` marks pairs that summed to 0 (share 0.5 by convention)."""
    flags = [False] * len(names) if all_zero is None else all_zero
    return [{"pair": p, "share": num(v), "all_zero": bool(z)}
            for p, v, z in zip(names, values, flags, strict=True)]


class RunIndex:
    """Query answers for one run; arrays are precomputed so a query costs microseconds."""

    def __init__(self, run: RunResults):
        self.run = run
        revs, L = run.revisions, run.n_latents
        self.C = len(revs)
        f = run.features.set_index("feature").reindex(range(L))
        self.dec_norm_LC = f[[column("dec_norm", r) for r in revs]].to_numpy(float)
        self.reldec_LC = f[[column("reldec", r) for r in revs]].to_numpy(float)
        self.cos_cols = suffixes(f.columns, "cos")
        self.pair_cols = suffixes(f.columns, "reldec_pair")
        self.reldec_pair_LP = f[[column("reldec_pair", c) for c in self.pair_cols]].to_numpy(float)
        self.cos_LP = f[[column("cos", c) for c in self.cos_cols]].to_numpy(float)
        self.group_L = f["group"].fillna("").to_numpy(str)
        self.trajectory_L = f["trajectory"].fillna("").to_numpy(str)
        self.tasks: dict[str, dict[str, np.ndarray]] = {}
        for task, sub in run.effects.groupby("task", sort=True):
            wide = sub.pivot_table(index="feature", columns="checkpoint_index", values=["ie", "relie"],
                                   aggfunc="first").reindex(range(L))
            groups = sub.drop_duplicates("feature").set_index("feature")["group"].reindex(range(L))
            selected = np.zeros(L, bool)
            selected[[i for i in run.tasks.get(str(task), {}).get("selected", []) if 0 <= i < L]] = True
            pair_names = suffixes(sub.columns, "relie_pair")
            pair_cols = [column("relie_pair", p) for p in pair_names]
            per_feature = sub.drop_duplicates("feature").set_index("feature")
            pairs = per_feature[pair_cols].reindex(range(L))
            flag_cols = [all_zero_column(c) for c in pair_cols]
            flags = per_feature.reindex(columns=flag_cols).reindex(range(L)).fillna(False).to_numpy(bool)
            self.tasks[str(task)] = {"ie": wide["ie"].reindex(columns=range(self.C)).to_numpy(float),
                                     "pairs": pair_names,
                                     "relie_pairs": pairs.to_numpy(float), "pairs_all_zero": flags,
                                     "relie": wide["relie"].reindex(columns=range(self.C)).to_numpy(float),
                                     "group": groups.fillna("").to_numpy(str), "selected": selected}
        self.contexts = {int(k): g for k, g in run.contexts.groupby("feature")}
        self._order: dict[tuple[str, int, str], np.ndarray] = {}

    # -- names -------------------------------------------------------------------------------------
    def checkpoint(self, value: str | int) -> int:
        """A checkpoint by revision name, or by index (negative counts from the end)."""
        revs = self.run.revisions
        if isinstance(value, str) and value in revs:
            return revs.index(value)
        try:
            i = int(value)
        except (TypeError, ValueError):
            i = None
        if i is not None and -self.C <= i < self.C:
            return i % self.C
        raise NotFound(f"unknown checkpoint {value!r}: run {self.run.id} has {revs} "
                       f"(or an index 0..{self.C - 1})")

    def task(self, name: str) -> dict[str, np.ndarray]:
        if name not in self.tasks:
            raise NotFound(f"unknown task {name!r}: run {self.run.id} has {sorted(self.tasks)}")
        return self.tasks[name]

    def feature_id(self, feature: int) -> int:
        if not 0 <= feature < self.run.n_latents:
            raise NotFound(f"feature {feature} out of range: run {self.run.id} has features "
                           f"0..{self.run.n_latents - 1}")
        return feature

    # -- answers -----------------------------------------------------------------------------------
    def info(self) -> dict:
        r = self.run
        per_checkpoint = [{"index": c, "revision": rev, "step": r.steps[c], "tokens_seen": r.tokens_seen[c],
                           "fve": num(r.metrics.get(column("fve", rev), "nan")),
                           "delta_ce": num(r.metrics.get(column("delta_ce", rev), "nan")),
                           "ce_recovered": num(r.metrics.get(column("ce_recovered", rev), "nan"))}
                          for c, rev in enumerate(r.revisions)]
        tasks = [{"name": t, "examples": int(r.tasks.get(t, {}).get("examples", 0)),
                  "selected": len(r.tasks.get(t, {}).get("selected", [])),
                  "ablation_rho_relie": num(r.tasks.get(t, {}).get("ablation", {}).get("mean_rho_relie",
                                                                                        "nan"))}
                 for t in self.tasks]
        return {"id": r.id, "name": r.name, "family": r.family, "layer": r.layer, "n_latents": r.n_latents,
                "checkpoints": per_checkpoint, "tasks": tasks, "registered_model": r.registered,
                "metrics": {k: num(r.metrics[k]) for k in ("fve", "l0", "dead") if k in r.metrics}}

    def card(self, feature: int, contexts: bool = True) -> dict:
        i = self.feature_id(feature)
        revs = self.run.revisions
        ctx: dict[str, list[dict]] = {}
        if contexts:
            ctx = {v: [] for v in ["joint", *revs]}
            rows = self.contexts.get(i)
            for row in rows.itertuples() if rows is not None else ():
                ctx.setdefault(str(row.view), []).append(
                    {"rank": int(row.rank), "value": num(row.value), "seq": int(row.seq),
                     "pos": int(row.pos), "target": int(row.target), "tokens": list(row.tokens),
                     "scores": nums(row.scores)})
        return {"run": self.run.id, "feature": i, "checkpoints": revs,
                "decoder_norm": nums(self.dec_norm_LC[i]), "relative_norm": nums(self.reldec_LC[i]),
                "relative_norm_pairs": _pairs(self.pair_cols, self.reldec_pair_LP[i]),
                "trajectory": str(self.trajectory_L[i]), "group": str(self.group_L[i]),
                "cosine": [{"pair": p, "value": num(v)} for p, v in zip(self.cos_cols, self.cos_LP[i],
                                                                         strict=True)],
                "effects": {t: {"ie": nums(a["ie"][i]), "relie": nums(a["relie"][i]),
                                "relie_pairs": _pairs(a["pairs"], a["relie_pairs"][i],
                                                      a["pairs_all_zero"][i]),
                                "group": str(a["group"][i])} for t, a in self.tasks.items()},
                "contexts": ctx}

    def ranking(self, task: str, checkpoint: str | int, by: str = "relie", trajectory: str | None = None,
                group: str | None = None, min_relie: float | None = None, min_abs_ie: float | None = None,
                selected: bool = False, offset: int = 0, limit: int = 50) -> dict:
        """Features for a task ranked by RelIE (or |IE|) at a checkpoint, descending, ties by id.

        `selected` keeps the features attribution selected for the task (the top-k by |IE| at some
        checkpoint, whose RelIE the paper reads); over all features, RelIE 1.0 also marks features
        with a tiny effect at one checkpoint only."""
        t, c = self.task(task), self.checkpoint(checkpoint)
        if by not in ("relie", "abs_ie"):
            raise ValueError(f"by must be 'relie' or 'abs_ie', not {by!r}")
        key = (task, c, by)
        if key not in self._order:
            score = t["relie"][:, c] if by == "relie" else np.abs(t["ie"][:, c])
            score = np.where(np.isfinite(score), score, -np.inf)
            self._order[key] = np.lexsort((np.arange(len(score)), -score))
        order = self._order[key]
        keep = np.ones(len(order), bool)
        if trajectory:
            keep &= self.trajectory_L[order] == trajectory
        if group:
            keep &= t["group"][order] == group
        if selected:
            keep &= t["selected"][order]
        if min_relie is not None:
            keep &= t["relie"][order, c] >= min_relie
        if min_abs_ie is not None:
            keep &= np.abs(t["ie"][order, c]) >= min_abs_ie
        hits = order[keep]
        page = hits[offset: offset + limit]
        items = [{"feature": int(i), "ie": num(t["ie"][i, c]), "relie": num(t["relie"][i, c]),
                  "relie_by_checkpoint": nums(t["relie"][i]), "ie_by_checkpoint": nums(t["ie"][i]),
                  "decoder_norm": nums(self.dec_norm_LC[i]), "trajectory": str(self.trajectory_L[i]),
                  "group": str(t["group"][i]), "selected": bool(t["selected"][i])} for i in page]
        return {"run": self.run.id, "task": task, "checkpoint": self.run.revisions[c], "checkpoint_index": c,
                "by": by, "total": int(len(hits)), "offset": offset, "limit": limit, "items": items}

    def accuracy(self, task: str | None = None) -> dict:
        """Accuracy per screened revision for each task, the crosscoded checkpoints marked."""
        acc = self.run.accuracy
        names = sorted(acc["task"].unique())
        if task is not None and task not in names:
            raise NotFound(f"unknown task {task!r}: run {self.run.id} has accuracy for {names}")
        curves = {}
        for name, sub in acc.groupby("task", sort=True):
            if task is not None and name != task:
                continue
            curves[str(name)] = [{"revision": str(r.revision),
                                  "step": None if pd.isna(r.step) else int(r.step),
                                  "tokens_seen": None if pd.isna(r.tokens_seen) else int(r.tokens_seen),
                                  "prefix_accuracy": num(r.prefix_accuracy),
                                  "sentence_accuracy": num(r.sentence_accuracy),
                                  "crosscoded": str(r.revision) in self.run.revisions}
                                 for r in sub.itertuples()]
        return {"run": self.run.id, "checkpoints": self.run.revisions, "tasks": curves}
