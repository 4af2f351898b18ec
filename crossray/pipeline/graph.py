"""The stage graph: each stage is a function of exactly what its key hashes, plus where it runs.

    screen -> select -> extract -> train -> evaluate -> attribute -> analyse

A stage function takes a `StageRun` (the backend that does the heavy work, the MLflow tracker, its
folder and key) and keyword inputs; its key is `stage_key(stage, inputs)`, the hash of those same
inputs in the order of its signature, so what a stage reads and what its key hashes cannot drift.
Inputs are hashed by content, not by name (`inputs.digest`): a family by its name, task files by
their bytes, checkpoints by their weight hashes, a corpus by its fingerprint, and an earlier stage's
outcome by its key (`Screened`, `Selected`, `Trained`, `Attributed`) or, for the extraction, by its
manifest key (`Extracted`: two extractions of the same data train the same crosscoder).

    screen    family, screened checkpoints (weight hashes), tasks (contents), layer, examples, dtype
    select    screen, checkpoint count, the pinned revisions
    extract   selected checkpoints (weight hashes), layer, corpus (fingerprint), extraction settings
    train     the extraction (manifest key), training settings
    evaluate  train, held-out settings
    attribute train, tasks (contents), attribution settings
    analyse   attribute, screen, select, analysis settings, report title

Launch settings (actors, workers, resources) never enter a key. This module never imports Ray.
"""

from __future__ import annotations

import dataclasses
import inspect
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from crossray.checkpoints import Family
from crossray.config import (
    AnalysisConfig,
    AttributionConfig,
    CorpusConfig,
    EvaluateConfig,
    ExtractConfig,
    ExtractSettings,
    TrainConfig,
    TrainSettings,
    resolve_train,
)
from crossray.pipeline import inputs as I
from crossray.pipeline import stages as S
from crossray.schema import shallow, to_dict
from crossray.store import ACCURACY, SIMILARITY, RunLayout, column, write_json_atomic, write_tables

if TYPE_CHECKING:
    from crossray.extract import Manifest
    from crossray.tracking import Tracker



# -- what the heavy work runs on ------------------------------------------------------------------

@dataclass(frozen=True)
class TrainOutput:
    crosscoder: Path
    history: list[dict]
    """Every metrics row of the run (rank 0's, every `metrics_every` steps)."""
    final: dict
    stream_position: dict | None = None
    """Stream mode: the rows trained per stream item at the end (`crossray.position`)."""


Progress = Callable[[dict], None] | None


class Backend(Protocol):
    """Runs the heavy work: library functions next to the models, extraction, training, attribution.
    `progress` receives progress snapshots (the stage's MLflow run records them)."""

    def map(self, fn: Callable, args: list[tuple]) -> list[tuple[Any, str]]:
        """`fn(*a, device=...)` for each `a`, where the backend runs it, on the device it gives that
        work: each result with its device."""
        ...

    def device(self, work: str) -> str:
        """Where the backend's "actors" (extraction, attribution) or Train "workers" compute."""
        ...

    def extract(self, cfg: ExtractConfig, out: Path, progress: Progress = None) -> Manifest: ...

    def stream(self, cfg: ExtractConfig) -> Manifest:
        """What `extract` would record (key, hashes, norm factors, rows), with no shard written."""
        ...

    def train(self, cfg: TrainConfig, storage: Path, name: str, norm_factors: list[float],
              data: Extracted, progress: Progress = None) -> TrainOutput:
        """Fit on the extraction's shards, or (stream mode) on its extraction streamed into training."""
        ...

    def train_together(self, sets: dict[str, tuple[TrainConfig, Extracted]], storage: Path, name: str,
                       data: Extracted, progress: Progress = None
                       ) -> tuple[dict[str, TrainOutput], dict[str, str]]:
        """Several crosscoders (a study's sets, each config with its columns of `data`) fitted by one job
        on `data` read (or streamed) once: the outputs of those that trained, and why the others were
        set aside."""
        ...

    def attribute(self, crosscoder: str, family: Family, tasks: list[str], out: Path, cfg: AttributionConfig,
                  progress: Progress = None) -> dict: ...

    def sequences(self, cfg: ExtractConfig, start: int, stop: int) -> np.ndarray:
        """Corpus sequences start..stop-1 as (n, seq_len) token ids (fewer at the corpus's end): the
        held-out ones for evaluation, the first ones for the context scan."""
        ...


@dataclass(frozen=True)
class StageRun:
    """Where a stage runs: the backend, the MLflow tracker (its stage run is active), the run layout,
    its key and the id of its MLflow run."""

    backend: Backend
    tracker: Tracker
    layout: RunLayout
    key: str
    mlflow_run_id: str
    devices: set[str] = dataclasses.field(default_factory=set)
    """Where the stage's work ran (the runner records it; none: the driver's CPU)."""

    def progress(self) -> Callable[[dict], None]:
        return self.tracker.progress_logger(self.mlflow_run_id)

    def map(self, fn: Callable, args: list[tuple]) -> list:
        """`backend.map`, the devices it ran on recorded."""
        ran = self.backend.map(fn, args)
        self.devices.update(device for _, device in ran)
        return [result for result, _ in ran]

    def on(self, work: str) -> Backend:
        """The backend, its `work` ("actors" or "workers") recorded as where the stage ran."""
        self.devices.add(self.backend.device(work))
        return self.backend


# -- inputs hashed by content ---------------------------------------------------------------------

@dataclass(frozen=True)
class TaskSet:
    """The task specs (files, folders or hub names; `toy` expanded), hashed by their contents."""

    specs: tuple[str, ...]
    contents: dict[str, str]
    toy: bool = False

    def stage_identity(self) -> dict[str, str]:
        return self.contents

    @classmethod
    def of(cls, specs: tuple[str, ...], family: Family) -> TaskSet:
        files = tuple(I.task_files(specs, family))
        return cls(files, I.task_contents(files), specs == ("toy",))


@dataclass(frozen=True)
class Checkpoints:
    """Revisions of one family with their weight hashes, in order; hashed by (revision, hash) pairs.
    `spec`, `naming` and `tokenizer` are the family as the config names it (extraction configs carry
    it to the workers)."""

    family: Family
    hashes: dict[str, str]
    spec: str
    naming: str | None = None
    tokenizer: str | None = None

    @property
    def revisions(self) -> list[str]:
        return list(self.hashes)

    def stage_identity(self) -> list[tuple[str, str]]:
        return list(self.hashes.items())

    def extract_config(self, layer: int, settings: ExtractSettings) -> ExtractConfig:
        return ExtractConfig(**shallow(settings), family=self.spec, layer=layer, revisions=tuple(self.hashes),
                             naming=self.naming, tokenizer=self.tokenizer)


@dataclass(frozen=True)
class Corpus:
    config: CorpusConfig

    def stage_identity(self) -> str:
        return I.corpus_fingerprint(self.config)


@dataclass(frozen=True)
class Extraction:
    """The extraction settings with the resolved mode (the mode, not the disk budget that chose it, is
    what the output depends on)."""

    settings: ExtractSettings
    mode: S.ExtractMode

    def stage_identity(self) -> dict:
        return {**to_dict(self.settings), "mode": self.mode, "max_disk_gb": None}


# -- earlier stages as inputs ---------------------------------------------------------------------

@dataclass(frozen=True)
class Done:
    """A finished stage as a later stage's input, hashed by its key."""

    key: str

    def stage_identity(self) -> str:
        return self.key


@dataclass(frozen=True)
class Screened(Done):
    result: S.ScreenResult
    checkpoints: dict[str, str]
    """The screened revisions' weight hashes (what the screen key hashed)."""


@dataclass(frozen=True)
class Selected(Done):
    result: S.SelectResult


@dataclass(frozen=True)
class Extracted:
    """The extraction as later stages read it, hashed by its manifest key (not its stage key: two
    extractions of the same data train the same crosscoder), and for a study set, the columns of the
    extracted checkpoints it reads."""

    result: S.ExtractResult
    checkpoints: Checkpoints
    config: ExtractConfig
    """The extraction config of these checkpoints (stream mode: training and evaluation extract with it)."""
    columns: tuple[int, ...] | None = None
    """Where these checkpoints sit in the extraction's checkpoint axis (None: all of it, in order)."""

    def stage_identity(self) -> Any:
        return self.result.manifest_key if self.columns is None else [self.result.manifest_key, self.columns]

    def select(self, revisions: list[str] | tuple[str, ...]) -> Extracted:
        """The columns of `revisions` (a study set) of this extraction."""
        from crossray.study import columns

        names = self.checkpoints.revisions
        cols = columns(revisions, names)
        if cols == tuple(range(len(names))):
            return self
        ex, pick = self.result, (lambda values: [values[c] for c in cols])  # noqa: E731
        by_policy = {k: pick(v) for k, v in ex.norm_factors_by_policy.items()}
        sub = dataclasses.replace(ex, weight_hashes=pick(ex.weight_hashes),
                                  norm_factors=pick(ex.norm_factors), norm_factors_by_policy=by_policy)
        base = self.columns or tuple(range(len(names)))
        hashes = {r: self.checkpoints.hashes[r] for r in revisions}
        checkpoints = dataclasses.replace(self.checkpoints, hashes=hashes)
        return Extracted(sub, checkpoints, dataclasses.replace(self.config, revisions=tuple(revisions)),
                         tuple(base[c] for c in cols))


@dataclass(frozen=True)
class Trained(Done):
    result: S.TrainResult
    data: Extracted


@dataclass(frozen=True)
class Attributed(Done):
    result: S.AttributeResult
    train: Trained


# -- the registry and the keys --------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable
    version: tuple = ()
    """Tags of the rule a stage's output follows, hashed after its inputs (bumped when the rule changes)."""
    system_metrics: bool = False

    @property
    def inputs(self) -> list[str]:
        """The keyword inputs the key hashes: every parameter after the `StageRun`."""
        return [p.name for p in inspect.signature(self.fn).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY]


STAGE: dict[str, Stage] = {}


def stage(name: str, version: tuple = (), system_metrics: bool = False):
    def register(fn: Callable) -> Callable:
        STAGE[name] = Stage(name, fn, version, system_metrics)
        return fn
    return register


def stage_key(stage: Stage, inputs: dict[str, Any]) -> str:
    """The hash of exactly the stage's inputs, in the order of its signature (then its version)."""
    wanted = stage.inputs
    if set(inputs) != set(wanted):
        raise TypeError(f"stage {stage.name} takes {wanted}, got {sorted(inputs)}")
    return I.digest(stage.name, *[inputs[name] for name in wanted], *stage.version)


# -- the stages -----------------------------------------------------------------------------------

@stage("screen", version=("sentence curves",))
def screen(run: StageRun, *, family: Family, checkpoints: dict[str, str], tasks: TaskSet, layer: int,
           examples: int, dtype: str) -> S.ScreenResult:
    """Accuracy and activations of every screened revision (one unit of work each)."""
    revisions = list(checkpoints)
    texts = S.screen_texts(family, revisions[0], tasks.specs, examples)
    parts = run.map(S.screen_revision, [(family, tasks.specs, r, layer, texts, dtype) for r in revisions])
    result, rows = S.combine_screen(revisions, parts)
    log_tasks(run.tracker, tasks, "screening")
    for task, acc in result.accuracy.items():  # step = position in the screened revision list
        for i, (value, prefix) in enumerate(zip(acc, result.prefix_accuracy[task], strict=True)):
            run.tracker.log_metrics({column("accuracy", task): value,
                                     column("prefix_accuracy", task): prefix}, step=i)
    write_tables(run.layout.screen_tables, {ACCURACY: rows}, {SIMILARITY: result.similarity})
    return result


@stage("select", version=("final kept",))
def select(run: StageRun, *, screen: Screened, n_checkpoints: int, pinned: tuple[str, ...]) -> S.SelectResult:
    """The checkpoint set from the screen's curves (revisions with identical weights count once)."""
    hashes = [screen.checkpoints[r] for r in screen.result.revisions]
    result = S.select(screen.result, n_checkpoints, pinned, hashes)
    run.tracker.log_params({"revisions": ",".join(result.revisions)})
    run.tracker.set_tags({"crossray.selection_reasons": " | ".join(result.reasons)})
    return result


@stage("extract", system_metrics=True)
def extract(run: StageRun, *, checkpoints: Checkpoints, layer: int, corpus: Corpus, settings: Extraction
            ) -> S.ExtractResult:
    """Residual activations of the selected checkpoints: Parquet shards, or (stream) only the manifest's
    figures, training reading the extraction as it runs."""
    from crossray.tracking import flat_params

    ecfg, t = checkpoints.extract_config(layer, settings.settings), run.tracker
    t.log_params(flat_params({"extract": to_dict(ecfg)}))
    t.set_tags({"crossray.extract_mode": settings.mode})
    if settings.mode == "stream":  # (the norm factors only: training extracts the rows)
        m = run.on("actors").stream(ecfg)
    else:
        m = run.on("actors").extract(ecfg, run.layout.acts, run.progress())
    t.log_metrics({"token_count": m.token_count})
    c = corpus.config
    t.log_dataset(f"corpus:{Path(c.source).name if c.source else 'mixture'}", c.label, m.corpus_hash,
                  {"sequences": m.n_sequences, "seq_len": c.seq_len, "rows": m.token_count}, "training")
    t.log_metrics({column(f"norm_factor_{policy}", rev): factor
                   for policy, factors in m.norm_factors_by_policy.items()
                   for rev, factor in zip(ecfg.revisions, factors, strict=True)})
    acts = str(run.layout.acts) if settings.mode == "parquet" else None
    return S.ExtractResult(acts, m.key, m.weight_hashes, m.corpus_hash, m.norm_factors, m.d_model,
                           m.n_sequences, m.token_count, settings.mode, m.norm_factors_by_policy)


@stage("train", system_metrics=True)
def train(run: StageRun, *, data: Extracted, settings: TrainSettings) -> S.TrainResult:
    """The crosscoder, fitted by the backend (resuming from its last Train checkpoint: the Train run
    is named by the stage key), copied into the stage folder and logged as an MLflow model."""
    from crossray.tracking import flat_params

    ex, layout, t = data.result, run.layout, run.tracker
    cfg = train_config(data, settings)
    t.log_params(flat_params({"train": to_dict(cfg)}))
    out = run.on("workers").train(cfg, layout.train_storage, f"train-{run.key}", ex.norm_factors, data,
                                  run.progress())
    t.log_history(out.history)
    if out.stream_position is not None:  # what a restore re-trained, for the record
        write_json_atomic(layout.stream_position, out.stream_position)
        t.log_metrics({column("stream", k): out.stream_position[k]
                       for k in ("rows", "duplicate_rows", "restores")})
    shutil.copytree(out.crosscoder, layout.crosscoder, dirs_exist_ok=True)
    shutil.rmtree(layout.train_storage, ignore_errors=True)  # checkpoints are not needed once done
    return S.TrainResult(str(layout.crosscoder), out.final, t.log_crosscoder(layout.crosscoder))


def train_config(data: Extracted, settings: TrainSettings) -> TrainConfig:
    """The training settings resolved against what they train on (C, D and the data's lineage)."""
    return resolve_train(settings, len(data.checkpoints.hashes), data.result.d_model,
                         revisions=tuple(data.checkpoints.revisions),
                         weight_hashes=tuple(data.result.weight_hashes),
                         family=data.checkpoints.family.name, layer=data.config.layer)


@stage("evaluate")
def evaluate(run: StageRun, *, train: Trained, settings: EvaluateConfig) -> S.EvaluateResult:
    """FVE, L0, dead latents and spliced ΔCE on the sequences after the training ones."""
    ecfg, n_train = train.data.config, train.data.result.n_sequences
    held_out = run.backend.sequences(ecfg, n_train, n_train + settings.eval_sequences)
    [result] = run.map(S.evaluate, [(ecfg, train.result.crosscoder, held_out, settings)])
    run.tracker.log_metrics(result.metrics)
    write_json_atomic(run.layout.eval_metrics, result.metrics)
    return result


@stage("attribute")
def attribute(run: StageRun, *, train: Trained, tasks: TaskSet, settings: AttributionConfig
              ) -> S.AttributeResult:
    """IE and RelIE of every feature per task and checkpoint, the top features and the ablation check."""
    from crossray.attribution import TaskSummary
    from crossray.tracking import flat_params

    t = run.tracker
    t.log_params(flat_params({"attribution": to_dict(settings)}))
    log_tasks(t, tasks, "attribution")
    summary = run.on("actors").attribute(train.result.crosscoder, train.data.checkpoints.family,
                                         list(tasks.specs), run.layout.effects_folder, settings,
                                         run.progress())
    infos = {task: TaskSummary.from_json(info) for task, info in summary["tasks"].items()}
    for task, info in infos.items():
        if info.ablation is not None:  # both forms, named as the parent run names them
            t.log_metrics({column("ablation_rho", task): info.ablation.mean_rho_relie,
                           column("ablation_rho_2way", task): info.ablation.mean_pair_rho_relie})
    return S.AttributeResult(str(run.layout.effects_folder), infos)


@stage("analyse")
def analyse(run: StageRun, *, attribute: Attributed, screen: Screened, select: Selected,
            settings: AnalysisConfig, title: str) -> S.AnalyseResult:
    """Feature table, top contexts, plots and the findings report."""
    trained = attribute.train
    ex, ecfg = trained.data.result, trained.data.config
    tokens = run.backend.sequences(ecfg, 0, min(settings.context_sequences, ex.n_sequences))
    [contexts] = run.map(S.top_contexts, [(trained.result.crosscoder, ex, ecfg, settings, tokens,
                                           trained.data.columns)])
    return S.analyse(run.layout, screen.result, select.result, trained.result, attribute.result, contexts,
                     title)  # (top contexts next to the models; stream mode extracts the scanned ones again)


def log_tasks(tracker: Tracker, tasks: TaskSet, context: str) -> None:
    """Each task file as an MLflow input of the active stage run (name, source, digest, rows)."""
    for name, digest in tasks.contents.items():
        path = next((Path(t) / name for t in tasks.specs if (Path(t) / name).is_file()), Path(name))
        source = f"toy:tasks/{path.name}" if tasks.toy else str(path)
        rows = sum(1 for line in path.open() if line.strip()) if path.is_file() else None
        tracker.log_dataset(path.stem, source, digest, {"rows": rows}, context)
