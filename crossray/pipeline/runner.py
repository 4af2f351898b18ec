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
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from crossray.checkpoints import Family, resolve_family
from crossray.config import Config, ExtractConfig, TrainConfig, resolve_train
from crossray.extract import Manifest
from crossray.mlflow_model import log_crosscoder
from crossray.pipeline import inputs as I
from crossray.pipeline import stages as S
from crossray.pipeline.stages import RunOutcome
from crossray.pipeline.summary import parent_metrics, summary_markdown
from crossray.schema import shallow, to_dict
from crossray.store import load_crosscoder, metric_name, run_folder, write_json_atomic
from crossray.tracking import Tracker, flat_params

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOutput:
    crosscoder: Path
    history: list[dict]
    """Every metrics row of the run (rank 0's, every `metrics_every` steps)."""
    final: dict
    stream_position: dict | None = None
    """Stream mode: the rows trained per stream item at the end (`crossray.position`)."""


class Backend(Protocol):
    """Runs the heavy work: library functions next to the models, extraction, training, attribution."""

    def map(self, fn: Callable, args: list[tuple]) -> list: ...

    def extract(self, cfg: ExtractConfig, out: Path) -> Manifest: ...

    def stream(self, cfg: ExtractConfig) -> Manifest:
        """What `extract` would record (key, hashes, norm factors, rows), with no shard written."""
        ...

    def train(self, cfg: TrainConfig, storage: Path, name: str, norm_factors: list[float],
              data: str | ExtractConfig) -> TrainOutput:
        """Fit on the shards in `data`, or (an ExtractConfig) on the extraction streamed into training."""
        ...

    def attribute(self, crosscoder: str, family: Family, tasks: list[str], out: Path, cfg) -> dict: ...

    def sequences(self, cfg: ExtractConfig, start: int, stop: int) -> np.ndarray:
        """Corpus sequences start..stop-1 as (n, seq_len) token ids (fewer at the corpus's end): the
        held-out ones for evaluation, the first ones for the context scan."""
        ...


class Pipeline:
    def __init__(self, cfg: Config, backend: Backend, config_name: str = ""):
        self.cfg, self.p, self.backend = cfg, cfg.pipeline, backend
        self.family = resolve_family(self.p.family, naming=self.p.naming, tokenizer=self.p.tokenizer)
        self.out = run_folder(self.p.out, self.p.name)
        self.tasks = I.task_files(self.p.tasks, self.family)
        self.config_name = config_name
        self.outcome = RunOutcome(self.p.name, self.family, self.p.layer, method=self.p.method)
        self.tracker: Tracker | None = None
        self.current: str | None = None
        """The stage running now (for error messages)."""
        self._plan: dict | None = None

    @property
    def plan(self) -> dict:
        """What this configuration will cost (`crossray.plan`); its mode is the extraction mode."""
        if self._plan is None:
            from crossray.plan import plan_for

            self._plan = plan_for(self.cfg)
        return self._plan

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
        self.current = name
        started = folder / "started.json"
        if folder.exists() and (not started.exists() or json.loads(started.read_text())["key"] != key):
            shutil.rmtree(folder)  # another key's work; a crash of this key keeps its partial work
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(started, {"key": key})
        with self.tracker.stage(name, key, system_metrics=name in ("extract", "train")) as run_id:
            result = body(folder)
            self.tracker.log_folder(folder, name)
        write_json_atomic(done, {"key": key, "result": S.to_json(result), "mlflow_run_id": run_id})
        o.results[name], o.status[name], self.current = result, "ran", None
        return result

    def validate(self) -> None:
        """Every input checked before any compute, Ray or MLflow run: the screened and pinned
        revisions exist, the checkpoint count is possible (an error, never a clamp), the layer exists
        in every checkpoint, every task loads with at least one usable example, a local corpus is
        there, and the output folder can be written. Raises ValueError naming the problem."""
        from crossray.checkpoints import CheckpointError
        from crossray.extract import check_same_width
        from crossray.models.layer import load_tokenizer
        from crossray.tasks import TaskError, load_tasks

        p, screened = self.p, self.screened_revisions()
        for rev in {*screened, *p.revisions}:
            self.family.location(rev)  # a missing revision names what exists
        if p.revisions and (missing := [r for r in p.revisions if r not in screened]):
            raise CheckpointError(f"pipeline.revisions {missing} are not among the screened {screened}")
        if not p.revisions and p.n_checkpoints > len(screened):
            raise CheckpointError(f"pipeline.n_checkpoints is {p.n_checkpoints} but only {len(screened)} "
                                  f"revisions are screened ({', '.join(screened)})")
        check_same_width(self.family, screened, p.layer)
        for task in load_tasks(self.tasks, load_tokenizer(self.family, screened[0])):
            if not task.examples:
                raise TaskError(f"task {task.name} ({task.source}): no example with single-token answers "
                                f"is left (skipped {dict(task.skipped)})")
        corpus = self.cfg.extract.corpus
        for source in [corpus.source] if corpus.source else [m.source for m in corpus.mixture]:
            if not source.startswith("toy") and source.startswith(("/", ".", "~")) \
                    and not Path(source).exists():
                raise ValueError(f"extract.corpus source {source} does not exist")
        existing = next(d for d in [self.out, *self.out.parents] if d.exists())
        if not os.access(existing, os.W_OK):
            raise ValueError(f"cannot write the run folder {self.out}: {existing} is not writable")
        from crossray.plan import check_fits, plan_text

        logger.info("%s", plan_text(self.plan))
        check_fits(self.plan, self.out)

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
            mlflow.log_dict(self.plan, "plan.json")
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out / "config.json", to_dict(self.cfg))  # live queries read the family
            k_screen = I.digest("screen", self.family.name, hashes, contents, p.layer, p.screen_examples,
                                p.score_dtype, "sentence curves")  # what the curves are (v2)
            self._stage("screen", k_screen, lambda f: self.screen(f, screened))
            k = I.digest("select", k_screen, p.n_checkpoints, p.revisions, "final kept")  # the rule (v2)
            selected = self._stage("select", k, lambda f: self.select(f, [hashes[r] for r in screened])
                                   ).revisions
            # the resolved mode, not the budget that chose it, is what the stage's output depends on
            extract_identity = {**to_dict(self.cfg.extract), "mode": self.plan["mode"], "max_disk_gb": None}
            k = I.digest("extract", [(r, hashes[r]) for r in selected], p.layer,
                         I.corpus_fingerprint(self.cfg.extract.corpus), extract_identity)
            ex = self._stage("extract", k, self.extract)
            mlflow.set_tags({"crossray.revisions": ",".join(selected),
                             "crossray.weight_hashes": ",".join(ex.weight_hashes),
                             "crossray.corpus_hash": ex.corpus_hash, "crossray.manifest": ex.manifest_key})
            k_train = I.digest("train", ex.manifest_key, self.cfg.train)
            self._stage("train", k_train, self.train)
            self._stage("evaluate", I.digest("evaluate", k_train, self.cfg.evaluate), self.evaluate)
            k = I.digest("attribute", k_train, contents, self.cfg.attribution)
            self._stage("attribute", k, self.attribute)
            k = I.digest("analyse", k, k_screen, o.keys["select"], self.cfg.analysis)
            self._stage("analyse", k, self.analyse)
            self.register()
            self.tracker.describe_parent(summary_markdown(o), parent_metrics(o), self.parent_params())
            mlflow.log_artifact(str(self.out / "analyse" / "report.html"))  # the findings, on the parent
        return o

    def register(self) -> None:
        """The trained crosscoder in the Model Registry, with its lineage."""
        o, launch = self.outcome, self.cfg.launch
        train, ex = o.results["train"], o.results["extract"]
        if not train.model_uri:  # trained by a crossray that did not log MLflow models yet
            logger.warning("the train stage in %s logged no MLflow model; change a train setting (or remove "
                           "the stage folder) to train and register one", self.out / "train")
            return
        cc = load_crosscoder(train.crosscoder).cfg
        tags = {"crossray.family": self.family.name, "crossray.layer": str(cc.layer),
                "crossray.revisions": ",".join(cc.revisions),
                "crossray.weight_hashes": ",".join(f"{r}:{h}" for r, h in zip(cc.revisions, cc.weight_hashes,
                                                                                strict=True)),
                "crossray.corpus_hash": ex.corpus_hash, "crossray.n_latents": str(cc.n_latents),
                "crossray.sparsity": _sparsity(self.cfg.train)}
        description = (f"{cc.n_checkpoints}-way {cc.activation} crosscoder over {self.family.name} "
                       f"{', '.join(cc.revisions)} at layer {cc.layer}: {cc.n_latents} latents, trained on "
                       f"{ex.token_count:,} tokens. predict(x) takes raw residual activations (rows, "
                       f"{cc.n_checkpoints}, {cc.d_model}) and returns feature activations (rows, "
                       f"{cc.n_latents}).")
        name = launch.register_name or f"crossray-{self.family.name}-{self.p.name}"
        o.registered = self.tracker.register(name, launch.alias, train.model_uri, tags, description)

    def parent_params(self) -> dict[str, str]:
        cc = self.cfg.train.crosscoder
        return {"family": self.family.name, "layer": str(self.p.layer),
                "revisions": ",".join(self.outcome.results["select"].revisions),
                "n_latents": str(cc.n_latents), "activation": cc.activation, "method": self.p.method}

    def log_tasks(self, context: str) -> None:
        for name, digest in I.task_contents(self.tasks).items():
            path = next((Path(t) / name for t in self.tasks if (Path(t) / name).is_file()), Path(name))
            source = f"toy:tasks/{path.name}" if self.p.tasks == ("toy",) else str(path)
            rows = sum(1 for line in path.open() if line.strip()) if path.is_file() else None
            self.tracker.log_dataset(path.stem, source, digest, {"rows": rows}, context)  # type: ignore[union-attr]

    # -- stages ------------------------------------------------------------------------------------
    def screen(self, folder: Path, revisions: list[str]) -> S.ScreenResult:
        """Accuracy and activations of every screened revision (one unit of work each)."""
        import mlflow

        from crossray.store import write_tables

        texts = S.screen_texts(self.family, revisions[0], self.tasks, self.p.screen_examples)
        parts = self.backend.map(S.screen_revision, [(self.family, self.tasks, r, self.p.layer, texts,
                                                      self.p.score_dtype) for r in revisions])
        result, rows = S.combine_screen(revisions, parts)
        self.log_tasks("screening")
        for task, acc in result.accuracy.items():  # step = position in the screened revision list
            for i, (value, prefix) in enumerate(zip(acc, result.prefix_accuracy[task], strict=True)):
                mlflow.log_metrics({f"accuracy/{task}": value, f"prefix_accuracy/{task}": prefix}, step=i)
        write_tables(folder / "tables", {"accuracy": rows}, {"similarity.json": result.similarity})
        return result

    def select(self, folder: Path, hashes: list[str]) -> S.SelectResult:
        import mlflow

        result = S.select(self.outcome.results["screen"], self.p, hashes)
        mlflow.log_params({"revisions": ",".join(result.revisions)})
        mlflow.set_tag("crossray.selection_reasons", " | ".join(result.reasons))
        return result

    def extract(self, folder: Path) -> S.ExtractResult:
        import mlflow

        ecfg, mode = self.extract_config(), self.plan["mode"]
        mlflow.log_params(flat_params({"extract": to_dict(ecfg)}))
        mlflow.set_tag("crossray.extract_mode", mode)
        m = self.backend.stream(ecfg) if mode == "stream" else self.backend.extract(ecfg, folder / "acts")
        mlflow.log_metric("token_count", m.token_count)
        corpus = ecfg.corpus
        self.tracker.log_dataset(  # type: ignore[union-attr]
            f"corpus:{Path(corpus.source).name if corpus.source else 'mixture'}", corpus.label, m.corpus_hash,
            {"sequences": m.n_sequences, "seq_len": corpus.seq_len, "rows": m.token_count}, "training")
        mlflow.log_metrics({metric_name(f"norm_factor_{policy}", rev): factor
                            for policy, factors in m.norm_factors_by_policy.items()
                            for rev, factor in zip(ecfg.revisions, factors, strict=True)})
        return S.ExtractResult(str(folder / "acts") if mode == "parquet" else "", m.key, m.weight_hashes,
                               m.corpus_hash, m.norm_factors, m.d_model, m.n_sequences, m.token_count, mode,
                               m.norm_factors_by_policy)

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
                                 ex.norm_factors, ex.acts if ex.mode == "parquet" else self.extract_config())
        self.tracker.log_history(out.history)  # type: ignore[union-attr]
        if out.stream_position is not None:  # what a restore re-trained, for the record
            write_json_atomic(folder / "stream_position.json", out.stream_position)
            mlflow.log_metrics({f"stream/{k}": out.stream_position[k]
                                for k in ("rows", "duplicate_rows", "restores")})
        shutil.copytree(out.crosscoder, folder / "crosscoder", dirs_exist_ok=True)
        shutil.rmtree(folder / "ray", ignore_errors=True)  # checkpoints are not needed once done
        model = log_crosscoder(folder / "crosscoder")
        return S.TrainResult(str(folder / "crosscoder"), out.final, model.model_uri)

    def evaluate(self, folder: Path) -> S.EvaluateResult:
        import mlflow

        res, ecfg = self.outcome.results, self.extract_config()
        n_train = res["extract"].n_sequences
        held_out = self.backend.sequences(ecfg, n_train, n_train + self.cfg.evaluate.eval_sequences)
        [result] = self.backend.map(S.evaluate, [(ecfg, res["train"].crosscoder, held_out,
                                                  self.cfg.evaluate)])
        mlflow.log_metrics(result.metrics)
        write_json_atomic(folder / "metrics.json", result.metrics)
        return result

    def attribute(self, folder: Path) -> S.AttributeResult:
        import mlflow

        mlflow.log_params(flat_params({"attribution": to_dict(self.cfg.attribution)}))
        self.log_tasks("attribution")
        summary = self.backend.attribute(self.outcome.results["train"].crosscoder, self.family, self.tasks,
                                         folder / "effects", self.cfg.attribution)
        for task, info in summary["tasks"].items():
            if "ablation" in info:  # both forms, named as the parent run names them
                ablation = info["ablation"]
                mlflow.log_metrics({metric_name("ablation_rho", task): ablation["mean_rho_relie"],
                                    metric_name("ablation_rho_2way", task): ablation["mean_pair_rho_relie"]})
        return S.AttributeResult(str(folder / "effects"), summary["tasks"])

    def analyse(self, folder: Path) -> S.AnalyseResult:
        res = self.outcome.results
        revisions = ", ".join(res["select"].revisions)
        title = (f"{self.p.name}: {self.family.name} at layer {self.p.layer}, {revisions} "
                 f"({self.p.method} method)")
        ecfg, cfg = self.extract_config(), self.cfg.analysis
        tokens = self.backend.sequences(ecfg, 0, min(cfg.context_sequences, res["extract"].n_sequences))
        [contexts] = self.backend.map(S.top_contexts, [(res["train"].crosscoder, res["extract"], ecfg, cfg,
                                                        tokens)])  # next to the models (stream: re-extracts)
        return S.analyse(folder, res["screen"], res["select"], res["train"], res["attribute"], contexts,
                         title)


def _sparsity(train) -> str:
    cc = train.crosscoder
    match cc.activation:
        case "batchtopk":
            return f"batchtopk k={cc.k}"
        case "jumprelu":
            return f"jumprelu l0_coeff={train.l1_coeff}"
        case other:
            return f"{other} l1_coeff={train.l1_coeff}"
