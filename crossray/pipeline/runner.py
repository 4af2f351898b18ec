"""The pipeline for one checkpoint set: stages in order, each keyed by what it reads, skipped when done.

    screen -> select -> extract -> train -> evaluate -> attribute -> analyse

Each stage writes into `<out>/<name>/<stage>/` and ends with `done.json` holding its key (see
`inputs`), its result and the MLflow run that produced it; a stage whose key matches is reused, so a
re-run after a crash resumes at the first unfinished stage (training itself resumes from its last
Ray Train checkpoint: the run name is the stage key), and a changed setting re-runs only the stages
that read it. A stage folder holding another key's work is cleared before the stage runs.

Where the work runs is the `Backend`'s business (Ray in `jobs/pipeline.py`); this module never
imports Ray.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from crossray.checkpoints import Family, resolve_family
from crossray.config import Config, ExtractConfig, TrainConfig, resolve_train, to_dict
from crossray.extract import Manifest
from crossray.pipeline import inputs as I
from crossray.pipeline import stages as S
from crossray.schema import shallow
from crossray.store import metric_name, write_json_atomic
from crossray.tracking import Tracker, flat_params

logger = logging.getLogger(__name__)
STAGES = ("screen", "select", "extract", "train", "evaluate", "attribute", "analyse")


@dataclass(frozen=True)
class TrainOutput:
    crosscoder: Path
    history: list[dict]
    """Every metrics row of the run (rank 0's, every `metrics_every` steps)."""
    final: dict


class Backend(Protocol):
    """Runs the heavy work: library functions next to the models, extraction, training, attribution."""

    def map(self, fn: Callable, args: list[tuple]) -> list: ...

    def extract(self, cfg: ExtractConfig, out: Path) -> Manifest: ...

    def train(self, cfg: TrainConfig, storage: Path, name: str, norm_factors: list[float],
              data: str) -> TrainOutput: ...

    def attribute(self, crosscoder: str, family: Family, tasks: list[str], out: Path, cfg) -> dict: ...


@dataclass
class RunOutcome:
    """What a pipeline run produced: every stage's result, how each stage went, the MLflow handles."""

    name: str
    family: Family
    layer: int
    results: dict[str, Any] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)
    """Per stage: "ran" or "reused"."""
    keys: dict[str, str] = field(default_factory=dict)
    mlflow_run_id: str = ""
    registered: dict | None = None


class Pipeline:
    def __init__(self, cfg: Config, backend: Backend, config_name: str = ""):
        self.cfg, self.p, self.backend = cfg, cfg.pipeline, backend
        self.family = resolve_family(self.p.family, naming=self.p.naming, tokenizer=self.p.tokenizer)
        self.out = (Path(self.p.out) / self.p.name).resolve()
        self.tasks = I.task_files(self.p.tasks, self.family)
        self.config_name = config_name
        self.outcome = RunOutcome(self.p.name, self.family, self.p.layer)
        self.tracker: Tracker | None = None

    # -- bookkeeping -------------------------------------------------------------------------------
    def _stage(self, name: str, key: str, body: Callable[[Path], Any]) -> Any:
        assert self.tracker is not None
        folder, o = self.out / name, self.outcome
        done = folder / "done.json"
        o.keys[name] = key
        if done.exists() and (record := json.loads(done.read_text())).get("key") == key:
            logger.info("stage %s: reused (key %s)", name, key)
            self.tracker.link(name, key, record.get("mlflow_run_id"))
            o.results[name], o.status[name] = S.from_json(name, record["result"]), "reused"
            return o.results[name]
        logger.info("stage %s: running (key %s)", name, key)
        started = folder / "started.json"
        if folder.exists() and (not started.exists() or json.loads(started.read_text())["key"] != key):
            shutil.rmtree(folder)  # another key's work; a crash of this key keeps its partial work
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(started, {"key": key})
        with self.tracker.stage(name, key) as run_id:
            result = body(folder)
            self.tracker.log_folder(folder, name)
        write_json_atomic(done, {"key": key, "result": S.to_json(result), "mlflow_run_id": run_id})
        o.results[name], o.status[name] = result, "ran"
        return result

    def parent_key(self) -> str:
        """The configuration's identity: every section but the launch settings."""
        c = self.cfg
        return I.digest(c.pipeline, c.extract, c.train, c.evaluate, c.attribution, c.analysis)

    def screened_revisions(self) -> list[str]:
        return list(self.p.screen_revisions) or self.family.available_revisions()

    def extract_config(self) -> ExtractConfig:
        return ExtractConfig(**shallow(self.cfg.extract), family=self.p.family, layer=self.p.layer,
                             revisions=tuple(self.outcome.results["select"].revisions),
                             naming=self.p.naming, tokenizer=self.p.tokenizer)

    # -- the run -----------------------------------------------------------------------------------
    def run(self) -> RunOutcome:
        import mlflow

        experiment = self.cfg.launch.experiment or f"crossray-{self.family.name}"
        self.tracker = Tracker(experiment, self.out.parent / "mlartifacts")
        p, o = self.p, self.outcome
        screened = self.screened_revisions()
        hashes = dict(zip(screened, I.weight_hashes(self.family, screened), strict=True))
        contents = I.task_contents(self.tasks)
        with self.tracker.parent(p.name, self.parent_key()) as o.mlflow_run_id:
            mlflow.set_tags({"crossray.family": self.family.name, "crossray.layer": str(p.layer),
                             "crossray.config": self.config_name})
            mlflow.log_dict(to_dict(self.cfg), "config.json")
            k_screen = I.digest("screen", self.family.name, hashes, contents, p.layer, p.screen_examples)
            self._stage("screen", k_screen, lambda f: self.screen(f, screened))
            k = I.digest("select", k_screen, p.n_checkpoints, p.revisions)
            selected = self._stage("select", k, self.select).revisions
            k = I.digest("extract", [(r, hashes[r]) for r in selected], p.layer,
                         I.corpus_fingerprint(self.cfg.extract.corpus), self.cfg.extract)
            ex = self._stage("extract", k, self.extract)
            mlflow.set_tags({"crossray.revisions": ",".join(selected),
                             "crossray.weight_hashes": ",".join(ex.weight_hashes),
                             "crossray.corpus_hash": ex.corpus_hash, "crossray.manifest": ex.manifest_key})
            k_train = I.digest("train", ex.manifest_key, self.cfg.train)
            self._stage("train", k_train, self.train)
            self._stage("evaluate", I.digest("evaluate", k_train, self.cfg.evaluate), self.evaluate)
            k = I.digest("attribute", k_train, contents, self.cfg.attribution)
            self._stage("attribute", k, self.attribute)
            self._stage("analyse", I.digest("analyse", k, k_screen, self.cfg.analysis), self.analyse)
            launch = self.cfg.launch
            name = launch.register_name or f"crossray-{self.family.name}-{p.name}"
            o.registered = self.tracker.register(name, launch.alias, k_train)
        return o

    # -- stages ------------------------------------------------------------------------------------
    def screen(self, folder: Path, revisions: list[str]) -> S.ScreenResult:
        """Accuracy and activations of every screened revision (one unit of work each)."""
        import mlflow

        from crossray.store import write_tables

        texts = S.screen_texts(self.family, revisions[0], self.tasks, self.p.screen_examples)
        parts = self.backend.map(S.screen_revision, [(self.family, self.tasks, r, self.p.layer, texts)
                                                     for r in revisions])
        result, rows = S.combine_screen(revisions, parts)
        for task, acc in result.accuracy.items():  # step = position in the screened revision list
            for i, value in enumerate(acc):
                mlflow.log_metric(f"accuracy/{task}", value, step=i)
        write_tables(folder / "tables", {"accuracy": rows}, {"similarity.json": result.similarity})
        return result

    def select(self, folder: Path) -> S.SelectResult:
        import mlflow

        result = S.select(self.outcome.results["screen"], self.p)
        mlflow.log_params({"revisions": ",".join(result.revisions)})
        mlflow.set_tag("crossray.selection_reasons", " | ".join(result.reasons))
        return result

    def extract(self, folder: Path) -> S.ExtractResult:
        import mlflow

        ecfg = self.extract_config()
        mlflow.log_params(flat_params({"extract": to_dict(ecfg)}))
        m = self.backend.extract(ecfg, folder / "acts")
        mlflow.log_metric("token_count", m.token_count)
        return S.ExtractResult(str(folder / "acts"), m.key, m.weight_hashes, m.corpus_hash, m.norm_factors,
                               m.d_model, m.n_sequences, m.token_count)

    def train_config(self) -> TrainConfig:
        ex, sel = self.outcome.results["extract"], self.outcome.results["select"]
        return resolve_train(self.cfg.train, len(sel.revisions), ex.d_model, revisions=tuple(sel.revisions),
                             weight_hashes=tuple(ex.weight_hashes), family=self.family.name,
                             layer=self.p.layer)

    def train(self, folder: Path) -> S.TrainResult:
        import mlflow

        cfg, ex = self.train_config(), self.outcome.results["extract"]
        mlflow.log_params(flat_params({"train": to_dict(cfg)}))
        out = self.backend.train(cfg, folder / "ray", f"train-{self.outcome.keys['train']}",
                                 ex.norm_factors, ex.acts)
        self.tracker.log_history(out.history)  # type: ignore[union-attr]
        shutil.copytree(out.crosscoder, folder / "crosscoder", dirs_exist_ok=True)
        shutil.rmtree(folder / "ray", ignore_errors=True)  # checkpoints are not needed once done
        return S.TrainResult(str(folder / "crosscoder"), out.final)

    def evaluate(self, folder: Path) -> S.EvaluateResult:
        import mlflow

        res = self.outcome.results
        [result] = self.backend.map(S.evaluate, [(self.extract_config(), res["train"].crosscoder,
                                                  res["extract"].n_sequences, self.cfg.evaluate)])
        mlflow.log_metrics(result.metrics)
        write_json_atomic(folder / "metrics.json", result.metrics)
        return result

    def attribute(self, folder: Path) -> S.AttributeResult:
        import mlflow

        mlflow.log_params(flat_params({"attribution": to_dict(self.cfg.attribution)}))
        summary = self.backend.attribute(self.outcome.results["train"].crosscoder, self.family, self.tasks,
                                         folder / "effects", self.cfg.attribution)
        for task, info in summary["tasks"].items():
            if "ablation" in info:
                mlflow.log_metric(metric_name("ablation_rho", task), info["ablation"]["mean_rho_relie"])
        return S.AttributeResult(str(folder / "effects"), summary["tasks"])

    def analyse(self, folder: Path) -> S.AnalyseResult:
        res = self.outcome.results
        return S.analyse(folder, res["screen"], res["extract"], res["train"], res["attribute"],
                         self.extract_config(), self.cfg.analysis)
