"""Stage configurations: one frozen dataclass per stage, validated on construction.

`from_dict` refuses unknown keys and wrong types, naming the key, so a typo in a YAML config fails
before any work starts. Library code never mutates a config; jobs resolve derived values and save the
result as `config.json` next to the weights.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args, get_origin

Activation = Literal["relu", "batchtopk", "jumprelu"]
ACTIVATIONS = get_args(Activation)

T = TypeVar("T")


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Coerce/validate one value against a type hint; raise ValueError naming `where`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in get_args(tp):
            raise ValueError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _check_type(value, arg, where)
            except ValueError:
                continue
        raise ValueError(f"{where}: {value!r} does not fit {tp}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}: expected a list, got {type(value).__name__}")
        inner = get_args(tp)[0]
        return tuple(_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or
                                          (tp is not bool and isinstance(value, bool))):
        raise ValueError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build a config dataclass from plain data; unknown keys and wrong types raise ValueError."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ValueError(f"{where}: {e}") from e


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


@dataclass(frozen=True)
class CrosscoderConfig:
    """The N-way acausal crosscoder (method.md §4)."""

    n_checkpoints: int
    """C: checkpoints crosscoded together (N >= 2)."""
    d_model: int
    """D: residual width at the hooked layer."""
    n_latents: int
    """L: dictionary size."""
    activation: Activation = "relu"
    """relu (the paper's, with decoder-norm-weighted L1), batchtopk, or jumprelu."""
    dec_init_norm: float = 0.08
    """Initial L2 norm of every decoder vector (the paper: 0.08 for ReLU, 1.0 for BatchTopK)."""
    k: int = 32
    """BatchTopK: active latents per token (k_final)."""
    k_init: int | None = None
    """BatchTopK: k at step 0, annealed linearly to `k` over `k_anneal_steps` (None: no annealing)."""
    k_anneal_steps: int = 0
    threshold_start_step: int = 1000
    """BatchTopK: step after which the eval threshold EMA starts."""
    threshold_beta: float = 0.999
    jumprelu_init_threshold: float = 0.1
    """JumpReLU: initial threshold (inputs are normalised to norm sqrt(D))."""
    jumprelu_bandwidth: float = 0.1
    """JumpReLU: width of the straight-through window for the threshold gradient."""
    jumprelu_tanh_scale: float = 4.0
    """JumpReLU: c in the tanh(c * f * ||W_dec||) sparsity penalty."""
    seed: int = 4352
    checkpoints: tuple[str, ...] = ()
    """Revision names, in training order (metadata; length C when given)."""
    checkpoint_hashes: tuple[str, ...] = ()
    family: str = ""
    layer: int | None = None

    def __post_init__(self) -> None:
        if self.n_checkpoints < 2:
            raise ValueError(f"n_checkpoints must be >= 2, got {self.n_checkpoints}")
        if self.d_model < 1 or self.n_latents < 1:
            raise ValueError("d_model and n_latents must be positive")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; known: {list(ACTIVATIONS)}")
        if self.checkpoints and len(self.checkpoints) != self.n_checkpoints:
            raise ValueError(f"checkpoints lists {len(self.checkpoints)} revisions but "
                             f"n_checkpoints is {self.n_checkpoints}")
        if self.checkpoint_hashes and len(self.checkpoint_hashes) != self.n_checkpoints:
            raise ValueError("checkpoint_hashes must have one entry per checkpoint")
        if self.activation == "batchtopk" and not 0 < self.k <= self.n_latents:
            raise ValueError(f"k must be in 1..n_latents, got {self.k}")
        if self.k_init is not None and self.k_init < self.k:
            raise ValueError("k_init must be >= k")


@dataclass(frozen=True)
class TrainConfig:
    """Crosscoder training (method.md §5), with the fast path's switches."""

    crosscoder: CrosscoderConfig
    n_steps: int
    """T: optimizer steps in the whole run (the schedules depend on it)."""
    batch_size: int = 4096
    lr: float = 5e-5
    beta1: float = 0.9
    beta2: float = 0.999
    l1_coeff: float = 2.0
    """Sparsity coefficient (L1 for relu, L0 for jumprelu), after warm-up."""
    l1_warmup_frac: float = 0.05
    lr_decay_frac: float = 0.2
    """LR is constant, then decays linearly to 0 over this last fraction of steps."""
    grad_clip: float = 1.0
    auxk_alpha: float = 1 / 32
    dead_window_tokens: int = 10_000_000
    """A latent is dead when it has not fired for this many tokens."""
    metrics_every: int = 100
    """Compute and log metrics every N steps (not every step: the fast path)."""
    checkpoint_every: int = 5000
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 autocast with fp32 master weights; auto = bf16 where the device runs it fast."""
    fused_optimizer: bool = True
    sparse_decode: bool = True
    """BatchTopK: decode only the active latents (embedding_bag) instead of a dense GEMM."""

    def __post_init__(self) -> None:
        if self.n_steps < 1 or self.batch_size < 1:
            raise ValueError("n_steps and batch_size must be positive")
        if not 0 <= self.l1_warmup_frac <= 1 or not 0 <= self.lr_decay_frac <= 1:
            raise ValueError("l1_warmup_frac and lr_decay_frac must be in [0, 1]")
        if self.metrics_every < 1 or self.checkpoint_every < 1:
            raise ValueError("metrics_every and checkpoint_every must be >= 1")
