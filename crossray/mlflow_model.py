"""The crosscoder as an MLflow model: `mlflow.pyfunc.load_model(uri).predict(x)`.

A pyfunc model of the loader-module kind: the model folder holds the crosscoder's
`weights.safetensors` and `config.json` (no pickle anywhere), and this module loads them. `predict`
takes raw residual activations, shape (rows, C, D) before normalisation, and returns the feature
activations (rows, L) of the crosscoder's eval mode, exactly `encode(normalise(x))`. The signature
records both shapes. Loading needs crossray importable (installed) in the loading environment.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from crossray.store import CONFIG, CROSSCODER, WEIGHTS, load_crosscoder

PYFUNC_NAME = "crosscoder"


class CrosscoderPredictor:
    """What `mlflow.pyfunc.load_model` wraps: raw activations in, feature activations out."""

    def __init__(self, folder: str | Path):
        self.cc = load_crosscoder(folder).eval().requires_grad_(False)

    def predict(self, model_input, params: dict | None = None) -> np.ndarray:
        x_BCD = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.cc.encode(self.cc.normalise(x_BCD), mode="eval").numpy()


def _load_pyfunc(data_path: str) -> CrosscoderPredictor:
    """MLflow's entry point for the loader-module flavor."""
    return CrosscoderPredictor(data_path)


def log_crosscoder(folder: str | Path, name: str = PYFUNC_NAME):
    """Log the crosscoder in `folder` as a pyfunc model of the active run; returns MLflow's ModelInfo."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    cfg = load_crosscoder(folder).cfg
    C, D, L = cfg.n_checkpoints, cfg.d_model, cfg.n_latents
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, C, D))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, L))]))
    with tempfile.TemporaryDirectory() as tmp:  # weights and config only, not the training state
        data = Path(tmp) / CROSSCODER
        data.mkdir()
        for f in (WEIGHTS, CONFIG):
            shutil.copy(Path(folder) / f, data / f)
        return mlflow.pyfunc.log_model(
            name=name, loader_module=__name__, data_path=str(data), signature=signature,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "safetensors", "numpy"])
