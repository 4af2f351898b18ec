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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from crossray.schema import (
    Checked,
    Name,
    NonNegativeFloat,
    NonNegativeInt,
    OptionalName,
    PositiveFloat,
    PositiveInt,
    Range,
    Share,
    add_flags,
    apply_overrides,
    from_dict,
    shallow,
)

Method = Literal["crossray", "paper"]
Activation = Literal["relu", "batchtopk", "jumprelu"]
ACTIVATIONS = get_args(Activation)
AtLeastTwo = Annotated[int, Range(lo=2)]
Beta = Annotated[float, Range(0, 1, open_hi=True)]


# -- the crosscoder and its training ----------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class CrosscoderSettings(Checked):
    """The N-way acausal crosscoder as a user sets it (method.md §4)."""

    n_latents: PositiveInt
    """L: dictionary size."""
    activation: Activation = "relu"
    """relu (the paper's, with decoder-norm-weighted L1), batchtopk, or jumprelu."""
    dec_init_norm: PositiveFloat = 0.08
    """Initial L2 norm of every decoder vector (the paper: 0.08 for ReLU, 1.0 for BatchTopK)."""
    k: PositiveInt = 32
    """BatchTopK: active latents per token (k_final)."""
    k_init: PositiveInt | None = None
    """BatchTopK: k at step 0, annealed linearly to `k` over `k_anneal_steps` (None: no annealing)."""
    k_anneal_steps: NonNegativeInt = 0
    """BatchTopK: steps over which k anneals from k_init to k."""
    threshold_start_step: NonNegativeInt = 1000
    """BatchTopK: step after which the eval threshold EMA starts."""
    threshold_beta: Share = 0.999
    """BatchTopK: EMA factor of the eval threshold."""
    jumprelu_init_threshold: PositiveFloat = 1.1051709180756477
    """JumpReLU: initial threshold theta (Anthropic's January 2025 recipe: log theta = 0.1), for inputs
    normalised to mean norm sqrt(D) per checkpoint as the method does."""
    jumprelu_bandwidth: PositiveFloat = 2.0
    """JumpReLU: width epsilon of the straight-through window (Anthropic's: 2)."""
    jumprelu_tanh_scale: PositiveFloat = 4.0
    """JumpReLU: c in the tanh(c * f * ||W_dec||) sparsity penalty (Anthropic's: 4)."""
    jumprelu_preact_coeff: NonNegativeFloat = 3e-6
    """JumpReLU: lambda_P of the pre-activation loss lambda_P * sum_i ReLU(theta_i - h_i) * ||W_dec[i]||,
    which pulls latents that never fire towards their threshold (Anthropic's: 3e-6)."""
    jumprelu_init_firing: Share | None = 0.1
    """JumpReLU: the encoder bias starts so that each latent fires on this share of the first batch's
    tokens (b_enc = theta - that quantile of its pre-activations; Anthropic's data-dependent init);
    None: b_enc starts at 0."""
    jumprelu_ste_input: bool = True
    """JumpReLU: the straight-through gradient of the jump reaches the pre-activations too (Anthropic's),
    not only the thresholds (Rajamanoharan et al.)."""
    seed: NonNegativeInt = 4352
    """Seed of the decoder initialisation."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; known: {list(ACTIVATIONS)}")
        if self.activation == "batchtopk" and not 0 < self.k <= self.n_latents:
            raise ValueError(f"k must be in 1..n_latents, got {self.k}")
        if self.k_init is not None and self.k_init < self.k:
            raise ValueError("k_init must be >= k")


@dataclass(frozen=True, kw_only=True)
class CrosscoderConfig(CrosscoderSettings):
    """The settings plus what the extraction decides: C, D and the lineage of the activations."""

    n_checkpoints: AtLeastTwo
    """C: checkpoints crosscoded together (N >= 2)."""
    d_model: PositiveInt
    """D: residual width at the hooked layer."""
    revisions: tuple[str, ...] = ()
    """Revision names, in training order (length C when given)."""
    weight_hashes: tuple[str, ...] = ()
    """SHA-256 of each checkpoint's tensors (lineage)."""
    family: str = ""
    """The family the activations came from (lineage)."""
    layer: NonNegativeInt | None = None
    """The hooked layer (lineage)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.revisions and len(self.revisions) != self.n_checkpoints:
            raise ValueError(f"revisions lists {len(self.revisions)} names but n_checkpoints is "
                             f"{self.n_checkpoints}")
        if self.weight_hashes and len(self.weight_hashes) != self.n_checkpoints:
            raise ValueError("weight_hashes must have one entry per checkpoint")

    def revision_names(self) -> list[str]:
        """The revisions, or checkpoint indices as names when the lineage is unknown."""
        return list(self.revisions) or [str(c) for c in range(self.n_checkpoints)]


@dataclass(frozen=True, kw_only=True)
class TrainSettings(Checked):
    """Crosscoder training (method.md §5), with the fast path's switches."""

    crosscoder: CrosscoderSettings
    n_steps: PositiveInt
    """T: optimizer steps in the whole run (the schedules depend on it)."""
    batch_size: PositiveInt = 4096
    """Token rows per optimizer step (over all workers)."""
    lr: PositiveFloat = 5e-5
    """Adam learning rate (the paper: 5e-5)."""
    beta1: Beta = 0.9
    """Adam beta1."""
    beta2: Beta = 0.999
    """Adam beta2."""
    l1_coeff: NonNegativeFloat = 2.0
    """Sparsity coefficient (L1 for relu, L0 for jumprelu), after warm-up."""
    l1_warmup_frac: Share | None = None
    """Fraction of steps over which the sparsity coefficient rises linearly from 0; None: the
    activation's published schedule (relu: 0.05, the paper's; jumprelu: 1.0, over all of training as
    Anthropic's recipe ramps lambda_S)."""
    lr_decay_frac: Share = 0.2
    """LR is constant, then decays linearly to 0 over this last fraction of steps."""
    grad_clip: PositiveFloat = 1.0
    """Gradient norm clip."""
    auxk_alpha: NonNegativeFloat = 1 / 32
    """BatchTopK: weight of the aux-k loss."""
    dead_window_tokens: PositiveInt = 10_000_000
    """A latent is dead when it has not fired for this many tokens."""
    metrics_every: PositiveInt = 100
    """Compute and log metrics every N steps (not every step: the fast path)."""
    checkpoint_every: PositiveInt = 5000
    """Save the full training state every N steps."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 autocast with fp32 master weights; auto = bf16 where the device runs it fast."""
    fused_optimizer: bool = True
    """Fused Adam where the device has it."""
    sparse_decode: bool = True
    """BatchTopK: decode only the active latents (embedding_bag) instead of a dense GEMM."""
    shuffle_buffer_rows: PositiveInt = 8192
    """Rows in each worker's local shuffle buffer."""
    data_seed: NonNegativeInt = 0
    """Seed of the shuffle order."""

    @property
    def sparsity_warmup_frac(self) -> float:
        """`l1_warmup_frac`, or the activation's published schedule when it is None."""
        if self.l1_warmup_frac is not None:
            return self.l1_warmup_frac
        return 1.0 if self.crosscoder.activation == "jumprelu" else 0.05


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
class MixtureSource(Checked):
    """One source of a corpus mixture: where its documents come from, and its share of the sequences."""

    source: str
    """Local file or folder, `toy:SEED[:N_DOCS]`, or a hub data set name."""
    weight: PositiveFloat
    """Relative share of the mixture's sequences (and so of its tokens: every sequence has seq_len)."""
    hub_config: str | None = None
    """Hub data set configuration (e.g. the language: `en`, `zh`, ...)."""
    split: str = "train"
    """Hub data set split."""
    text_field: str = "text"
    """Field (JSONL) or column (Parquet) holding a document's text."""


@dataclass(frozen=True, kw_only=True)
class CorpusConfig(Checked):
    """Where the token sequences come from and how they are cut (method.md §2)."""

    source: str = ""
    """Local file or folder, `toy:SEED[:N_DOCS]`, or a hub data set name (empty with `mixture`)."""
    mixture: tuple[MixtureSource, ...] = ()
    """Instead of `source`: several sources interleaved by their weights (BLOOM's ten ROOTS languages
    of mC4, method.md §2), each read and tokenised as a corpus of its own; sequence i comes from the
    source the seeded schedule gives it (`crossray.corpus.mixture_schedule`: every prefix of the
    corpus holds each source's share to within one sequence)."""
    mixture_seed: NonNegativeInt = 0
    """Seed of the mixture's interleaving."""
    seq_len: AtLeastTwo = 1024
    """Tokens per sequence (the first seq_len tokens of each long-enough document)."""
    n_sequences: PositiveInt | None = None
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
        super().__post_init__()
        if bool(self.source) == bool(self.mixture):
            raise ValueError("a corpus needs exactly one of source and mixture")
        if self.mixture and self.n_sequences is None:
            raise ValueError("a corpus mixture needs n_sequences (each source's share is a share of it)")
        if self.n_sequences is None and (self.source == "toy" or self.source.count(":") == 1
                                         and self.source.startswith("toy:")):
            raise ValueError(f"corpus {self.source} never ends: set n_sequences, or toy:SEED:N_DOCS")

    @property
    def label(self) -> str:
        """The corpus in a few words, for logs and errors."""
        if not self.mixture:
            return self.source
        return "mixture of " + ", ".join(f"{m.source}" + (f"/{m.hub_config}" if m.hub_config else "")
                                         + f" {m.weight:g}" for m in self.mixture[:4]) + \
            (f" and {len(self.mixture) - 4} more" if len(self.mixture) > 4 else "")

    def components(self, counts: Sequence[int]) -> list[CorpusConfig]:
        """The mixture's sources, each as a corpus of its own: the same cut, `counts[k]` sequences."""
        return [CorpusConfig(source=m.source, seq_len=self.seq_len, n_sequences=max(int(n), 1),
                             text_field=m.text_field, split=m.split, hub_config=m.hub_config,
                             drop_first_position=self.drop_first_position)
                for m, n in zip(self.mixture, counts, strict=True)]


@dataclass(frozen=True, kw_only=True)
class ExtractSettings(Checked):
    """Activation extraction as a user sets it (the checkpoint set comes from selection)."""

    corpus: CorpusConfig
    batch_sequences: PositiveInt = 16
    """Sequences per forward pass."""
    shard_sequences: PositiveInt = 256
    """Sequences per Parquet shard (the unit of retry and resume; larger amortises task overhead)."""
    norm_sequences: PositiveInt = 64
    """Sequences used to estimate the normalisation factors (the paper: 4,000)."""
    norm_first_position: bool = False
    """Estimate the normalisation factors with position 0 (the paper's estimate, §3.4, though training
    drops it) or without it (training's view). Both are computed and recorded; this picks the one
    that scales. Default from `pipeline.method` (paper: true)."""
    storage_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Activations as stored in the Parquet shards."""
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the checkpoints' weights during extraction; float32 runs under bf16 autocast on a GPU
    (the paper's extraction), in plain fp32 on a CPU."""
    mode: Literal["auto", "stream", "parquet"] = "auto"
    """stream: activations go from the extraction actors through a shuffle buffer into training, never
    to disk; parquet: written as shards first; auto: parquet when they fit `max_disk_gb`."""
    max_disk_gb: PositiveFloat = 50.0


@dataclass(frozen=True, kw_only=True)
class ExtractConfig(ExtractSettings):
    """The extraction settings plus the checkpoint set they apply to."""

    family: str
    """Local family folder, hub repo, or `toy` (the embedded default, built or reused from the cache)."""
    revisions: tuple[str, ...]
    """The checkpoint set, in training order."""
    layer: NonNegativeInt
    """The residual stream entering block `layer`."""
    naming: str | None = None
    """Revision naming scheme (default: the family's)."""
    tokenizer: str | None = None
    """Tokenizer repo or folder when it is not stored with the checkpoints."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.revisions) < 2:
            raise ValueError(f"a checkpoint set needs at least 2 revisions, got {list(self.revisions)}")


# -- the other stages -------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class PipelineConfig(Checked):
    """What to crosscode: the family, layer, tasks and checkpoint set."""

    name: Name
    """Run name: results go to <out>/<name>/ and the MLflow parent run is named after it."""
    method: Method = "crossray"
    """crossray: the fixed computation (method.md §16: position 0 left out of the effects, of the
    norm estimate and of the headline ΔCE; the N-way ablation rho); paper: the paper's computation
    where §16 changed it (position 0 counted in the effects and spliced in the headline ΔCE, norm
    factors estimated with it, the 2-way ablation rho per pair as the headline). Settings the config
    leaves out follow the method (METHOD_DEFAULTS); a setting given explicitly wins. Both headline
    forms of ΔCE and rho are recorded whichever method runs."""
    family: str
    """`toy`, a local family folder, or a hub repo."""
    layer: NonNegativeInt
    """The residual stream entering block `layer` (TransformerLens blocks.L.hook_resid_pre)."""
    tasks: tuple[str, ...] = ("toy",)
    """Task files or folders; `toy` = the toy family's own tasks."""
    out: str = "runs"
    """Output root: results go to <out>/<name>/<stage>/."""
    n_checkpoints: AtLeastTwo = 3
    """Checkpoints selected automatically (unless `revisions` gives the set)."""
    revisions: tuple[str, ...] = ()
    """A user-given checkpoint set (always wins over automatic selection)."""
    screen_revisions: tuple[str, ...] = ()
    """Revisions to screen (default: every local revision; required for hub families)."""
    naming: str | None = None
    """Revision naming scheme (pythia, olmo, bloom, plain); default from the family."""
    tokenizer: str | None = None
    """Tokenizer repo or folder when it is not stored with the checkpoints (BLOOM intermediate)."""
    screen_examples: PositiveInt = 40
    """Examples per task for the activation-similarity screen."""
    score_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the checkpoints run in for screening (accuracy, activation similarity), whatever they
    were saved in."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.tasks:
            raise ValueError("tasks must name at least one task file, folder or 'toy'")


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(Checked):
    """Held-out evaluation: FVE, L0, dead latents and spliced ΔCE (method.md §7)."""

    eval_sequences: PositiveInt = 32
    """Held-out sequences (after the training ones) for FVE, L0, dead latents and the spliced ΔCE
    (the paper: 240 x 1024 tokens)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the checkpoints' weights for the held-out activations and ΔCE, whatever extraction ran
    in (the paper: fp32 weights, under bf16 autocast on a GPU as extraction does)."""


@dataclass(frozen=True, kw_only=True)
class AttributionConfig(Checked):
    """Indirect effects by integrated gradients, RelIE and the ablation check (method.md §11-12)."""

    steps: PositiveInt = 10
    """Integrated-gradient steps (1 = attribution patching)."""
    threshold: NonNegativeFloat | None = 0.1
    """Per-token |IE| threshold in logit units (None: keep everything)."""
    batch_size: PositiveInt = 4
    """Examples per batch (each runs `steps` interpolants at once)."""
    top_k: PositiveInt = 10
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
    """Leave each example's first token out of the effects (it stays at its real activation along the
    integrated-gradient path), as training leaves position 0 out (the crosscoder never saw it; the
    attention-sink outlier inflates the error term there). False: the paper's attribution, over every
    position. Default from `pipeline.method` (paper: false)."""
    low: Share = 0.3
    """Share below which a checkpoint does not count for a feature (group labels)."""
    high: Share = 0.7
    """Share above which a feature is specific to one checkpoint."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.low >= self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")


@dataclass(frozen=True, kw_only=True)
class AnalysisConfig(Checked):
    """Top-activating contexts per feature: how many sequences to scan, how many contexts to keep."""

    context_sequences: PositiveInt = 256
    """Extracted sequences scanned for top-activating contexts."""
    context_k: PositiveInt = 8
    """Top contexts kept per feature, jointly and per checkpoint."""
    context_before: NonNegativeInt = 10
    """Tokens shown before a context's top token (`context_after`: after it)."""
    context_after: NonNegativeInt = 3


@dataclass(frozen=True, kw_only=True)
class LaunchConfig(Checked):
    """How to run (never part of a stage's identity): Ray resources and MLflow names."""

    actors: PositiveInt = 2
    """Extraction/attribution actors, each holding every checkpoint of the set."""
    cpus_per_actor: NonNegativeFloat = 0.5
    """CPUs per actor (and per screening/evaluation task); `gpus_per_actor` likewise."""
    gpus_per_actor: NonNegativeFloat = 0
    workers: PositiveInt = 2
    """Ray Train workers (data parallel)."""
    cpus_per_worker: NonNegativeFloat = 0.5
    """CPUs per Ray Train worker; `gpus_per_worker` likewise."""
    gpus_per_worker: NonNegativeFloat = 0
    max_failures: Annotated[int, Range(lo=-1)] = 2
    """Restarts of the Train worker group from its last checkpoint."""
    experiment: OptionalName = ""
    """MLflow experiment (default: crossray-<family>)."""
    register_name: OptionalName = ""
    """Registered model name (default: crossray-<family>-<run name>)."""
    alias: Name = "champion"
    """Registry alias moved to the newly trained crosscoder."""


@dataclass(frozen=True, kw_only=True)
class SetSpec(Checked):
    """One entry of `study.sets`: a checkpoint set given by its revisions, or `expand`ed from the
    selected checkpoints. In YAML an entry may also be written as a list of revisions, or as
    `adjacent` / `all`."""

    revisions: tuple[str, ...] = ()
    """The set's revisions, oldest first (with `expand` empty)."""
    expand: Literal["", "adjacent", "all"] = ""
    """adjacent: every adjacent pair of the selected checkpoints; all: the N-way set of them."""
    name: OptionalName = ""
    """The set's name (default: its revisions joined by '-'); its results go to <run>/sets/<name>/."""
    overrides: tuple[str, ...] = ()
    """`section.field=value` settings of this set alone; only `train.*` and `attribution.*` fields."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if bool(self.revisions) == bool(self.expand):
            raise ValueError("a study set gives either revisions (two or more) or expand "
                             f"(adjacent or all), got revisions {list(self.revisions)} and expand "
                             f"{self.expand!r}")
        if self.revisions and len(self.revisions) < 2:
            raise ValueError(f"a checkpoint set needs two or more revisions, got {list(self.revisions)}")
        if len(set(self.revisions)) != len(self.revisions):
            raise ValueError(f"a checkpoint set names a revision twice: {list(self.revisions)}")
        if self.expand and self.name:
            raise ValueError(f"expand: {self.expand} makes several sets; they are named by their revisions")
        for item in self.overrides:
            dotted, sep, _ = item.partition("=")
            if not sep or not dotted.startswith(("train.", "attribution.")):
                raise ValueError(f"study set override {item!r}: expected train.<field>=<value> or "
                                 "attribution.<field>=<value>")


@dataclass(frozen=True, kw_only=True)
class StudyConfig(Checked):
    """Several checkpoint sets of the pipeline's family, run as one study (design.md, Studies): one
    screening, one extraction of the union of their revisions, then each set's crosscoder, evaluation
    and attribution, and a comparison on one timeline. Empty `sets`: a plain run of one set."""

    sets: tuple[SetSpec, ...] = ()
    """The checkpoint sets (entries: a list of revisions, `adjacent`, `all`, or a mapping of SetSpec)."""


@dataclass(frozen=True, kw_only=True)
class Config(Checked):
    pipeline: PipelineConfig
    extract: ExtractSettings
    train: TrainSettings
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    study: StudyConfig = field(default_factory=StudyConfig)


def normalise_study(data: dict) -> dict:
    """`study.sets` entries written short (a list of revisions, `adjacent`, `all`) as SetSpec data."""
    study = data.get("study")
    sets = study.get("sets") if isinstance(study, dict) else None
    if isinstance(sets, list | tuple):
        study["sets"] = [_set_spec(s, i) for i, s in enumerate(sets)]
    return data


def _set_spec(entry: Any, i: int) -> Any:
    if isinstance(entry, str):
        if entry not in ("adjacent", "all"):
            raise ValueError(f"study.sets[{i}]: {entry!r} is not a set; write a list of revisions, adjacent, "
                             "all, or a mapping with revisions / expand, name and overrides")
        return {"expand": entry}
    return {"revisions": list(entry)} if isinstance(entry, list | tuple) else entry


METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "crossray": {"attribution.skip_first_position": True, "extract.norm_first_position": False},
    "paper": {"attribution.skip_first_position": False, "extract.norm_first_position": True},
}
"""What `pipeline.method` sets where the config is silent (thresholds and top-k stay config values:
the paper configs set the paper's)."""


def apply_method(data: dict) -> dict:
    """Fill the settings that the config data leaves out from its `pipeline.method`'s defaults."""
    pipeline = data.get("pipeline")
    method = pipeline.get("method", "crossray") if isinstance(pipeline, dict) else "crossray"
    for dotted, value in METHOD_DEFAULTS.get(method, {}).items():  # an unknown method: from_dict says so
        section, name = dotted.split(".")
        if section not in data and section == "attribution":  # a section with defaults of its own
            data[section] = {}
        if isinstance(data.get(section), dict):
            data[section].setdefault(name, value)
    return data


MAX_CONFIG_BYTES = 1 << 20
"""A run config is a page of YAML; anything over 1 MB is refused before it is read."""
MAX_CONFIG_NODES = 100_000
"""YAML nodes a config may expand to through its aliases (an alias bomb expands to billions)."""


def read_yaml(path: Path) -> Any:
    """A config file's YAML, read with bounded memory: a regular file of at most `MAX_CONFIG_BYTES`,
    whose aliases expand to at most `MAX_CONFIG_NODES` nodes."""
    import stat

    import yaml

    info = path.stat()  # OSError: the caller names the file
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path}: not a regular file")
    with open(path, "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: over {MAX_CONFIG_BYTES // 1024} KiB; a run config is a page of YAML")
    text = raw.decode("utf-8", errors="strict")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)  # nodes only: aliases stay shared
        if root is not None and _expanded_nodes(root, {}, set()) > MAX_CONFIG_NODES:
            raise ValueError(f"{path}: its YAML aliases expand to over {MAX_CONFIG_NODES} values")
    except RecursionError:
        raise ValueError(f"{path}: YAML nested too deeply") from None
    return yaml.safe_load(text)


def _expanded_nodes(node: Any, memo: dict[int, int], path: set[int]) -> int:
    """How many nodes `node` stands for once every alias is expanded (capped above the bound)."""
    import yaml

    if id(node) in memo:
        return memo[id(node)]
    if id(node) in path:  # a recursive alias: infinite
        return MAX_CONFIG_NODES + 1
    path.add(id(node))
    children = node.value if isinstance(node, yaml.SequenceNode) else \
        [n for kv in node.value for n in kv] if isinstance(node, yaml.MappingNode) else []
    total = 1
    for child in children:
        total += _expanded_nodes(child, memo, path)
        if total > MAX_CONFIG_NODES:
            break
    path.discard(id(node))
    memo[id(node)] = total
    return total


def load_config(path: str | Path, overrides: dict[str, str] | None = None) -> Config:
    """Parse and validate a run config; `overrides` maps `section.field` paths to flag strings."""
    import yaml

    path = Path(path)
    try:
        data = read_yaml(path) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read the config: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    data = apply_method(apply_overrides(Config, data, overrides or {}))
    try:
        data = normalise_study(data)
    except ValueError as e:
        raise ValueError(f"{path}:{e}") from None
    return from_dict(Config, data, f"{path}:")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """`--config` plus a `--section.field` override for every field of the run config."""
    parser.add_argument("--config", required=True, help="run config (YAML)")
    add_flags(parser, Config)


