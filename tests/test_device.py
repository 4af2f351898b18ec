"""One device rule: every model, extractor and crosscoder a stage or actor uses goes to the device Ray
gave its task (`rayenv.compute_device`: the reserved GPU, else the CPU), and never silently to the CPU.

The stage functions and actors are handed a device that works on this machine but is spelt apart from
the CPU default ("cpu:0"), and every model and crosscoder they load is watched: one that ignores the
device it was handed, or names its own, loads on "cpu" and fails the test. (On the code before the
rule, the evaluation, screening and context-scan functions took no device at all.)"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HANDED = "cpu:0"


@pytest.fixture
def loads(monkeypatch):
    """Every checkpoint and crosscoder loaded, with the device it was asked for."""
    from crossray import store
    from crossray.models import layer

    seen: list[tuple[str, str]] = []
    load_model, load_crosscoder = layer.load_model, store.load_crosscoder

    def model(family, revision, dtype=torch.float32, *, device):
        seen.append((f"model {revision}", str(device)))
        return load_model(family, revision, dtype, device=device)

    def crosscoder(folder, device="cpu"):
        seen.append(("crosscoder", str(device)))
        return load_crosscoder(folder, device)

    monkeypatch.setattr(layer, "load_model", model)
    monkeypatch.setattr(store, "load_crosscoder", crosscoder)
    from jobs import attribute  # (imported by name there)

    monkeypatch.setattr(attribute, "load_crosscoder", crosscoder)
    return seen


@pytest.fixture
def saved_crosscoder(toy_extract_cfg, tmp_path):
    from crossray.config import CrosscoderConfig
    from crossray.models.crosscoder import Crosscoder
    from crossray.store import save_crosscoder

    cc = Crosscoder(CrosscoderConfig(n_checkpoints=3, d_model=64, n_latents=32, seed=0,
                                     revisions=toy_extract_cfg.revisions, layer=2))
    save_crosscoder(cc, tmp_path / "cc")
    return str(tmp_path / "cc")


def test_the_device_rule(monkeypatch):
    from rayenv import planned_device, task_device

    assert planned_device(0) == task_device(0) == "cpu" and planned_device(0.25) == "cuda"
    if not torch.cuda.is_available():  # a GPU reserved that torch cannot use: named, never the CPU
        with pytest.raises(RuntimeError, match="sees no CUDA device: install a CUDA build of torch"):
            task_device(1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert task_device(0.5) == "cuda"


def test_stage_functions_load_everything_on_the_device_they_are_handed(loads, toy_dir, toy_family,
                                                                       toy_extract_cfg, saved_crosscoder):
    from crossray.config import AnalysisConfig, EvaluateConfig
    from crossray.pipeline import stages as S

    task = [str(toy_dir / "tasks" / "simple_agreement.jsonl")]
    texts = S.screen_texts(toy_family, "step0", task, 4)
    rows, acts = S.screen_revision(toy_family, task, "step128", 2, texts, device=HANDED)
    assert rows and acts.device.type == "cpu"
    held_out = np.random.default_rng(0).integers(0, 50, (2, 16))
    metrics = S.evaluate(toy_extract_cfg, saved_crosscoder, held_out, EvaluateConfig(eval_sequences=2),
                         device=HANDED).metrics
    assert "delta_ce/step1000" in metrics and "fve/step0" in metrics
    streamed = S.ExtractResult(None, "key", [], "", [1.0, 1.0, 1.0], 64, 2, 0, "stream")
    contexts = S.top_contexts(saved_crosscoder, streamed, toy_extract_cfg, AnalysisConfig(), held_out,
                              device=HANDED)
    assert contexts
    assert {what.split()[0] for what, _ in loads} == {"model", "crosscoder"}
    assert [x for x in loads if x[1] != HANDED] == [], "loaded somewhere else than the device handed"


def test_actors_load_everything_on_the_device_ray_gave_them(loads, monkeypatch, toy_family,
                                                           toy_extract_cfg, saved_crosscoder):
    """The attribution and stream-extraction actors put their models where `compute_device` says."""
    from jobs import attribute, extract

    asked = []

    def compute_device(num_gpus):
        asked.append(num_gpus)
        return HANDED

    monkeypatch.setattr(attribute, "compute_device", compute_device)
    monkeypatch.setattr(extract, "compute_device", compute_device)
    attribute.AttributionActor(saved_crosscoder, toy_family, list(toy_extract_cfg.revisions), 2, num_gpus=0.5)
    extract.RowExtractor(toy_extract_cfg, None, None, num_gpus=0.5)
    assert asked == [0.5, 0.5] and len(loads) == 1 + 3 + 3
    assert [x for x in loads if x[1] != HANDED] == []


def test_the_pipelines_ray_tasks_hand_their_device_to_the_work(ray_cluster):
    """`RayBackend.map` runs each function on the device of its task and says which."""
    from types import SimpleNamespace

    from crossray.config import EvaluateConfig, LaunchConfig
    from jobs.pipeline import RayBackend

    def where(x, *, device):
        return x * 2, str(device), torch.get_num_threads()

    def backend(**launch):
        return RayBackend(SimpleNamespace(launch=LaunchConfig(**launch), evaluate=EvaluateConfig()))

    cpu = backend()  # (half a CPU each, as the launch defaults)
    assert cpu.map(where, [(1,), (2,)]) == [((2, "cpu", 1), "cpu"), ((4, "cpu", 1), "cpu")]
    assert cpu.device("actors") == cpu.device("workers") == "cpu"
    gpu = backend(gpus_per_actor=1, gpus_per_worker=0.5)
    assert gpu.device("actors") == gpu.device("workers") == "cuda"


def test_only_crossrays_workers_import_torch(ray_cluster):
    """The job's setup hook imports torch (one thread) in the workers `torch_worker` marks, and not in
    the others, where Ray runs its own actors (a Train run's controller and helpers)."""
    import ray

    from rayenv import torch_worker

    def probe():  # pickled by value: unpickling it imports no test module (and so no torch)
        import sys

        torch = sys.modules.get("torch")
        return torch is not None, torch.get_num_threads() if torch else None

    plain = ray.remote(num_cpus=0.5)(probe)
    marked = ray.remote(num_cpus=0.5, runtime_env=torch_worker())(probe)
    assert ray.get(plain.remote()) == (False, None)
    assert ray.get(marked.remote()) == (True, 1)


MODEL_LOADERS = {"load_model", "load_layer_model", "CheckpointSetExtractor", "accuracy_curves",
                 "revision_activations"}
ALLOWED = {("crossray/cli.py", "load_model")}
"""`crossray checkpoints check` loads a model for its blocks and width only."""


def test_no_model_is_loaded_on_a_device_written_into_the_code():
    """Every call that loads checkpoints names its device, and none in crossray/, jobs/ or serve/ writes
    one down: it comes from the task (`compute_device`) or the caller."""
    found = []
    for folder in ("crossray", "jobs", "serve"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call):
                    continue
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                owner = getattr(getattr(node.func, "value", None), "id", None)
                if name not in MODEL_LOADERS or (rel, name) in ALLOWED or owner == "plots":  # (a chart)
                    continue
                device = [k.value for k in node.keywords if k.arg == "device"]
                if name == "CheckpointSetExtractor" and len(node.args) > 1:
                    device.append(node.args[1])
                found.append((rel, node.lineno, name))
                assert device, f"{rel}:{node.lineno}: {name} without a device"
                assert not isinstance(device[0], ast.Constant), f"{rel}:{node.lineno}: {name} on a set device"
    assert len(found) >= 10, found  # the call sites are still seen
