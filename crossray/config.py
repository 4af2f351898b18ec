"""Run configuration: one frozen dataclass per section, one loader, command-line flags from the fields.

A run config (YAML) has the sections of `Config`: `pipeline` (what to crosscode), `extract`, `train`,
`evaluate`, `attribution`, `analysis` (each stage's settings) and `launch` (how to run it: actors,
workers, resources, MLflow names). `load_config` is the only loader; `from_dict` refuses unknown
keys and wrong types, naming the file and the key path, so a typo fails before any work starts.

`*Settings` hold what a user sets; `*Config` add what the data decides (checkpoint count, d_model,
the selected revisions), so no placeholder stands in. Library code never mutates a config. Every
field is a `--section.field` flag (help: its docstring), so flags and fields cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from crossray.schema import add_flags, apply_overrides, from_dict, shallow

Activation = Literal["relu", "batchtopk", "jumprelu"]
ACTIVATIONS = get_args(Activation)


# -- the crosscoder and its training ----------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class CrosscoderSettings:
    """The N-way acausal crosscoder as a user sets it (method.md §4)."""

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
    """BatchTopK: steps over which k anneals from k_init to k."""
    threshold_start_step: int = 1000
    """BatchTopK: step after which the eval threshold EMA starts."""
    threshold_beta: float = 0.999
    """BatchTopK: EMA factor of the eval threshold."""
    jumprelu_init_threshold: float = 0.1
    """JumpReLU: initial threshold (inputs are normalised to norm sqrt(D))."""
    jumprelu_bandwidth: float = 0.1
    """JumpReLU: width of the straight-through window for the threshold gradient."""
    jumprelu_tanh_scale: float = 1.0
    """JumpReLU: c in the tanh(c * f * ||W_dec||) sparsity penalty (where it saturates: 1 suits inputs
    normalised to norm sqrt(D); 4, Anthropic's value at their scale, leaves L0 several times too high)."""
    seed: int = 4352
    """Seed of the decoder initialisation."""

    def __post_init__(self) -> None:
        if self.n_latents < 1:
            raise ValueError(f"n_latents must be positive, got {self.n_latents}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; known: {list(ACTIVATIONS)}")
        if self.activation == "batchtopk" and not 0 < self.k <= self.n_latents:
            raise ValueError(f"k must be in 1..n_latents, got {self.k}")
        if self.k_init is not None and self.k_init < self.k:
            raise ValueError("k_init must be >= k")


@dataclass(frozen=True, kw_only=True)
class CrosscoderConfig(CrosscoderSettings):
    """The settings plus what the extraction decides: C, D and the lineage of the activations."""

    n_checkpoints: int
    """C: checkpoints crosscoded together (N >= 2)."""
    d_model: int
    """D: residual width at the hooked layer."""
    revisions: tuple[str, ...] = ()
    """Revision names, in training order (length C when given)."""
    weight_hashes: tuple[str, ...] = ()
    """SHA-256 of each checkpoint's tensors (lineage)."""
    family: str = ""
    """The family the activations came from (lineage)."""
    layer: int | None = None
    """The hooked layer (lineage)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_checkpoints < 2:
            raise ValueError(f"n_checkpoints must be >= 2, got {self.n_checkpoints}")
        if self.d_model < 1:
            raise ValueError("d_model must be positive")
        if self.revisions and len(self.revisions) != self.n_checkpoints:
            raise ValueError(f"revisions lists {len(self.revisions)} names but n_checkpoints is "
                             f"{self.n_checkpoints}")
        if self.weight_hashes and len(self.weight_hashes) != self.n_checkpoints:
            raise ValueError("weight_hashes must have one entry per checkpoint")

    def revision_names(self) -> list[str]:
        """The revisions, or checkpoint indices as names when the lineage is unknown."""
        return list(self.revisions) or [str(c) for c in range(self.n_checkpoints)]


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """Crosscoder training (method.md §5), with the fast path's switches."""

    crosscoder: CrosscoderSettings
    n_steps: int
    """T: optimizer steps in the whole run (the schedules depend on it)."""
    batch_size: int = 4096
    """Token rows per optimizer step (over all workers)."""
    lr: float = 5e-5
    """Adam learning rate (the paper: 5e-5)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.999
    """Adam beta2."""
    l1_coeff: float = 2.0
    """Sparsity coefficient (L1 for relu, L0 for jumprelu), after warm-up."""
    l1_warmup_frac: float = 0.05
    """Fraction of steps over which the sparsity coefficient rises linearly from 0."""
    lr_decay_frac: float = 0.2
    """LR is constant, then decays linearly to 0 over this last fraction of steps."""
    grad_clip: float = 1.0
    """Gradient norm clip."""
    auxk_alpha: float = 1 / 32
    """BatchTopK: weight of the aux-k loss."""
    dead_window_tokens: int = 10_000_000
    """A latent is dead when it has not fired for this many tokens."""
    metrics_every: int = 100
    """Compute and log metrics every N steps (not every step: the fast path)."""
    checkpoint_every: int = 5000
    """Save the full training state every N steps."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 autocast with fp32 master weights; auto = bf16 where the device runs it fast."""
    fused_optimizer: bool = True
    """Fused Adam where the device has it."""
    sparse_decode: bool = True
    """BatchTopK: decode only the active latents (embedding_bag) instead of a dense GEMM."""
    shuffle_buffer_rows: int = 8192
    """Rows in each worker's local shuffle buffer."""
    data_seed: int = 0
    """Seed of the shuffle order."""

    def __post_init__(self) -> None:
        if self.n_steps < 1 or self.batch_size < 1:
            raise ValueError("n_steps and batch_size must be positive")
        if not 0 <= self.l1_warmup_frac <= 1 or not 0 <= self.lr_decay_frac <= 1:
            raise ValueError("l1_warmup_frac and lr_decay_frac must be in [0, 1]")
        if self.metrics_every < 1 or self.checkpoint_every < 1:
            raise ValueError("metrics_every and checkpoint_every must be >= 1")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(TrainSettings):
    """The training settings with the crosscoder resolved from the extraction."""

    crosscoder: CrosscoderConfig


def resolve_train(settings: TrainSettings, n_checkpoints: int, d_model: int, **lineage: Any) -> TrainConfig:
    """TrainConfig from settings and what the data says (C, D, revisions, weight hashes, family, layer)."""
    chosen = {f.name: getattr(settings.crosscoder, f.name) for f in dataclasses.fields(CrosscoderSettings)}
    cc = CrosscoderConfig(**chosen, n_checkpoints=n_checkpoints, d_model=d_model, **lineage)
    return TrainConfig(**{**shallow(settings), "crosscoder": cc})


# -- data -------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class CorpusConfig:
    """Where the token sequences come from and how they are cut (method.md §2)."""

    source: str
    """Local file or folder, `toy:SEED[:N_DOCS]`, or a hub data set name."""
    seq_len: int = 1024
    """Tokens per sequence (the first seq_len tokens of each long-enough document)."""
    n_sequences: int | None = None
    """Stop after this many sequences (None: all)."""
    text_field: str = "text"
    """Field (JSONL) or column (Parquet) holding a document's text."""
    split: str = "train"
    """Hub data set split."""
    hub_config: str | None = None
    """Hub data set configuration (e.g. a language)."""
    drop_first_position: bool = True
    """Drop position 0 of every sequence from the rows (the paper's `remove_bos`, §3.2)."""

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.n_sequences is not None and self.n_sequences < 1:
            raise ValueError("n_sequences must be positive")
        if self.n_sequences is None and (self.source == "toy" or self.source.count(":") == 1
                                         and self.source.startswith("toy:")):
            raise ValueError(f"corpus {self.source} never ends: set n_sequences, or toy:SEED:N_DOCS")


@dataclass(frozen=True, kw_only=True)
class ExtractSettings:
    """Activation extraction as a user sets it (the checkpoint set comes from selection)."""

    corpus: CorpusConfig
    batch_sequences: int = 16
    """Sequences per forward pass."""
    shard_sequences: int = 256
    """Sequences per Parquet shard (the unit of retry and resume; larger amortises task overhead)."""
    norm_sequences: int = 64
    """Sequences used to estimate the normalisation factors (the paper: 4,000)."""
    storage_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Activations as stored in the Parquet shards."""
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype the checkpoints run in during extraction."""
    mode: Literal["auto", "stream", "parquet"] = "auto"
    """stream: activations go from the extraction actors through a shuffle buffer into training, never
    to disk; parquet: written as shards first; auto: parquet when they fit `max_disk_gb`."""
    max_disk_gb: float = 50.0

    def __post_init__(self) -> None:
        if min(self.batch_sequences, self.shard_sequences, self.norm_sequences, self.max_disk_gb) <= 0:
            raise ValueError("batch_sequences, shard_sequences, norm_sequences and max_disk_gb must be "
                             "positive")


@dataclass(frozen=True, kw_only=True)
class ExtractConfig(ExtractSettings):
    """The extraction settings plus the checkpoint set they apply to."""

    family: str
    """Local family folder, hub repo, or `toy` (the embedded default, built or reused from the cache)."""
    revisions: tuple[str, ...]
    """The checkpoint set, in training order."""
    layer: int
    """The residual stream entering block `layer`."""
    naming: str | None = None
    """Revision naming scheme (default: the family's)."""
    tokenizer: str | None = None
    """Tokenizer repo or folder when it is not stored with the checkpoints."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.revisions) < 2:
            raise ValueError(f"a checkpoint set needs at least 2 revisions, got {list(self.revisions)}")

    def family_obj(self):
        from crossray.checkpoints import resolve_family

        return resolve_family(self.family, revisions=self.revisions, naming=self.naming,
                              tokenizer=self.tokenizer)


# -- the other stages -------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """What to crosscode: the family, layer, tasks and checkpoint set."""

    name: str
    """Run name: results go to <out>/<name>/ and the MLflow parent run is named after it."""
    family: str
    """`toy`, a local family folder, or a hub repo."""
    layer: int
    """The residual stream entering block `layer` (TransformerLens blocks.L.hook_resid_pre)."""
    tasks: tuple[str, ...] = ("toy",)
    """Task files or folders; `toy` = the toy family's own tasks."""
    out: str = "runs"
    """Output root: results go to <out>/<name>/<stage>/."""
    n_checkpoints: int = 3
    """Checkpoints selected automatically (unless `revisions` gives the set)."""
    revisions: tuple[str, ...] = ()
    """A user-given checkpoint set (always wins over automatic selection)."""
    screen_revisions: tuple[str, ...] = ()
    """Revisions to screen (default: every local revision; required for hub families)."""
    naming: str | None = None
    """Revision naming scheme (pythia, olmo, bloom, plain); default from the family."""
    tokenizer: str | None = None
    """Tokenizer repo or folder when it is not stored with the checkpoints (BLOOM intermediate)."""
    screen_examples: int = 40
    """Examples per task for the activation-similarity screen."""
    score_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the checkpoints run in for screening (accuracy, activation similarity), whatever they
    were saved in."""

    def __post_init__(self) -> None:
        if self.n_checkpoints < 2:
            raise ValueError(f"n_checkpoints must be >= 2, got {self.n_checkpoints}")
        if not self.tasks:
            raise ValueError("tasks must name at least one task file, folder or 'toy'")


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    """Held-out evaluation: FVE, L0, dead latents and spliced ΔCE (method.md §7)."""

    eval_sequences: int = 32
    """Held-out sequences (after the training ones) for FVE, L0, dead latents and the spliced ΔCE
    (the paper: 240 x 1024 tokens)."""


@dataclass(frozen=True, kw_only=True)
class AttributionConfig:
    """Indirect effects by integrated gradients, RelIE and the ablation check (method.md §11-12)."""

    steps: int = 10
    """Integrated-gradient steps (1 = attribution patching)."""
    threshold: float | None = 0.1
    """Per-token |IE| threshold in logit units (None: keep everything)."""
    batch_size: int = 4
    """Examples per batch (each runs `steps` interpolants at once)."""
    top_k: int = 10
    """Features selected per checkpoint by |IE| (their union is studied)."""
    baseline: Literal["auto", "zero", "patch"] = "auto"
    """IG baseline, decided per task: the zero state (the paper), the patch prefix's state, or auto
    (patch when every example of the task has a patch prefix of its clean prefix's token length, zero
    when none has)."""
    allow_mixed_baseline: bool = False
    """auto only: accept a task where some examples have a usable patch prefix and some do not
    (each batch then decides, and the task's mean IE mixes two definitions)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the checkpoints run in for IE and the ablation check (the paper: fp32)."""
    skip_first_position: bool = True
    """Leave each example's first token out of the effects, as training leaves position 0 out (the
    crosscoder never saw it; the attention-sink outlier inflates the error term there). False: the
    paper's attribution, over every position."""
    low: float = 0.3
    """Share below which a checkpoint does not count for a feature (group labels)."""
    high: float = 0.7
    """Share above which a feature is specific to one checkpoint."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.top_k < 1:
            raise ValueError("steps, batch_size and top_k must be >= 1")


@dataclass(frozen=True, kw_only=True)
class AnalysisConfig:
    """Top-activating contexts per feature: how many sequences to scan, how many contexts to keep."""

    context_sequences: int = 256
    """Extracted sequences scanned for top-activating contexts."""
    context_k: int = 8
    """Top contexts kept per feature, jointly and per checkpoint."""
    context_before: int = 10
    """Tokens shown before a context's top token (`context_after`: after it)."""
    context_after: int = 3


@dataclass(frozen=True, kw_only=True)
class LaunchConfig:
    """How to run (never part of a stage's identity): Ray resources and MLflow names."""

    actors: int = 2
    """Extraction/attribution actors, each holding every checkpoint of the set."""
    cpus_per_actor: float = 0.5
    """CPUs per actor (and per screening/evaluation task); `gpus_per_actor` likewise."""
    gpus_per_actor: float = 0
    workers: int = 2
    """Ray Train workers (data parallel)."""
    cpus_per_worker: float = 0.5
    """CPUs per Ray Train worker; `gpus_per_worker` likewise."""
    gpus_per_worker: float = 0
    max_failures: int = 2
    """Restarts of the Train worker group from its last checkpoint."""
    experiment: str = ""
    """MLflow experiment (default: crossray-<family>)."""
    register_name: str = ""
    """Registered model name (default: crossray-<family>-<run name>)."""
    alias: str = "champion"
    """Registry alias moved to the newly trained crosscoder."""


@dataclass(frozen=True, kw_only=True)
class Config:
    pipeline: PipelineConfig
    extract: ExtractSettings
    train: TrainSettings
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


def load_config(path: str | Path, overrides: dict[str, str] | None = None) -> Config:
    """Parse and validate a run config; `overrides` maps `section.field` paths to flag strings."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read the config: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return from_dict(Config, apply_overrides(Config, data, overrides or {}), f"{path}:")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """`--config` plus a `--section.field` override for every field of the run config."""
    parser.add_argument("--config", required=True, help="run config (YAML)")
    add_flags(parser, Config)


