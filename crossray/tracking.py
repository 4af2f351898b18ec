"""MLflow for pipeline runs: an experiment per family, a parent run per configuration, a child run per
stage, lineage tags, and the crosscoder in the Model Registry.

- The parent run is found again by the key of its configuration (launch settings excluded), so a
  re-run of the same configuration continues the same parent.
- A stage that runs gets a child run (params, stepwise metrics, its folder as artifacts, except
  activation shards and Ray Train checkpoints, which can be terabytes). A stage reused from an earlier
  execution gets a light child run under the new parent that links to the run that produced it
  (`crossray.reused_from`), with no artifacts uploaded again; a parent never gets two children for
  one stage key.
- One registered model version per trained crosscoder (per train stage run), whatever the number of
  pipeline runs that reuse it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)
SKIP_ARTIFACTS = ("acts", "ray")
"""Stage sub-folders never uploaded: activation shards and Ray Train checkpoints."""


def check_tracking() -> str:
    """The tracking URI in use; a server that does not answer is an error before any compute."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith("http"):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        try:
            mlflow.MlflowClient().search_experiments(max_results=1)
        except Exception as e:  # noqa: BLE001 (any failure means the server is unusable)
            raise ValueError(f"MLflow tracking server {uri} does not answer: {type(e).__name__}") from e
    return uri


def flat_params(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow params `section.field` (lists comma-joined)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = ",".join(map(str, v)) if isinstance(v, list | tuple) else str(v)
    return out


class Tracker:
    def __init__(self, experiment: str, local_artifacts: Path):
        import mlflow

        if mlflow.get_experiment_by_name(experiment) is None:
            local = not mlflow.get_tracking_uri().startswith(("http", "databricks"))
            mlflow.create_experiment(experiment, artifact_location=local_artifacts.resolve().as_uri()
                                     if local else None)
        mlflow.set_experiment(experiment)
        self.client = mlflow.MlflowClient()
        self.experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
        self.parent_id: str | None = None

    def _search(self, query: str) -> list:
        return self.client.search_runs([self.experiment_id], filter_string=query)

    @contextlib.contextmanager
    def parent(self, name: str, key: str) -> Iterator[str]:
        """The parent run of this configuration (found again by its key), active inside."""
        import mlflow

        existing = self._search(f"tags.`crossray.pipeline_key` = '{key}'")
        run_id = existing[0].info.run_id if existing else None
        with mlflow.start_run(run_id=run_id, run_name=name,
                              tags=None if run_id else {"crossray.pipeline_key": key}) as run:
            self.parent_id = run.info.run_id
            yield run.info.run_id

    def _child_with_key(self, stage: str, key: str) -> bool:
        return bool(self._search(f"tags.`mlflow.parentRunId` = '{self.parent_id}' and "
                                 f"tags.`crossray.stage` = '{stage}' and "
                                 f"tags.`crossray.stage_key` = '{key}'"))

    @contextlib.contextmanager
    def stage(self, stage: str, key: str) -> Iterator[str]:
        """A child run for a stage that runs now."""
        import mlflow

        with mlflow.start_run(run_name=stage, nested=True,
                              tags={"crossray.stage": stage, "crossray.stage_key": key}) as run:
            yield run.info.run_id

    def link(self, stage: str, key: str, source_run_id: str | None) -> None:
        """Record under the parent that a stage was reused from an earlier execution's run."""
        import mlflow

        if self._child_with_key(stage, key):
            return
        tags = {"crossray.stage": stage, "crossray.stage_key": key, "crossray.status": "reused"}
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
            if not path.is_file() or rel.name.startswith(("started.json", "done.json")):
                continue
            if rel.parts[0] in SKIP_ARTIFACTS and rel.name != "manifest.json":
                continue
            mlflow.log_artifact(str(path), str(Path(artifact_path, *rel.parts[:-1])))

    def log_history(self, rows: list[dict], skip: tuple[str, ...] = ("step",)) -> None:
        import mlflow

        for row in rows:
            metrics = {k: float(v) for k, v in row.items() if k not in skip and isinstance(v, int | float)}
            mlflow.log_metrics(metrics, step=int(row.get("step", 0)))

    def register(self, name: str, alias: str, train_key: str) -> dict | None:
        """The crosscoder of the train run with this key, registered once, with the alias moved to it."""
        import mlflow

        runs = [r for r in self._search(f"tags.`crossray.stage` = 'train' and "
                                        f"tags.`crossray.stage_key` = '{train_key}'")
                if r.data.tags.get("crossray.status") != "reused"]
        if not runs:
            return None
        run = runs[-1]  # the first execution: its artifacts are the ones every later run links to
        source = f"{run.info.artifact_uri}/train/crosscoder"
        with contextlib.suppress(Exception):  # the registered model may exist already
            self.client.create_registered_model(name)
        versions = [v for v in self.client.search_model_versions(f"name = '{name}'") if v.source == source]
        version = versions[0] if versions else self.client.create_model_version(name, source,
                                                                                  run_id=run.info.run_id)
        self.client.set_registered_model_alias(name, alias, version.version)
        mlflow.set_tag("crossray.registered_model", f"models:/{name}@{alias}")
        uri = f"models:/{name}@{alias}"
        return {"name": name, "version": str(version.version), "alias": alias, "uri": uri}
