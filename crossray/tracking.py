"""MLflow for pipeline runs: an experiment per family, a parent run per configuration, a child run per
stage, lineage tags, and the crosscoder in the Model Registry.

- The parent run is found again by the key of its configuration (launch settings excluded), so a
  re-run of the same configuration continues the same parent.
- A stage that runs gets a child run (params, stepwise metrics, its folder as artifacts, except
  activation shards and Ray Train checkpoints, which can be terabytes). A stage reused from an earlier
  execution gets a light child run under the new parent that links to the run that produced it
  (`crossray.reused_from`), with no artifacts uploaded again; a parent never gets two children for
  one stage key.
- The parent run tells the story: a markdown description (MLflow's run note), the headline numbers
  as metrics and the checkpoint set as params, so the experiment table compares checkpoint sets.
- Datasets (the corpus, each task file) are MLflow inputs of the stages that read them, with their
  content digest and row counts.
- The crosscoder is an MLflow pyfunc model (`crossray.mlflow_model`), registered once per trained
  crosscoder (one version per train stage run, whatever the number of pipeline runs reusing it),
  with lineage tags and a description.
- Experiments open in MLflow's model-training view; no tag, param or description holds a path of
  the machine that ran the pipeline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from crossray.store import NEVER_UPLOADED_DIRS, NEVER_UPLOADED_FILES, column

logger = logging.getLogger(__name__)
# Never uploaded: activation shards and Ray Train checkpoints (sub-folders), the stage bookkeeping and
# the optimizer state kept beside the final crosscoder (twice its size; resuming reads the Ray Train
# checkpoints, never MLflow).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
"""MLflow 3 opens an experiment in its model-training view (not the GenAI one) with this tag."""
SYSTEM_METRICS_INTERVAL_S = 2.0
SOURCE = {"mlflow.source.name": "crossray pipeline"}
"""Replaces MLflow's default source tag, the absolute path of the entry script."""


def portable(value: str) -> str:
    """A value without this machine's paths: an absolute path becomes its last component."""
    if value.startswith(("/", "~")) or (len(value) > 2 and value[1] == ":" and value[2] in "/\\"):
        return Path(value).name
    return value


def check_tracking(uri: str | None = None) -> str:
    """`uri` (None: MLflow's default), checked: a server that does not answer is an error before any
    compute."""
    import mlflow

    uri = uri or mlflow.get_tracking_uri()
    if uri.startswith("http"):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # (MLflow reads these from the
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")      # environment only)
        try:
            mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as e:  # noqa: BLE001 (any failure means the server is unusable)
            raise ValueError(f"MLflow tracking server {uri} does not answer: {type(e).__name__}") from e
    return uri


def experiment_link(uri: str, experiment: str) -> str:
    """Where a person opens the experiment, in MLflow's model-training view (MLflow 3.17 picks the
    view from the `workflowType` query parameter, else from the browser's last choice)."""
    import mlflow

    exp = mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
    page = f"/#/experiments/{exp.experiment_id if exp else ''}?workflowType=machine_learning"
    if uri.startswith("http"):
        return uri + page
    return f"`mlflow ui --backend-store-uri {uri}`, then http://127.0.0.1:5000{page}"


def flat_params(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow params `section.field` (lists comma-joined)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            values = v if isinstance(v, list | tuple) else [v]
            out[f"{prefix}{k}"] = ",".join(portable(str(x)) for x in values)
    return out


class Tracker:
    """Every MLflow write of a pipeline run goes through here. `tracking_uri` (None: MLflow's default)
    is passed in, never read from or written to the environment."""

    def __init__(self, experiment: str, local_artifacts: Path, tracking_uri: str | None = None):
        import mlflow

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        self.tracking_uri = mlflow.get_tracking_uri()
        if mlflow.get_experiment_by_name(experiment) is None:
            local = not mlflow.get_tracking_uri().startswith(("http", "databricks"))
            mlflow.create_experiment(experiment, artifact_location=local_artifacts.resolve().as_uri()
                                     if local else None)
        mlflow.set_experiment(experiment)
        self.client = mlflow.MlflowClient()
        self.experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
        self.client.set_experiment_tag(self.experiment_id, *EXPERIMENT_KIND)
        self.parent_id: str | None = None

    def _search(self, query: str) -> list:
        return self.client.search_runs([self.experiment_id], filter_string=query)

    @contextlib.contextmanager
    def parent(self, name: str, key: str, tags: dict[str, str] | None = None) -> Iterator[str]:
        """The parent run of this configuration (found again by its key), active inside; started
        inside another parent (a study's), it is nested under it and that one is the parent again
        after."""
        import mlflow

        outer = self.parent_id
        existing = self._search(f"tags.`crossray.pipeline_key` = '{key}'")
        run_id = existing[0].info.run_id if existing else None
        run = mlflow.start_run(run_id=run_id, run_name=name, nested=outer is not None,
                               tags={**SOURCE, **(tags or {})} if run_id else
                               {**SOURCE, **(tags or {}), "crossray.pipeline_key": key})
        self.parent_id = run.info.run_id
        for stale in self._search(f"tags.`mlflow.parentRunId` = '{self.parent_id}' and "
                                  "attributes.status = 'RUNNING'"):  # left by a killed run or an outage
            logger.info("closing the stage run %s of an earlier, interrupted execution as KILLED",
                        stale.info.run_id)
            self.client.set_terminated(stale.info.run_id, "KILLED")
        try:
            with _ending(run):
                yield run.info.run_id
        finally:
            self.parent_id = outer

    def _child_with_key(self, stage: str, key: str) -> bool:
        return bool(self._search(f"tags.`mlflow.parentRunId` = '{self.parent_id}' and "
                                 f"tags.`crossray.stage` = '{stage}' and "
                                 f"tags.`crossray.stage_key` = '{key}'"))

    @contextlib.contextmanager
    def stage(self, stage: str, key: str, system_metrics: bool = False) -> Iterator[str]:
        """A child run for a stage that runs now (with CPU/GPU/memory metrics when asked)."""
        import mlflow

        if system_metrics:
            mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
            mlflow.set_system_metrics_samples_before_logging(1)
        run = mlflow.start_run(run_name=stage, nested=True, log_system_metrics=system_metrics,
                               tags={**SOURCE, "crossray.stage": stage, "crossray.stage_key": key})
        with _ending(run):
            yield run.info.run_id

    def link(self, stage: str, key: str, source_run_id: str | None) -> None:
        """Record under the parent that a stage was reused from an earlier execution's run."""
        import mlflow

        if self._child_with_key(stage, key):
            return
        tags = {**SOURCE, "crossray.stage": stage, "crossray.stage_key": key, "crossray.status": "reused"}
        if source_run_id:
            tags["crossray.reused_from"] = source_run_id
        with mlflow.start_run(run_name=f"{stage} (reused)", nested=True, tags=tags):
            pass

    def log_folder(self, folder: Path, artifact_path: str) -> None:
        """A stage folder's files as artifacts, except activation shards and Train checkpoints (the
        extraction's manifest is kept)."""
        import mlflow

        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if not path.is_file() or rel.name in NEVER_UPLOADED_FILES:
                continue
            if rel.parts[0] in NEVER_UPLOADED_DIRS and rel.name != "manifest.json":
                continue
            mlflow.log_artifact(str(path), str(Path(artifact_path, *rel.parts[:-1])))

    # -- the active run (a stage's, or the parent's) --------------------------------------------------
    def log_params(self, params: dict[str, str]) -> None:
        import mlflow

        mlflow.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import mlflow

        mlflow.log_metrics(metrics, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        import mlflow

        mlflow.set_tags(tags)

    def log_dict(self, obj: dict, name: str) -> None:
        import mlflow

        mlflow.log_dict(obj, name)

    def log_artifact(self, path: Path) -> None:
        import mlflow

        mlflow.log_artifact(str(path))

    def log_crosscoder(self, folder: Path) -> str:
        """The crosscoder in `folder` as an MLflow pyfunc model of the active run; returns its URI."""
        from crossray.mlflow_model import log_crosscoder

        return log_crosscoder(folder).model_uri

    def progress_logger(self, run_id: str) -> Callable[[dict], None]:
        return progress_logger(run_id, self.tracking_uri)

    def log_history(self, rows: list[dict], skip: tuple[str, ...] = ("step",)) -> None:
        import mlflow

        for row in rows:
            metrics = {k: float(v) for k, v in row.items() if k not in skip and isinstance(v, int | float)}
            mlflow.log_metrics(metrics, step=int(row.get("step", 0)))

    def log_dataset(self, name: str, source: str, digest: str, profile: dict, context: str) -> None:
        """A data set the active stage run reads, as an MLflow input (name, source, digest, counts)."""
        import mlflow

        mlflow.log_input(_dataset(name, source, digest, profile), context=context)

    def describe_parent(self, markdown: str, metrics: dict[str, float], params: dict[str, str]) -> None:
        """The parent run's description, headline metrics and checkpoint-set params."""
        import mlflow

        assert self.parent_id is not None
        self.client.set_tag(self.parent_id, "mlflow.note.content", markdown)
        mlflow.log_metrics(metrics)
        logged = self.client.get_run(self.parent_id).data.params
        mlflow.log_params({k: v for k, v in params.items() if k not in logged})

    def register(self, name: str, alias: str, model_uri: str, tags: dict[str, str], description: str
                 ) -> dict:
        """The crosscoder's pyfunc model registered once (one version per logged model), the alias
        moved to it, lineage tags and description on the version."""
        import mlflow

        with contextlib.suppress(Exception):  # the registered model may exist already
            self.client.create_registered_model(name)
        versions = [v for v in self.client.search_model_versions(f"name = '{name}'") if v.source == model_uri]
        version = versions[0] if versions else mlflow.register_model(model_uri, name)
        for k, v in tags.items():
            self.client.set_model_version_tag(name, str(version.version), k, portable(v))
        self.client.update_model_version(name, str(version.version), description=description)
        self.client.set_registered_model_alias(name, alias, str(version.version))
        uri = f"models:/{name}@{alias}"
        mlflow.set_tag("crossray.registered_model", uri)
        return {"name": name, "version": str(version.version), "alias": alias, "uri": uri}


@contextlib.contextmanager
def _ending(run) -> Iterator[None]:
    """End an MLflow run FINISHED, FAILED on an error, KILLED on an interrupt (SIGINT, SIGTERM); if
    the server cannot take the status (an outage), the next run of this configuration closes it."""
    import mlflow

    status = "FINISHED"
    try:
        yield
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        try:
            mlflow.end_run(status)
        except Exception as e:  # noqa: BLE001 (an outage must not hide the original error)
            logger.warning("could not mark MLflow run %s %s: %s", run.info.run_id, status, type(e).__name__)


def _dataset(name: str, source: str, digest: str, profile: dict):
    """A metadata-only MLflow dataset with a profile (row counts); the data itself stays put."""
    from mlflow.data.dataset_source import DatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    class Source(DatasetSource):
        def __init__(self, uri: str):
            self.uri = uri

        @staticmethod
        def _get_source_type() -> str:
            return "crossray"

        def load(self, **kwargs):
            raise NotImplementedError("crossray data sets are read by crossray")

        @staticmethod
        def _can_resolve(raw_source) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source):
            raise NotImplementedError

        def to_dict(self) -> dict:
            return {"uri": self.uri}

        @classmethod
        def from_dict(cls, source_dict: dict):
            return cls(source_dict["uri"])

    class Profiled(MetaDataset):
        @property
        def profile(self) -> dict:
            return profile

        def to_dict(self) -> dict:
            return {**super().to_dict(), "profile": json.dumps(profile)}

    return Profiled(Source(source), name=name, digest=digest[:36])


def progress_logger(run_id: str, tracking_uri: str | None = None) -> Callable[[dict], None]:
    """A `Progress` report that records each snapshot as `progress/*` metrics of `run_id` (callable from
    any thread: it does not rely on the active run)."""
    import math
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=tracking_uri)

    def log(snapshot: dict) -> None:
        now, step = int(time.time() * 1000), int(snapshot.get("done", 0))
        client.log_batch(run_id, metrics=[Metric(column("progress", k), float(v), now, step)
                                          for k, v in snapshot.items()
                                          if isinstance(v, int | float) and math.isfinite(v)])
    return log


def metric_key_problem(key: str) -> str | None:
    """Why MLflow would refuse `key` as a metric name (its own check), or None."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_metric_name  # (MLflow's rule: no copy of it to drift)

    try:
        _validate_metric_name(key)
    except MlflowException as e:
        return e.message
    return None
