"""The run layout, and crosscoder artifacts and training state on disk: safetensors + JSON, never pickle.

`RunLayout` is the one place that spells a run folder's stage folders, tables, files and column
names; the pipeline writes through it and the readers (`results`, `live`, the Serve app) read through
it. A crosscoder artifact folder:

    <dir>/weights.safetensors   parameters and buffers (W_enc_CDL, W_dec_LCD, ..., norm_factors_C)
    <dir>/config.json           {"crosscoder": CrosscoderConfig, "train": TrainConfig | null, "meta": {...}}
    <dir>/train_state.safetensors + train_state.json
                                optimizer moments, RNG state, step, tokens, data position, dead counters

Writes go to a temporary folder renamed into place, so a crash never leaves half an artifact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from crossray.config import CrosscoderConfig, TrainConfig
from crossray.models.crosscoder import Crosscoder
from crossray.schema import from_dict, to_dict

WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
STATE = "train_state.safetensors"
STATE_META = "train_state.json"


STAGES = ("screen", "select", "extract", "train", "evaluate", "attribute", "analyse")
"""The pipeline's stages, in order; each has a folder `<run>/<stage>/`."""
DONE, STARTED = "done.json", "started.json"
"""Stage bookkeeping: the key a stage ran under (started), and its key, result and MLflow run (done)."""
TRACKING_DB = "mlflow.db"
"""The local MLflow store beside the runs, when no tracking server is named."""
LOCAL_ARTIFACTS = "mlartifacts"
EFFECTS, SUMMARY = "effects", "summary.json"
"""The attribution output folder's table (`effects.parquet/.csv`) and per-task summaries."""
FEATURES, CONTEXTS, ACCURACY = "features", "top_contexts", "accuracy"
SIMILARITY = "similarity.json"
"""The screen's activation similarity between every pair of screened revisions."""
TRAIN_HISTORY, STREAM_POSITION = "metrics.json", "stream_position.json"
"""A Train checkpoint's metrics history and stream position (beside its `crosscoder` folder)."""
CROSSCODER = "crosscoder"
SHARED_STAGES = ("screen", "select", "extract")
"""A study's stages run once for all its sets (in the study folder)."""
STUDY_LINK = "study.json"
"""In a study set's folder: {"study": name, "root": the study folder, relative}; its shared stages
live there."""
NEVER_UPLOADED_DIRS = ("acts", "ray")
"""Stage sub-folders never uploaded to MLflow: activation shards and Ray Train checkpoints."""
NEVER_UPLOADED_FILES = (STARTED, DONE, STATE, STATE_META)


def column(metric: str, revision: str) -> str:
    """The one naming scheme of per-checkpoint (or per-pair, per-task) columns and metrics, everywhere:
    `fve/step128`, `relie/main`, `relie_pair/step512-main` and its 0/0 flag `relie_pair_all_zero/...`,
    `ablation_rho/<task>`."""
    return f"{metric}/{revision}"


def column_suffix(name: str, metric: str) -> str | None:
    """The revision or pair a column names (`relie_pair/a-b` -> `a-b`), None for another metric's."""
    head, sep, tail = name.partition("/")
    return tail if sep and head == metric else None


def suffixes(columns, metric: str) -> list[str]:
    """The revisions or pairs that one metric's columns name, in order."""
    return [s for c in columns if (s := column_suffix(str(c), metric)) is not None]


def all_zero_column(name: str) -> str:
    """The 0/0 flag beside a pairwise share column: `relie_pair/a-b` -> `relie_pair_all_zero/a-b`."""
    metric, _, pair = name.partition("/")
    return column(f"{metric}_all_zero", pair)


def table(folder: str | Path, name: str) -> Path:
    """A result table written by `write_tables`: `<folder>/<name>.parquet`."""
    return Path(folder) / f"{name}.parquet"


class RunLayout:
    """One run folder `<out>/<name>/`: a property per stage folder, table, file and lock. A study's
    set lives in `<study>/sets/<set>/` and finds the shared stages in the study folder (`STUDY_LINK`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        link = self.root / STUDY_LINK
        self.shared = (self.root / json.loads(link.read_text())["root"]).resolve() if link.exists() else None

    @classmethod
    def of(cls, out: str | Path, name: str) -> RunLayout:
        return cls(run_folder(out, name))

    def stage(self, name: str) -> Path:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; the stages are {', '.join(STAGES)}")
        return (self.shared if self.shared is not None and name in SHARED_STAGES else self.root) / name

    # a study
    def set_root(self, name: str) -> Path:
        """The folder of the study set `name`."""
        return run_folder(self.root / "sets", name)

    def link_set(self, name: str, study: str) -> RunLayout:
        """The layout of study set `name`, its folder linked to this (the study's) folder."""
        root = self.set_root(name)
        root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(root / STUDY_LINK, {"study": study, "root": os.path.relpath(self.root, root)})
        return RunLayout(root)

    @property
    def study_tables(self) -> Path:
        return self.root / "study"

    @property
    def study_report(self) -> Path:
        return self.study_tables / "study.html"

    @property
    def study_summary(self) -> Path:
        return self.study_tables / SUMMARY

    def timeline_plot(self, task: str) -> Path:
        return self.study_tables / f"timeline_{task}.png"

    def done(self, stage: str) -> Path:
        return self.stage(stage) / DONE

    def started(self, stage: str) -> Path:
        return self.stage(stage) / STARTED

    @property
    def config(self) -> Path:
        """The resolved config the run was started with (live queries read the family from it)."""
        return self.root / CONFIG

    @property
    def tracking_db(self) -> Path:
        return self.root.parent / TRACKING_DB

    @property
    def local_artifacts(self) -> Path:
        return self.root.parent / LOCAL_ARTIFACTS

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    # screen
    @property
    def screen_tables(self) -> Path:
        return self.stage("screen") / "tables"

    @property
    def accuracy(self) -> Path:
        return table(self.screen_tables, ACCURACY)

    # extract, train, evaluate
    @property
    def acts(self) -> Path:
        return self.stage("extract") / "acts"

    @property
    def train_storage(self) -> Path:
        """Ray Train's storage for this run's checkpoints (removed when training is done)."""
        return self.stage("train") / "ray"

    @property
    def crosscoder(self) -> Path:
        return self.stage("train") / CROSSCODER

    @property
    def stream_position(self) -> Path:
        return self.stage("train") / STREAM_POSITION

    @property
    def eval_metrics(self) -> Path:
        return self.stage("evaluate") / "metrics.json"

    # attribute
    @property
    def effects_folder(self) -> Path:
        return self.stage("attribute") / EFFECTS

    @property
    def effects(self) -> Path:
        return table(self.effects_folder, EFFECTS)

    @property
    def summary(self) -> Path:
        return self.effects_folder / SUMMARY

    # analyse
    @property
    def analyse_tables(self) -> Path:
        return self.stage("analyse") / "tables"

    @property
    def features(self) -> Path:
        return table(self.analyse_tables, FEATURES)

    @property
    def contexts(self) -> Path:
        return table(self.analyse_tables, CONTEXTS)

    @property
    def report(self) -> Path:
        return self.stage("analyse") / "report.html"

    def relative(self, path: Path) -> str:
        """A path inside the run folder as a relative POSIX path (MLflow artifact paths)."""
        return path.relative_to(self.root).as_posix()


def run_folder(out: str | Path, name: str) -> Path:
    """A run's folder, `<out>/<name>`, resolved; it must lie inside `out` (the name is checked as a
    `schema.Name` when the config loads: this is the last guard, for names that never went through it)."""
    root = Path(out).expanduser().resolve()
    folder = (root / name).resolve()
    if folder.parent != root:
        raise ValueError(f"run name {name!r} does not name a folder inside pipeline.out {str(root)!r}")
    return folder


class ArtifactError(ValueError):
    """An artifact folder that does not hold what its config says."""


def _atomic_dir(folder: Path):
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, folder: Path) -> None:
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON next to `path` and rename it into place (readers never see half a file)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2, allow_nan=True))
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file behind
        raise


def write_tables(folder: str | Path, tables: dict[str, list[dict]], json_files: dict | None = None
                 ) -> Path:
    """Result tables as `<name>.parquet` and `<name>.csv`, plus JSON files, in one atomic folder."""
    import pandas as pd

    folder = Path(folder)
    tmp = _atomic_dir(folder)
    for name, rows in tables.items():
        df = pd.DataFrame(rows)
        df.to_parquet(tmp / f"{name}.parquet", index=False)
        df.to_csv(tmp / f"{name}.csv", index=False)
    for name, obj in (json_files or {}).items():
        (tmp / name).write_text(json.dumps(obj, indent=2, allow_nan=True))
    _commit(tmp, folder)
    return folder


def save_crosscoder(cc: Crosscoder, folder: str | Path, train_cfg: TrainConfig | None = None,
                    meta: dict | None = None, extra: Callable[[Path], None] | None = None) -> Path:
    """Write weights + config atomically; `extra(tmp_folder)` adds files (the training state)."""
    folder = Path(folder)
    tmp = _atomic_dir(folder)
    tensors = {k: v.detach().contiguous().cpu() for k, v in cc.state_dict().items()}
    save_file(tensors, tmp / WEIGHTS)
    config = {"crosscoder": to_dict(cc.cfg), "train": to_dict(train_cfg) if train_cfg else None,
              "meta": meta or {}}
    (tmp / CONFIG).write_text(json.dumps(config, indent=2))
    if extra is not None:
        extra(tmp)
    _commit(tmp, folder)
    return folder


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG
    if not path.exists():
        raise ArtifactError(f"{path} does not exist")
    return json.loads(path.read_text())


def load_crosscoder(folder: str | Path, device: str | torch.device = "cpu") -> Crosscoder:
    """Load weights + config; refuse any mismatch between them, naming the tensor."""
    folder = Path(folder)
    cfg = from_dict(CrosscoderConfig, read_config(folder)["crosscoder"], f"{folder}/{CONFIG}")
    cc = Crosscoder(cfg)
    weights = load_file(folder / WEIGHTS, device="cpu")
    expected = cc.state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ArtifactError(f"{folder}: weights do not match config.json "
                            f"(missing {missing}, unexpected {unexpected})")
    for name, t in weights.items():
        if t.shape != expected[name].shape:
            raise ArtifactError(f"{folder}: tensor {name} has shape {tuple(t.shape)} but config.json "
                                f"implies {tuple(expected[name].shape)}")
    cc.load_state_dict(weights)
    return cc.to(device)


def load_train_config(folder: str | Path) -> TrainConfig | None:
    data = read_config(folder).get("train")
    return from_dict(TrainConfig, data, f"{folder}/{CONFIG}:train") if data else None


# -- training state -------------------------------------------------------------------------------

def write_train_state(path_base: Path, optimizer: torch.optim.Optimizer,
                      scheduler: torch.optim.lr_scheduler.LRScheduler, scalars: dict,
                      tensors: dict[str, torch.Tensor]) -> None:
    """Optimizer moments and RNG as safetensors; everything else as JSON."""
    opt = optimizer.state_dict()
    out = {f"optim.{i}.{k}": v.detach().contiguous().cpu()
           for i, s in opt["state"].items() for k, v in s.items() if torch.is_tensor(v)}
    out["rng.torch"] = torch.get_rng_state()
    out.update({f"state.{k}": v.detach().contiguous().cpu() for k, v in tensors.items()})
    save_file(out, path_base / STATE)
    meta = {"param_groups": opt["param_groups"], "scheduler": scheduler.state_dict(),
            "rng_python": list(_jsonable(random.getstate())), **scalars}
    (path_base / STATE_META).write_text(json.dumps(meta))


def read_train_state(folder: str | Path, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler) -> tuple[dict, dict]:
    """Restore optimizer, scheduler and RNG in place; return (scalars, named tensors)."""
    folder = Path(folder)
    if not (folder / STATE).exists():
        raise ArtifactError(f"{folder} holds no training state ({STATE})")
    tensors = load_file(folder / STATE)
    meta = json.loads((folder / STATE_META).read_text())
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = t
    optimizer.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    scheduler.load_state_dict(meta.pop("scheduler"))
    torch.set_rng_state(tensors["rng.torch"])
    random.setstate(_tuplify(meta.pop("rng_python")))
    named = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
    return meta, named


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, tuple | list) else x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x
