"""One pipeline job per checkpoint set, on Ray, tracked in MLflow.

    crossray run configs/tiny.yaml [--json] [--attribution.steps 8]     (or: python -m jobs.pipeline ...)
    ray job submit --working-dir . -- python -m jobs.pipeline --config configs/pythia-1b.yaml

The stages, their keys and bodies live in `crossray.pipeline`; this module only gives them a Ray
backend: screening and evaluation in Ray tasks with the actors' resources, extraction on a Ray Data
actor pool (`jobs.extract`), training with Ray Train (`jobs.train`), attribution on an actor pool
(`jobs.attribute`). MLFLOW_TRACKING_URI picks a tracking server; otherwise a local sqlite store under
the output folder (`RunLayout.tracking_db`); the URI is passed to the pipeline, never put in the
environment.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray

from crossray.checkpoints import Family
from crossray.cli import add_run_options
from crossray.config import (
    AttributionConfig,
    Config,
    ExtractConfig,
    TrainConfig,
    load_config,
)
from crossray.extract import Manifest
from crossray.lock import RunLock
from crossray.pipeline.graph import Extracted, Progress, TrainOutput
from crossray.pipeline.runner import Pipeline
from crossray.pipeline.stages import RunOutcome
from crossray.pipeline.study import Study
from crossray.pipeline.study_report import StudyOutcome, study_summary, study_text
from crossray.pipeline.summary import summary_json, summary_text
from crossray.schema import overrides_from
from crossray.store import RunLayout, run_folder
from crossray.study import is_study
from crossray.tracking import check_tracking, experiment_link
from jobs import attribute as attribute_job
from jobs import extract as extract_job
from jobs import train as train_job
from jobs._ray import error_line, guarded, job_parser, setup_logging
from jobs.corpus import head_sequences
from rayenv import compute_device, init_ray, planned_device, torch_worker

logger = logging.getLogger(__name__)


def _call(fn: Callable, num_gpus: float, *args) -> tuple[object, str]:
    """`fn(*args, device=...)` in a Ray task: torch on the task's CPUs, its models on the device Ray gave
    the task (`rayenv.compute_device`); (the result, that device)."""
    device = compute_device(num_gpus)
    return fn(*args, device=device), device


class RayBackend:
    """The pipeline's heavy work on Ray, with the launch section's actors, workers and resources."""

    def __init__(self, cfg: Config):
        self.launch = cfg.launch
        self.held_out = cfg.evaluate.eval_sequences
        self._prepared: dict[ExtractConfig, extract_job.Prepared] = {}

    def _prepare(self, cfg: ExtractConfig) -> extract_job.Prepared:
        """The checked set and its corpus in Ray's object store (the training sequences and the
        held-out ones after them), read once per run whichever stages need it."""
        if cfg not in self._prepared:
            self._prepared[cfg] = extract_job.prepare(cfg, self.launch, extra=self.held_out)
        return self._prepared[cfg]

    def sequences(self, cfg: ExtractConfig, start: int, stop: int) -> np.ndarray:
        """From the corpus this run read for its extraction; else, for a reused extraction, a head of
        the corpus read here when small (the context scan's first sequences: not the whole corpus
        through Ray Data), or the corpus read with Ray Data."""
        if cfg not in self._prepared and (head := head_sequences(cfg, stop)) is not None:
            return head[min(start, len(head)):stop]
        store = self._prepare(cfg).corpus.store
        return store.get(min(start, store.n), min(stop, store.n))

    def map(self, fn: Callable, args: list[tuple]) -> list[tuple[object, str]]:
        gpus = self.launch.gpus_per_actor
        task = ray.remote(num_cpus=self.launch.cpus_per_actor, num_gpus=gpus,
                          runtime_env=torch_worker())(_call)
        try:
            return ray.get([task.remote(fn, gpus, *a) for a in args])
        except ray.exceptions.RayTaskError as e:
            raise e.as_instanceof_cause() from None

    def device(self, work: str) -> str:
        """Where the extraction and attribution actors ("actors") or the Train workers ("workers")
        compute: what `rayenv.task_device` holds each of them to, given the GPUs the launch reserves."""
        launch = self.launch
        return planned_device({"actors": launch.gpus_per_actor, "workers": launch.gpus_per_worker}[work])

    def extract(self, cfg: ExtractConfig, out: Path, progress: Progress = None) -> Manifest:
        return extract_job.run_extract(cfg, out, self.launch, prep=self._prepare(cfg), on_progress=progress)

    def stream(self, cfg: ExtractConfig) -> Manifest:
        return extract_job.stream_manifest(self._prepare(cfg), self.launch)

    def train(self, cfg: TrainConfig, storage: Path, name: str, norm_factors: list[float],
              data: Extracted, progress: Progress = None) -> TrainOutput:
        if data.result.mode == "stream":  # extraction actors feed the Train workers
            prep = self._prepare(data.config)
            plan = extract_job.stream_plan(prep, cfg.n_steps * cfg.batch_size, cfg.data_seed)
            result = train_job.run_train(cfg, self.launch, storage, norm_factors, name=name,
                                         stream=extract_job.row_stream(prep, plan, self.launch),
                                         on_progress=progress)
        else:
            result = train_job.run_train(cfg, self.launch, storage, norm_factors, data=data.result.acts,
                                         name=name, on_progress=progress, columns=data.columns)
        return self._output(result, "")

    def train_together(self, sets: dict[str, tuple[TrainConfig, Extracted]], storage: Path, name: str,
                       data: Extracted, progress: Progress = None
                       ) -> tuple[dict[str, TrainOutput], dict[str, str]]:
        together = {n: train_job.SetToTrain(cfg, d.result.norm_factors, d.columns)
                    for n, (cfg, d) in sets.items()}
        lead = next(iter(together.values())).cfg
        if data.result.mode == "stream":  # one stream of every revision of the sets: extracted once
            prep = self._prepare(data.config)
            plan = extract_job.stream_plan(prep, lead.n_steps * lead.batch_size, lead.data_seed)
            result = train_job.run_train_together(together, self.launch, storage, name=name,
                                                  stream=extract_job.row_stream(prep, plan, self.launch),
                                                  on_progress=progress)
        else:
            result = train_job.run_train_together(together, self.launch, storage, data=data.result.acts,
                                                  name=name, on_progress=progress)
        aside = train_job.set_aside(result)
        return {n: self._output(result, n) for n in sets if n not in aside}, aside

    @staticmethod
    def _output(result, name: str) -> TrainOutput:
        position = train_job.stream_position(result)
        prefix = f"{name}/" if name else ""
        final = {k.removeprefix(prefix): v for k, v in (result.metrics or {}).items()
                 if not name or k.startswith(prefix) or k in ("step", "resumed_from_step")}
        return TrainOutput(train_job.crosscoder_dir(result, name), train_job.metric_history(result, name),
                           final, position.to_json() if position else None)

    def attribute(self, crosscoder: str, family: Family, tasks: list[str], out: Path,
                  cfg: AttributionConfig, progress: Progress = None) -> dict:
        return attribute_job.run_attribute(crosscoder, family, tasks, out, cfg, self.launch,
                                           on_progress=progress)


def runner(cfg: Config, config_name: str = "", tracking_uri: str | None = None) -> Pipeline | Study:
    """The pipeline of a config, or of a study (a config with `study.sets`), on the Ray backend."""
    kind = Study if is_study(cfg) else Pipeline
    return kind(cfg, RayBackend(cfg), config_name, tracking_uri)


def run(cfg: Config, config_name: str = "", tracking_uri: str | None = None) -> RunOutcome | StudyOutcome:
    """The whole pipeline (or study) for a config, on the Ray that is already initialised
    (`tracking_uri` None: MLflow's default)."""
    return runner(cfg, config_name, tracking_uri).run()


def tracking_uri(cfg: Config) -> str:
    """$MLFLOW_TRACKING_URI when set, else the sqlite store beside the runs."""
    return os.environ.get("MLFLOW_TRACKING_URI") or \
        f"sqlite:///{RunLayout.of(cfg.pipeline.out, cfg.pipeline.name).tracking_db}"


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = job_parser("The crossray pipeline for one checkpoint set")
    add_run_options(p)
    return run_from_args(p.parse_args(argv))


def check_results_survive(cfg: Config, address: str | None) -> None:
    """On a cluster (a Ray job, or an address to join), refuse a run whose results would live only in
    the job's temporary working directory: a relative output folder and no tracking server."""
    on_cluster = any((address, os.environ.get("RAY_ADDRESS"), os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")))
    if on_cluster and not Path(cfg.pipeline.out).is_absolute() and "MLFLOW_TRACKING_URI" not in os.environ:
        raise ValueError(f"this run joins a Ray cluster (a submitted job's working directory is deleted with "
                         f"the job), so pipeline.out {cfg.pipeline.out!r} would lose the results: set "
                         "MLFLOW_TRACKING_URI to a tracking server, or pipeline.out to an absolute path on "
                         "storage every node shares")


def run_from_args(args: argparse.Namespace) -> int:
    setup_logging()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        cfg = load_config(args.config, overrides_from(args))
        check_results_survive(cfg, args.address)
        lock = RunLock(run_folder(cfg.pipeline.out, cfg.pipeline.name), wait=args.wait)
        lock.acquire()  # before anything slow (a toy build, hashing checkpoints): a busy folder is refused
    except (ValueError, OSError) as e:
        error_line(e)
        return 2
    except KeyboardInterrupt:  # while waiting for the folder (--wait): nothing started, nothing held
        error_line("interrupted while waiting for the run folder")
        return 1
    try:
        return _locked_run(cfg, args)
    finally:
        lock.release()


def _locked_run(cfg: Config, args: argparse.Namespace) -> int:
    try:
        uri = tracking_uri(cfg)
        pipeline = runner(cfg, Path(args.config).name, uri)
        pipeline.validate()  # nothing is written, no Ray, no MLflow run before this passes
        pipeline.layout.tracking_db.parent.mkdir(parents=True, exist_ok=True)
        check_tracking(uri)
    except (ValueError, OSError) as e:
        error_line(e)
        return 2
    except KeyboardInterrupt:  # (validating thousands of study sets takes a while): nothing started yet
        error_line("interrupted while checking the configuration; nothing was started")
        return 1

    def work() -> RunOutcome | StudyOutcome:
        init_ray(args.address)
        signal.signal(signal.SIGTERM, _interrupt)  # after ray.init, which installs its own
        return pipeline.run()

    code, outcome = guarded(work, pipeline.out, lambda: pipeline.current, uri)
    if outcome is None:
        return code
    study = isinstance(outcome, StudyOutcome)
    summary = study_summary(outcome) if study else summary_json(outcome)
    print(study_text(summary) if study else summary_text(outcome))
    experiment = (pipeline.main if isinstance(pipeline, Study) else pipeline).resolved.experiment
    print(f"MLflow: {uri}, experiment {experiment}; in the UI: {experiment_link(uri, experiment)}")
    if args.json:
        print(json.dumps(summary))
    if study and outcome.failed:
        error_line(f"study sets {', '.join(sorted(outcome.failed))} failed (see above and the log); re-run "
                   "the same command to retry them: the finished sets are reused")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
