"""One pipeline job per checkpoint set, tracked in MLflow.

    python -m jobs.pipeline --config configs/tiny.yaml          (also: crossray run configs/tiny.yaml)
    ray job submit --working-dir . -- python -m jobs.pipeline --config configs/pythia-1b.yaml

screen -> select -> extract -> train -> evaluate -> attribute -> analyse. Each stage writes into
`<out>/<stage>/` and finishes with `done.json` holding the key of its inputs (its config and the keys
of the stages it reads); a stage whose key matches is skipped, so a re-run after a crash resumes at the
first unfinished stage, and training itself resumes from its last Ray Train checkpoint (the run name
is the stage key). MLflow: an experiment per family, a parent run per checkpoint set (found again by
its key), a child run per stage with the resolved config as params, metrics and artifacts; lineage
tags on the parent; the crosscoder registered with an alias. MLFLOW_TRACKING_URI picks a server;
otherwise a local sqlite store under `<out>`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from crossray.attribution import AttributionConfig
from crossray.config import TrainConfig, from_dict, to_dict
from crossray.corpus import CorpusConfig

logger = logging.getLogger(__name__)
STAGES = ("screen", "select", "extract", "train", "evaluate", "attribute", "analyse")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    name: str
    family: str
    """`toy`, a local family folder, or a hub repo."""
    layer: int
    tasks: tuple[str, ...] = ("toy",)
    """Task files or folders; `toy` = the toy family's own tasks."""
    out: str = "runs"
    n_checkpoints: int = 3
    revisions: tuple[str, ...] = ()
    """A user-given checkpoint set (always wins over automatic selection)."""
    screen_revisions: tuple[str, ...] = ()
    """Revisions to screen (default: every local revision; required for hub families)."""
    naming: str | None = None
    tokenizer: str | None = None
    screen_examples: int = 40
    """Examples per task for the activation-similarity screen."""
    eval_sequences: int = 32
    """Held-out sequences (after the training ones) for evaluation."""
    experiment: str = ""
    register_name: str = ""
    alias: str = "champion"
    actors: int = 2
    workers: int = 2
    cpus_per_actor: float = 0.5
    gpus_per_actor: float = 0
    context_sequences: int = 256
    """Extracted sequences scanned for top-activating contexts."""
    context_k: int = 8
    """Top contexts kept per feature, jointly and per checkpoint."""
    context_before: int = 10
    context_after: int = 3


@dataclasses.dataclass(frozen=True)
class Config:
    pipeline: PipelineConfig
    corpus: CorpusConfig
    extract: dict
    train: dict
    attribution: AttributionConfig


def load_config(path: str | Path) -> Config:
    """Parse and validate every section; unknown keys and wrong types name the key and the file."""
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(data) - {"pipeline", "extract", "train", "attribution"})
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}")
    pipe = from_dict(PipelineConfig, data.get("pipeline", {}), f"{path}:pipeline")
    extract = dict(data.get("extract", {}))
    if "corpus" not in extract:
        raise ValueError(f"{path}:extract: missing 'corpus'")
    corpus = from_dict(CorpusConfig, extract.pop("corpus"), f"{path}:extract.corpus")
    for key in ("family", "revisions", "layer"):
        if key in extract:
            raise ValueError(f"{path}:extract.{key}: set it in the pipeline section")
    from crossray.extract import ExtractConfig

    allowed = {f.name for f in dataclasses.fields(ExtractConfig)} - {"family", "revisions", "layer", "corpus"}
    bad = sorted(set(extract) - allowed)
    if bad:
        raise ValueError(f"{path}:extract: unknown key(s) {bad}; allowed: {sorted(allowed)}")
    train = dict(data.get("train", {}))
    cc = dict(train.get("crosscoder", {}))
    for key in ("n_checkpoints", "d_model"):
        cc.setdefault(key, 2)  # placeholders, resolved from the selection and the model
    from_dict(TrainConfig, {**train, "crosscoder": cc}, f"{path}:train")  # validate now
    attribution = from_dict(AttributionConfig, data.get("attribution", {}), f"{path}:attribution")
    return Config(pipe, corpus, extract, train, attribution)


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


class Pipeline:
    def __init__(self, cfg: Config, config_path: str):
        from crossray.checkpoints import resolve_family

        self.cfg, self.p = cfg, cfg.pipeline
        self.out = (Path(self.p.out) / self.p.name).resolve()
        overrides = {k: v for k, v in (("naming", self.p.naming), ("tokenizer", self.p.tokenizer)) if v}
        self.family = resolve_family(self.p.family, **overrides)
        self.config_path = config_path
        self.keys: dict[str, str] = {}
        self.results: dict[str, dict] = {}

    # -- stage bookkeeping -------------------------------------------------------------------------
    def _stage(self, name: str, key: str, fn) -> dict:
        folder = self.out / name
        done = folder / "done.json"
        self.keys[name] = key
        if done.exists() and json.loads(done.read_text()).get("key") == key:
            logger.info("stage %s: done (key %s), skipped", name, key)
            self.results[name] = json.loads(done.read_text())["result"]
            return self.results[name]
        logger.info("stage %s: running (key %s)", name, key)
        from crossray.store import write_json_atomic

        started = folder / "started.json"
        if folder.exists() and (not started.exists() or json.loads(started.read_text())["key"] != key):
            shutil.rmtree(folder)  # outputs of other inputs; a crash of this key keeps its partial work
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(started, {"key": key})
        import mlflow

        with mlflow.start_run(run_name=name, nested=True, tags={"crossray.stage": name,
                                                                 "crossray.stage_key": key}):
            result = fn(folder)
            mlflow.log_artifacts(str(folder), artifact_path=name)
        write_json_atomic(done, {"key": key, "result": result})
        self.results[name] = result
        return result

    def task_specs(self) -> list[str]:
        return [str(Path(self.family.source) / "tasks") if t == "toy" else t for t in self.p.tasks]

    # -- stages ------------------------------------------------------------------------------------
    def _remote(self, fn):
        import ray

        return ray.remote(num_cpus=self.p.cpus_per_actor, num_gpus=self.p.gpus_per_actor)(fn)

    def screen(self, folder: Path) -> dict:
        """Accuracy and activations of every revision in Ray tasks (one revision each)."""
        import mlflow
        import ray

        from crossray.models.layer import load_tokenizer
        from crossray.screen import similarity_matrix
        from crossray.store import write_tables
        from crossray.tasks import load_tasks

        revisions = list(self.p.screen_revisions) or self.family.available_revisions()
        tokenizer = load_tokenizer(self.family, revisions[0])
        texts = [e.clean_prefix + e.clean_answer for t in load_tasks(self.task_specs(), tokenizer)
                 for e in t.examples[: self.p.screen_examples]]
        family, specs, layer = self.family, self.task_specs(), self.p.layer

        def screen_revision(rev: str):
            from crossray.accuracy import accuracy_curves
            from crossray.screen import revision_activations

            rows = accuracy_curves(family, specs, [rev])[0]
            return rows, revision_activations(family, rev, layer, tokenizer, texts)

        task = self._remote(screen_revision)
        parts = ray.get([task.remote(r) for r in revisions])
        rows = [r for part, _ in parts for r in part]
        sim = similarity_matrix([acts for _, acts in parts])
        accuracy: dict[str, list[float]] = {}
        for r in rows:
            accuracy.setdefault(r["task"], []).append(r["prefix_accuracy"])
        for task_name, acc in accuracy.items():  # step = position in the screened revision list
            for i, value in enumerate(acc):
                mlflow.log_metric(f"accuracy/{task_name}", value, step=i)
        write_tables(folder / "tables", {"accuracy": rows}, {"similarity.json": sim.tolist()})
        return {"revisions": revisions, "accuracy": accuracy, "similarity": sim.tolist()}

    def select(self, folder: Path) -> dict:
        import mlflow
        import torch

        from crossray.screen import select_checkpoints

        s = self.results["screen"]
        sel = select_checkpoints(s["revisions"], s["accuracy"], torch.tensor(s["similarity"]),
                                 self.p.n_checkpoints, list(self.p.revisions) or None)
        mlflow.log_params({"revisions": ",".join(sel.revisions)})
        mlflow.set_tag("crossray.selection_reasons", " | ".join(sel.reasons))
        return {"revisions": list(sel.revisions), "reasons": list(sel.reasons)}

    def extract_config(self):
        from crossray.extract import ExtractConfig

        return ExtractConfig(family=self.p.family, revisions=tuple(self.results["select"]["revisions"]),
                             layer=self.p.layer, corpus=self.cfg.corpus, naming=self.p.naming,
                             tokenizer=self.p.tokenizer, **self.cfg.extract)

    def extract(self, folder: Path) -> dict:
        import mlflow

        from jobs.extract import run_extract

        ecfg = self.extract_config()
        mlflow.log_params(_flat({"extract": dataclasses.asdict(ecfg)}))
        m = run_extract(ecfg, folder / "acts", self.p.actors, self.p.cpus_per_actor, self.p.gpus_per_actor)
        mlflow.log_metric("token_count", m.token_count)
        return {"manifest_key": m.key, "acts": str(folder / "acts"), "weight_hashes": m.weight_hashes,
                "corpus_hash": m.corpus_hash, "norm_factors": m.norm_factors, "d_model": m.d_model}

    def train_config(self) -> TrainConfig:
        from crossray.extract import Manifest
        from jobs.train import resolve_with_manifest

        manifest = Manifest.read(self.results["extract"]["acts"])
        cc = {**self.cfg.train.get("crosscoder", {}), "n_checkpoints": len(manifest.revisions),
              "d_model": manifest.d_model}
        cfg = from_dict(TrainConfig, {**self.cfg.train, "crosscoder": cc}, "train")
        return resolve_with_manifest(cfg, manifest)

    def train(self, folder: Path) -> dict:
        import mlflow

        from jobs.train import LaunchConfig, crosscoder_dir, metric_history, run_train

        cfg = self.train_config()
        mlflow.log_params(_flat({"train": to_dict(cfg)}))
        launch = LaunchConfig(storage_path=str(folder / "ray"), name=f"train-{self.keys['train']}",
                              num_workers=self.p.workers, cpus_per_worker=self.p.cpus_per_actor,
                              use_gpu=self.p.gpus_per_actor > 0)
        result = run_train(cfg, launch, self.results["extract"]["norm_factors"],
                           data=self.results["extract"]["acts"])
        for row in metric_history(result):  # every metrics_every steps
            for k, v in row.items():
                if isinstance(v, int | float) and k not in ("step", "resumed_from_step"):
                    mlflow.log_metric(k, float(v), step=int(row.get("step", 0)))
        shutil.copytree(crosscoder_dir(result), folder / "crosscoder", dirs_exist_ok=True)
        shutil.rmtree(folder / "ray", ignore_errors=True)  # checkpoints no longer needed once done
        return {"crosscoder": str(folder / "crosscoder"), "final": dict(result.metrics or {})}

    def evaluate(self, folder: Path) -> dict:
        """FVE, L0, dead latents and spliced ΔCE on held-out sequences, in a Ray task."""
        import mlflow
        import ray

        from crossray.extract import Manifest

        ecfg = self.extract_config()
        n_train = Manifest.read(self.results["extract"]["acts"]).n_sequences
        family, crosscoder, n_eval = self.family, self.results["train"]["crosscoder"], self.p.eval_sequences

        def run_evaluation() -> dict:
            from crossray.corpus import load_sequences
            from crossray.extract import CheckpointSetExtractor
            from crossray.metrics import evaluate, spliced_ce
            from crossray.models.layer import load_tokenizer
            from crossray.store import load_crosscoder

            corpus = dataclasses.replace(ecfg.corpus, n_sequences=n_train + n_eval)
            tokens, _ = load_sequences(corpus, load_tokenizer(family, ecfg.revisions[0]))
            held_out = tokens[n_train:]
            if len(held_out) == 0:
                raise ValueError("the corpus has no sequence left after the training ones for evaluation")
            extractor = CheckpointSetExtractor(ecfg)
            acts = extractor(held_out)
            start = 1 if ecfg.corpus.drop_first_position else 0
            cc = load_crosscoder(crosscoder)
            metrics = evaluate(cc, acts[:, start:].reshape(-1, *acts.shape[2:]))
            ce = spliced_ce(cc, extractor.models, held_out[: min(8, len(held_out))], skip_first_position=True)
            for c in range(len(ecfg.revisions)):
                metrics[f"delta_ce/{c}"] = float(ce.delta_ce_C[c])
                metrics[f"ce_recovered/{c}"] = float(ce.ce_recovered_C[c])
            return metrics

        try:
            metrics = ray.get(self._remote(run_evaluation).remote())
        except ray.exceptions.RayTaskError as e:
            raise e.as_instanceof_cause() from None
        for c, rev in enumerate(ecfg.revisions):
            mlflow.log_metric(f"fve_{rev}", metrics[f"fve/{c}"])
            mlflow.log_metric(f"delta_ce_{rev}", metrics[f"delta_ce/{c}"])
        mlflow.log_metrics({"fve": metrics["fve"], "l0": metrics["l0"], "dead": metrics["dead"]})
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics

    def attribute(self, folder: Path) -> dict:
        import mlflow

        from jobs.attribute import run_attribute

        mlflow.log_params(_flat({"attribution": dataclasses.asdict(self.cfg.attribution)}))
        summary = run_attribute(self.results["train"]["crosscoder"], self.family, self.task_specs(),
                                folder / "effects", self.cfg.attribution, self.p.actors,
                                self.p.cpus_per_actor, self.p.gpus_per_actor)
        for task, info in summary["tasks"].items():
            if "ablation" in info:
                mlflow.log_metric(f"ablation_rho_relie/{task}", info["ablation"]["mean_rho_relie"])
        return {"effects": str(folder / "effects"), "tasks": summary["tasks"]}

    def analyse(self, folder: Path) -> dict:
        import pandas as pd
        import torch

        from crossray import analysis as A
        from crossray import plots
        from crossray.store import load_crosscoder, write_tables

        cc = load_crosscoder(self.results["train"]["crosscoder"])
        revs = list(cc.cfg.checkpoints)
        rows = A.feature_rows(cc)
        groups = [row["group"] for row in rows]
        reldec = torch.tensor([[row[f"reldec/{r}"] for r in revs] for row in rows])
        write_tables(folder / "tables", {"features": rows, "top_contexts": self.context_rows(cc)})
        s = self.results["screen"]
        plots.accuracy_curves(s["revisions"], s["accuracy"], revs, folder / "accuracy_curves.png")
        plots.reldec_histogram(reldec, revs, folder / "reldec_histogram.png")
        effects = pd.read_parquet(Path(self.results["attribute"]["effects"]) / "effects.parquet")
        counts = {}
        for task, info in self.results["attribute"]["tasks"].items():
            sel = info["selected"]
            if not sel:
                continue
            sub = effects[(effects.task == task) & effects.feature.isin(sel)]
            ie = torch.tensor(sub.pivot(index="checkpoint_index", columns="feature", values="ie").values,
                              dtype=torch.float32)  # (C, F)
            share = A.one_vs_all(ie.T).share_LC
            plots.relie_scatter(share, revs, folder / f"relie_{task}.png")
            top = ie.abs().max(0).values.topk(min(8, ie.shape[1])).indices
            plots.ie_evolution(ie[:, top], [sel[i] for i in top.tolist()], revs,
                               folder / f"ie_evolution_{task}.png")
            counts[task] = pd.Series(A.group_labels(share, revs)).value_counts().to_dict()
        return {"groups_by_reldec": pd.Series(groups).value_counts().to_dict(), "groups_by_relie": counts}

    def context_rows(self, cc) -> list[dict]:
        """Top-activating contexts per feature (joint and per checkpoint) over the first extracted
        sequences, with each window's tokens and scores."""
        import functools

        from crossray.analysis import shard_contexts
        from crossray.corpus import load_sequences
        from crossray.extract import Manifest
        from crossray.models.layer import load_tokenizer

        acts = self.results["extract"]["acts"]
        manifest = Manifest.read(acts)
        n_seq = min(self.p.context_sequences, manifest.n_sequences)
        paths = [p for p, s in zip(manifest.shard_paths(acts), manifest.shards, strict=True)
                 if s["seq_start"] < n_seq]
        ecfg = self.extract_config()
        tokenizer = load_tokenizer(self.family, ecfg.revisions[0])
        tokens, _ = load_sequences(dataclasses.replace(ecfg.corpus, n_sequences=n_seq), tokenizer)
        decode = functools.lru_cache(maxsize=None)(lambda t: tokenizer.decode([t]))
        return shard_contexts(cc, paths, n_seq, tokens, decode, self.p.context_k, self.p.context_before,
                              self.p.context_after)

    # -- the run -----------------------------------------------------------------------------------
    def run(self) -> dict:
        import mlflow

        experiment = self.p.experiment or f"crossray-{self.family.name}"
        if mlflow.get_experiment_by_name(experiment) is None:
            local = not mlflow.get_tracking_uri().startswith(("http", "databricks"))
            mlflow.create_experiment(experiment, artifact_location=(self.out.parent / "mlartifacts").resolve()
                                     .as_uri() if local else None)
        mlflow.set_experiment(experiment)
        run_key = _key(dataclasses.asdict(self.p), dataclasses.asdict(self.cfg.corpus), self.cfg.extract,
                       self.cfg.train, dataclasses.asdict(self.cfg.attribution))
        existing = mlflow.search_runs(filter_string=f"tags.`crossray.pipeline_key` = '{run_key}'",
                                      output_format="list")
        parent_id = existing[0].info.run_id if existing else None
        with mlflow.start_run(run_id=parent_id, run_name=self.p.name,
                              tags=None if parent_id else {"crossray.pipeline_key": run_key}) as parent:
            mlflow.set_tags({"crossray.family": self.family.name, "crossray.layer": str(self.p.layer),
                             "crossray.config": self.config_path})
            k = _key(run_key, "screen")
            self._stage("screen", k, self.screen)
            k = _key(k, "select", list(self.p.revisions), self.p.n_checkpoints)
            self._stage("select", k, self.select)
            k = _key(k, dataclasses.asdict(self.cfg.corpus), self.cfg.extract)
            ex = self._stage("extract", k, self.extract)
            mlflow.set_tags({"crossray.revisions": ",".join(self.results["select"]["revisions"]),
                             "crossray.weight_hashes": ",".join(ex["weight_hashes"]),
                             "crossray.corpus_hash": ex["corpus_hash"],
                             "crossray.manifest": ex["manifest_key"]})
            k = _key(k, self.cfg.train)
            self._stage("train", k, self.train)
            self._stage("evaluate", _key(k, "evaluate", self.p.eval_sequences), self.evaluate)
            ka = _key(k, dataclasses.asdict(self.cfg.attribution), self.p.tasks)
            self._stage("attribute", ka, self.attribute)
            self._stage("analyse", _key(ka, "analyse"), self.analyse)
            self.register(parent.info.run_id)
        return self.results

    def register(self, parent_id: str) -> None:
        """Register the crosscoder (the train stage's artifact) under an alias, once per train key."""
        import mlflow
        from mlflow import MlflowClient

        client = MlflowClient()
        name = self.p.register_name or f"crossray-{self.family.name}-{self.p.name}"
        train_runs = mlflow.search_runs(filter_string=f"tags.`crossray.stage_key` = '{self.keys['train']}'",
                                        output_format="list")
        if not train_runs:
            return
        run = train_runs[0]
        source = f"{run.info.artifact_uri}/train/crosscoder"
        with contextlib.suppress(Exception):  # the registered model may exist already
            client.create_registered_model(name)
        versions = [v for v in client.search_model_versions(f"name = '{name}'") if v.source == source]
        version = versions[0] if versions else client.create_model_version(name, source,
                                                                            run_id=run.info.run_id)
        client.set_registered_model_alias(name, self.p.alias, version.version)
        mlflow.set_tag("crossray.registered_model", f"models:/{name}@{self.p.alias}")
        self.results["registered"] = {"name": name, "version": version.version, "alias": self.p.alias}
        self.results["parent_run_id"] = parent_id


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if not isinstance(v, list | tuple) else ",".join(map(str, v))
    return out


def summary_text(results: dict) -> str:
    ev, sel = results["evaluate"], results["select"]["revisions"]
    lines = ["checkpoint      FVE     ΔCE"]
    for c, rev in enumerate(sel):
        lines.append(f"{rev:12s} {ev[f'fve/{c}']:7.3f} {ev[f'delta_ce/{c}']:7.3f}")
    lines.append(f"L0 {ev['l0']:.1f}, dead latents {ev['dead']}")
    lines.append(f"features by decoder-norm group: {results['analyse']['groups_by_reldec']}")
    for task, info in results["attribute"]["tasks"].items():
        rho = info.get("ablation", {}).get("mean_rho_relie")
        groups = results["analyse"]["groups_by_relie"].get(task, {})
        lines.append(f"{task}: {len(info['selected'])} top features by RelIE, groups {groups}, "
                     f"ablation rho {rho if rho is None else round(rho, 3)}")
    if "registered" in results:
        r = results["registered"]
        lines.append(f"crosscoder: models:/{r['name']}@{r['alias']} (version {r['version']}), "
                     f"MLflow parent run {results['parent_run_id']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="The crossray pipeline for one checkpoint set")
    p.add_argument("--config", required=True)
    p.add_argument("--address", default=None, help="Ray address (default: start or join a local one)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        cfg = load_config(args.config)
        if "MLFLOW_TRACKING_URI" not in os.environ:
            db = (Path(cfg.pipeline.out) / "mlflow.db").resolve()
            db.parent.mkdir(parents=True, exist_ok=True)
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
        uri = check_tracking()
        pipeline = Pipeline(cfg, args.config)
    except (ValueError, OSError) as e:
        print(f"crossray: error: {e}", file=sys.stderr)
        return 2
    from jobs._ray import init_ray

    init_ray(args.address)
    try:
        results = pipeline.run()
    except ValueError as e:
        print(f"crossray: error: {e}", file=sys.stderr)
        return 2
    print(summary_text(results))
    print(f"MLflow: {uri}, experiment {cfg.pipeline.experiment or 'crossray-' + pipeline.family.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
