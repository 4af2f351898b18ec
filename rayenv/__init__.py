"""The Ray environment every crossray process shares, below both the jobs and the Serve app: starting
or joining Ray, the worker setup hook, and a task's torch device and threads."""

from __future__ import annotations

import os

import ray

TORCH_WORKER = "CROSSRAY_TORCH_WORKER"
"""Set (to "1") in the environment of the workers that run crossray's torch code: the setup hook
imports torch there, and only there."""


def runtime_env(env_vars: dict[str, str] | None = None) -> dict:
    """The runtime env of every crossray job (merged with a submitted job's own): the worker setup
    hook, and Ray Train's controller polling its workers every 0.25 s unless
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S says otherwise.

    NOTE: a Train worker's report with a checkpoint waits for the controller's next poll (every 2 s
    by default): 15 checkpoints of a 400-step toy run cost 28 s of 49.
    """
    interval = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    return {"worker_process_setup_hook": "rayenv.import_torch",
            "env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": interval, **(env_vars or {})}}


def torch_worker() -> dict:
    """The runtime env of a task, actor, Train worker or replica that runs crossray's torch code (its
    `runtime_env` option; Ray merges it into the job's): marks its worker for `import_torch`. Ray's own
    actors (a Train run's controller, synchronisation, placement-group and preemption actors, Ray
    Data's coordinators) run without it, in workers that never import torch.

    NOTE: Ray ignores a `worker_process_setup_hook` given to a task or actor (only the job's runs),
    hence an environment variable the job's hook reads. Importing torch in every worker cost 1.5
    CPU-seconds and about as much wall time for each of Ray's own actors, six or more per Train run
    (2.6 CPU-s per actor start with torch, 1.1 without, on 2 cores)."""
    return {"env_vars": {TORCH_WORKER: "1"}}


def import_torch() -> None:
    """Worker setup hook: in a worker marked by `torch_worker`, import torch once, before any task
    runs, with one intra-op thread; elsewhere nothing.

    NOTE: a Ray worker imports the remote functions and classes it is sent in a background thread
    while its main thread runs a task; two threads importing torch at once leave one of them with a
    partially initialised torch ("module 'torch' has no attribute 'distributed'"), which failed a
    fresh cluster's extraction when a task imported torch lazily. Ray sets OMP_NUM_THREADS for a task
    only after this hook, too late for torch's thread pool: left alone, every worker ran as many
    threads as the machine has cores (four 0.5-CPU screening tasks on 2 cores took 15 s each instead
    of 1.7 s). Tasks and actors that compute call `use_assigned_cpus`.
    """
    if os.environ.get(TORCH_WORKER) != "1":
        return
    import torch

    torch.set_num_threads(1)


def use_assigned_cpus() -> None:
    """As many torch threads as the CPUs Ray assigned this task or actor (at least one)."""
    import math

    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU") or 1
    torch.set_num_threads(max(1, math.floor(cpus)))


def planned_device(num_gpus: float) -> str:
    """The one device rule: "cuda" for a task, actor, Train worker or replica that reserved a GPU
    (`num_gpus` > 0; Ray sets CUDA_VISIBLE_DEVICES to it), else "cpu". Where the work runs,
    `task_device` holds it to that; the driver reads it to record where a stage ran."""
    return "cuda" if num_gpus > 0 else "cpu"


def task_device(num_gpus: float) -> str:
    """`planned_device`, checked where the work runs: a GPU reserved but unusable (a CPU build of torch,
    no driver) is an error naming the cause, never a silent run on the CPU."""
    if num_gpus <= 0:
        return planned_device(num_gpus)
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"Ray gave this task {num_gpus:g} GPU(s) (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}) but torch {torch.__version__} "
                           f"sees no CUDA device: install a CUDA build of torch on the GPU nodes, or set the "
                           f"launch section's GPUs to 0")
    return planned_device(num_gpus)


def compute_device(num_gpus: float) -> str:
    """The torch device of a task or actor that asked for `num_gpus` (`task_device`), its torch threads
    set to its CPUs. Every model, extractor and crosscoder of a stage or deployment is put there."""
    use_assigned_cpus()
    return task_device(num_gpus)


def init_ray(address: str | None) -> None:
    """Join `address` or $RAY_ADDRESS (set by `ray job submit`); otherwise start a fresh local Ray.

    NOTE: a bare `ray.init()` joins whatever cluster /tmp/ray last recorded, even one started in
    another network namespace, and then waits minutes for it.
    """
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
             log_to_driver=False, ignore_reinit_error=True,
             runtime_env=runtime_env())
