"""Crosscoder artifacts and training state on disk: safetensors + JSON, never pickle.

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


def run_folder(out: str | Path, name: str) -> Path:
    """A run's folder, `<out>/<name>`, resolved; it must lie inside `out` (the name is checked as a
    `schema.Name` when the config loads: this is the last guard, for names that never went through it)."""
    root = Path(out).expanduser().resolve()
    folder = (root / name).resolve()
    if folder.parent != root:
        raise ValueError(f"run name {name!r} does not name a folder inside pipeline.out {str(root)!r}")
    return folder


def metric_name(metric: str, revision: str) -> str:
    """The one naming scheme of per-checkpoint metrics, everywhere: `fve/step128`."""
    return f"{metric}/{revision}"


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
