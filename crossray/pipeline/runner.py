"""The pipeline for one checkpoint set: the stages of `graph` in order, each keyed by what it reads,
skipped when done.

Each stage writes into its folder of the run layout (`crossray.store.RunLayout`) and ends with its
`done` file holding its key, its result and the MLflow run that produced it; a stage whose key matches
is reused, so a re-run after a crash resumes at the first unfinished stage (training itself resumes
from its last Ray Train checkpoint: the run name is the stage key), and a changed setting re-runs only
the stages that read it. A stage folder holding another key's work is cleared before the stage runs.

The configuration is resolved once (`ResolvedRun`: the family, tasks, screened revisions, extraction
mode, tracking URI, MLflow experiment) and the stages read that; where the work runs is the
`Backend`'s business (Ray in `jobs/pipeline.py`); this module never imports Ray.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from crossray.checkpoints import Family, resolve_family
from crossray.config import Config
from crossray.pipeline import graph as G
from crossray.pipeline import inputs as I
from crossray.pipeline import stages as S
from crossray.pipeline.graph import Backend
from crossray.pipeline.stages import ExtractMode, RunOutcome
from crossray.pipeline.summary import parent_metrics, summary_markdown
from crossray.schema import to_dict
from crossray.store import RunLayout, load_crosscoder, write_json_atomic
from crossray.tracking import Tracker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedRun:
    """A configuration resolved once, for every stage to read: nothing downstream re-decides."""

    name: str
    method: str
    family: Family
    layout: RunLayout
    tasks: G.TaskSet
    screened: tuple[str, ...]
    """The revisions screened: the configured ones, else every revision the family has."""
    extract_mode: ExtractMode
    plan: dict
    """What the configuration will cost (`crossray.plan`); its mode chose `extract_mode`."""
    experiment: str
    tracking_uri: str | None
    """None: MLflow's default (the process's tracking URI)."""


def resolve(cfg: Config, family: Family, layout: RunLayout, tracking_uri: str | None = None) -> ResolvedRun:
    """`family` is `cfg.pipeline.family` resolved (`checkpoints.resolve_family`), `layout` the run folder."""
    from crossray.plan import plan_for

    p = cfg.pipeline
    plan = plan_for(cfg)  # (a study's: its union extraction's mode)
    return ResolvedRun(p.name, p.method, family, layout, G.TaskSet.of(p.tasks, family),
                       tuple(p.screen_revisions) or tuple(family.available_revisions()), plan["mode"], plan,
                       cfg.launch.experiment or f"crossray-{family.name}", tracking_uri)


class Pipeline:
    def __init__(self, cfg: Config, backend: Backend, config_name: str = "", tracking_uri: str | None = None,
                 layout: RunLayout | None = None, family: Family | None = None):
        self.cfg, self.p, self.backend = cfg, cfg.pipeline, backend
        self.config_name, self.tracking_uri = config_name, tracking_uri
        self.family = family or resolve_family(self.p.family, naming=self.p.naming,
                                               tokenizer=self.p.tokenizer)
        self.layout = layout or RunLayout.of(self.p.out, self.p.name)
        self.out = self.layout.root
        self.outcome = RunOutcome(self.p.name, self.family, self.p.layer, method=self.p.method)
        self.tracker: Tracker | None = None
        self.current: str | None = None
        """The stage running now (for error messages)."""

    @cached_property
    def resolved(self) -> ResolvedRun:
        return resolve(self.cfg, self.family, self.layout, self.tracking_uri)

    # -- bookkeeping -------------------------------------------------------------------------------
    def _stage(self, name: str, **inputs: Any) -> tuple[str, Any]:
        """Run stage `name` on `inputs` (or reuse its finished work under the same key): (key, result)."""
        assert self.tracker is not None
        stage, layout, o = G.STAGE[name], self.layout, self.outcome
        key = G.stage_key(stage, inputs)
        o.keys[name] = key
        done, started, folder = layout.done(name), layout.started(name), layout.stage(name)
        if done.exists() and (record := json.loads(done.read_text())).get("key") == key:
            logger.info("stage %s: reused (key %s)", name, key)
            self.tracker.link(name, key, record.get("mlflow_run_id"))
            result = S.from_json(name, record["result"])
            o.set(name, result, "reused")
            o.devices[name] = record.get("device", "unrecorded")  # where it ran (before devices were kept)
            return key, result
        logger.info("stage %s: running (key %s)", name, key)
        self.current = name
        if folder.exists() and (not started.exists() or json.loads(started.read_text())["key"] != key):
            shutil.rmtree(folder)  # another key's work; a crash of this key keeps its partial work
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(started, {"key": key})
        with self.tracker.stage(name, key, system_metrics=stage.system_metrics) as run_id:
            run = G.StageRun(self.backend, self.tracker, layout, key, run_id)
            result = stage.fn(run, **inputs)
            device = ",".join(sorted(run.devices)) or "cpu"  # none recorded: the driver's work
            self.tracker.set_tags({"crossray.device": device})
            self.tracker.log_folder(folder, name)
        write_json_atomic(done, {"key": key, "result": S.to_json(result), "mlflow_run_id": run_id,
                                 "device": device, "after": _after(inputs)})
        o.set(name, result, "ran")
        o.devices[name] = device
        self.current = None
        return key, result

    def validate(self) -> None:
        """Every input checked before any compute, Ray or MLflow run: the screened and pinned
        revisions exist, the checkpoint count is possible (an error, never a clamp), the layer exists
        in every checkpoint, every task loads with at least one usable example, a local corpus is
        there, and the output folder can be written. Raises ValueError naming the problem."""
        from crossray.checkpoints import CheckpointError
        from crossray.extract import check_same_width
        from crossray.models.layer import load_tokenizer
        from crossray.store import column
        from crossray.tasks import TaskError, load_tasks
        from crossray.tracking import metric_key_problem

        p = self.p
        screened = list(p.screen_revisions) or self.family.available_revisions()
        for rev in {*screened, *p.revisions}:
            self.family.location(rev)  # a missing revision names what exists
        if p.revisions and (missing := [r for r in p.revisions if r not in screened]):
            raise CheckpointError(f"pipeline.revisions {missing} are not among the screened {screened}")
        if not p.revisions and p.n_checkpoints > len(screened):
            raise CheckpointError(f"pipeline.n_checkpoints is {p.n_checkpoints} but only {len(screened)} "
                                  f"revisions are screened ({', '.join(screened)})")
        check_same_width(self.family, screened, p.layer)
        sources: dict[str, str] = {}
        for task in load_tasks(I.task_files(p.tasks, self.family), load_tokenizer(self.family, screened[0])):
            if task.name in sources:  # its rows would merge with the other's in every table
                raise TaskError(f"two tasks are named {task.name}: {sources[task.name]} and {task.source} "
                                f"(a task is named by its file): rename one")
            sources[task.name] = task.source
            if problem := metric_key_problem(column("accuracy", task.name)):
                raise TaskError(f"task {task.name} ({task.source}): its name cannot name MLflow metrics "
                                f"({problem}): rename the file")
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

        logger.info("%s", plan_text(self.resolved.plan))
        check_fits(self.resolved.plan, self.out)

    def parent_key(self) -> str:
        """The configuration's identity: every section but the launch settings."""
        c = self.cfg
        study = (c.study,) if c.study.sets else ()  # (a plain run's key is unchanged)
        return I.digest(c.pipeline, c.extract, c.train, c.evaluate, c.attribution, c.analysis, *study)

    # -- the run -----------------------------------------------------------------------------------
    def run(self) -> RunOutcome:
        r, o = self.resolved, self.outcome
        self.tracker = t = Tracker(r.experiment, r.layout.local_artifacts, r.tracking_uri)
        hashes = dict(zip(r.screened, I.weight_hashes(r.family, r.screened), strict=True))
        with t.parent(self.p.name, self.parent_key()) as o.mlflow_run_id:
            self.start_parent()
            screened, selected = self.screen_and_select(hashes)
            data = self.extract_stage({rev: hashes[rev] for rev in selected.result.revisions})
            self.set_stages(screened, selected, data)
            self.finish()
        return o

    def start_parent(self) -> None:
        """The parent run's tags, config and plan; the config in the run folder (live queries read it)."""
        r, t = self.resolved, self.tracker
        assert t is not None
        t.set_tags({"crossray.family": r.family.name, "crossray.layer": str(self.p.layer),
                    "crossray.config": self.config_name})
        t.log_dict(to_dict(self.cfg), "config.json")
        t.log_dict(r.plan, "plan.json")
        r.layout.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(r.layout.config, to_dict(self.cfg))

    def screen_and_select(self, hashes: dict[str, str]) -> tuple[G.Screened, G.Selected]:
        """`hashes`: every screened revision's weight hash."""
        r, p = self.resolved, self.p
        screened = G.Screened(*self._stage("screen", family=r.family, checkpoints=hashes, tasks=r.tasks,
                                           layer=p.layer, examples=p.screen_examples, dtype=p.score_dtype),
                              hashes)
        selected = G.Selected(*self._stage("select", screen=screened, n_checkpoints=p.n_checkpoints,
                                           pinned=p.revisions))
        return screened, selected

    def extract_stage(self, hashes: dict[str, str]) -> G.Extracted:
        """The activations of the revisions in `hashes` (revision -> weight hash, in order)."""
        r, p, c = self.resolved, self.p, self.cfg
        checkpoints = G.Checkpoints(r.family, hashes, p.family, p.naming, p.tokenizer)
        corpus, extraction = G.Corpus(c.extract.corpus), G.Extraction(c.extract, r.extract_mode)
        _, ex = self._stage("extract", checkpoints=checkpoints, layer=p.layer, corpus=corpus,
                            settings=extraction)
        self.tracker.set_tags({"crossray.revisions": ",".join(hashes),  # type: ignore[union-attr]
                               "crossray.weight_hashes": ",".join(ex.weight_hashes),
                               "crossray.corpus_hash": ex.corpus_hash, "crossray.manifest": ex.manifest_key})
        return G.Extracted(ex, checkpoints, checkpoints.extract_config(p.layer, c.extract))

    def set_stages(self, screened: G.Screened, selected: G.Selected, data: G.Extracted) -> None:
        """Train, evaluate, attribute and analyse the checkpoint set `data` holds; each stage is given
        exactly what its key hashes (`graph`)."""
        p, c = self.p, self.cfg
        trained = G.Trained(*self._stage("train", data=data, settings=c.train), data)
        self._stage("evaluate", train=trained, settings=c.evaluate)
        attributed = G.Attributed(*self._stage("attribute", train=trained, tasks=self.resolved.tasks,
                                               settings=c.attribution), trained)
        revisions = ", ".join(data.checkpoints.revisions)
        title = f"{p.name}: {self.family.name} at layer {p.layer}, {revisions} ({p.method} method)"
        self._stage("analyse", attribute=attributed, screen=screened, select=selected, settings=c.analysis,
                    title=title)

    def finish(self) -> None:
        """The crosscoder registered; the parent run's description, headline metrics and report."""
        t, o = self.tracker, self.outcome
        assert t is not None
        self.register()
        t.describe_parent(summary_markdown(o), parent_metrics(o), self.parent_params())
        t.log_artifact(self.layout.report)  # the findings, on the parent

    def register(self) -> None:
        """The trained crosscoder in the Model Registry, with its lineage."""
        o, launch = self.outcome, self.cfg.launch
        train, ex = o.train, o.extract
        assert train is not None and ex is not None and self.tracker is not None
        if not train.model_uri:  # trained by a crossray that did not log MLflow models yet
            logger.warning("the train stage in %s logged no MLflow model; change a train setting (or remove "
                           "the stage folder) to train and register one", self.layout.stage("train"))
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
        cc, select = self.cfg.train.crosscoder, self.outcome.select
        assert select is not None
        return {"family": self.family.name, "layer": str(self.p.layer),
                "revisions": ",".join(select.revisions), "n_latents": str(cc.n_latents),
                "activation": cc.activation, "method": self.p.method}


def _after(inputs: dict[str, Any]) -> dict[str, str]:
    """The finished stages a stage was made from, as their done files name them (the extraction by its
    manifest key): what `crossray.results.check_finished` compares before a folder is served."""
    out = {}
    for value in inputs.values():
        if isinstance(value, G.Trained | G.Attributed):
            out["train" if isinstance(value, G.Trained) else "attribute"] = value.key
        elif isinstance(value, G.Extracted):
            out["extract"] = value.result.manifest_key
    return out


def _sparsity(train) -> str:
    cc = train.crosscoder
    match cc.activation:
        case "batchtopk":
            return f"batchtopk k={cc.k}"
        case "jumprelu":
            return f"jumprelu l0_coeff={train.l1_coeff}"
        case other:
            return f"{other} l1_coeff={train.l1_coeff}"
