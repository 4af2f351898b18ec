"""The JSON shapes of the HTTP API (field names are stable: clients and the page rely on them)."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from crossray.tasks import MAX_FIELD_CHARS, MAX_REQUEST_TOKENS


class LiveDevice(BaseModel):
    device: str | None = Field(description="cuda or cpu: where the model deployment computes (null while "
                                           "it does not answer yet)")
    gpus: float | None = Field(description="the GPUs Ray gave a model replica")


class Health(BaseModel):
    status: str
    runs: list[str] | None = Field(description="the loaded runs (null when the service has a token)")
    live: LiveDevice | None = Field(None, description="the live queries' model deployment (null: none)")


class StudySet(BaseModel):
    name: str
    run: str | None = Field(description="the run id the set is served under (None: the set failed)")
    revisions: list[str]
    status: str = Field(description="done or failed")


class StudyInfo(BaseModel):
    study: str
    revisions: list[str] = Field(description="the union of the sets' revisions, extracted once each")
    sets: list[StudySet]


class StudyDetail(StudyInfo):
    timeline: list[dict] = Field(description="per task, set and checkpoint: tokens_seen, ie_mass, "
                                 "top_ie_mass, top features' groups (RelDec, RelIE), top_mean_relie")
    new_features: list[dict] = Field(description="per task, set and adjacent pair: the share of the later "
                                     "checkpoint's IE from features new to it (RelIE > 0.9)")
    matched: list[dict] = Field(description="per task and shared checkpoint of two sets: their top "
                                "features matched by decoder cosine")


class Error(BaseModel):
    detail: str | list = Field(description="what was wrong with the request (validation errors: a list)")


class Checkpoint(BaseModel):
    index: int
    revision: str
    step: int | None
    tokens_seen: int | None
    fve: float | None
    delta_ce: float | None
    ce_recovered: float | None


class TaskInfo(BaseModel):
    name: str
    examples: int
    selected: int = Field(description="features attribution selected (top-k by |IE| at any checkpoint)")
    ablation_rho_relie: float | None


class RunInfo(BaseModel):
    id: str = Field(description="MLflow parent run id (or the folder name of a local run)")
    name: str
    family: str
    layer: int
    n_latents: int
    checkpoints: list[Checkpoint]
    tasks: list[TaskInfo]
    registered_model: str | None
    metrics: dict[str, float | None]


class Cosine(BaseModel):
    pair: str = Field(description="'<revision a>-<revision b>'")
    value: float | None


class PairShare(BaseModel):
    pair: str = Field(description="'<revision a>-<revision b>'")
    share: float | None = Field(description="b's share of a + b")
    all_zero: bool = Field(default=False,
                           description="a + b is 0: the share 0.5 is a convention (a 0/0 pair)")


class TaskEffect(BaseModel):
    ie: list[float | None] = Field(description="indirect effect per checkpoint")
    relie: list[float | None] = Field(description="RelIE one-vs-all per checkpoint")
    relie_pairs: list[PairShare] = Field(default=[], description="pairwise RelIE (3 or more checkpoints)")
    group: str


class Context(BaseModel):
    rank: int
    value: float | None
    seq: int
    pos: int
    target: int = Field(description="index in tokens of the top-activating token")
    tokens: list[str]
    scores: list[float | None] = Field(description="the feature's score at each token")


class FeatureCard(BaseModel):
    run: str
    feature: int
    checkpoints: list[str]
    decoder_norm: list[float | None]
    relative_norm: list[float | None]
    relative_norm_pairs: list[PairShare] = Field(default=[], description="pairwise RelDec (3+ checkpoints)")
    trajectory: str = Field(description="emerging, maintained, discontinued, transient or absent")
    group: str = Field(description="the RelDec group: '<rev> specific', '<a>-<b> shared', ...")
    cosine: list[Cosine]
    effects: dict[str, TaskEffect]
    contexts: dict[str, list[Context]] = Field(description="'joint' and one list per revision")


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is a 422, never silently ignored

    ids: list[int] = Field(min_length=1, max_length=1000)
    contexts: bool = False


class BatchResponse(BaseModel):
    run: str
    features: list[FeatureCard]


class RankedFeature(BaseModel):
    feature: int
    ie: float | None
    relie: float | None
    relie_by_checkpoint: list[float | None]
    ie_by_checkpoint: list[float | None]
    decoder_norm: list[float | None]
    trajectory: str
    group: str
    selected: bool


class Ranking(BaseModel):
    run: str
    task: str
    checkpoint: str
    checkpoint_index: int
    by: str
    total: int
    offset: int
    limit: int
    items: list[RankedFeature]


class AccuracyPoint(BaseModel):
    revision: str
    step: int | None
    tokens_seen: int | None
    prefix_accuracy: float | None
    sentence_accuracy: float | None
    crosscoded: bool


class Accuracy(BaseModel):
    run: str
    checkpoints: list[str]
    tasks: dict[str, list[AccuracyPoint]]


# -- live queries (computed by the model deployment) --------------------------------------------------

@dataclass(frozen=True)
class LiveLimits:
    """Caps on one live request's work; a request over one gets a 422 naming it. `pair_chars` caps each
    text field of a pair, `tokens` the tokens of all the pairs' text together (with `pairs` and
    `steps`, a bound on a request's model work). `deadline_s` bounds the time a request waits for its
    model work (then 503 with Retry-After), and the model replica stops its work there."""

    pairs: int = 256
    features: int = 64
    text_chars: int = 2000
    pair_chars: int = MAX_FIELD_CHARS
    tokens: int = MAX_REQUEST_TOKENS
    steps: int = 64
    top: int = 100
    deadline_s: float = 20.0

    def __post_init__(self) -> None:
        bad = {k: v for k, v in vars(self).items()
               if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < float("inf")}
        if bad:
            raise ValueError(f"limits must be positive numbers, got {bad}")


Row = dict[str, str | int | float | bool | None]


class EffectsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pairs: list[Row] = Field(min_length=1, description=(
        "minimal pairs in any task format the project reads: BLiMP rows (one_prefix_prefix, "
        "one_prefix_word_good, one_prefix_word_bad, ...), CLAMS / feature-circuits rows (clean_prefix, "
        "clean_answer, patch_answer[, patch_prefix]) or MultiBLiMP rows; answers must be single tokens"))
    features: list[int] | None = Field(None, min_length=1, description="features to report (default: "
                                       "the `top` by largest |IE| at any checkpoint)")
    top: int = Field(20, ge=1)
    steps: int | None = Field(None, ge=1, description="integrated-gradient steps (default: the run's)")


class LiveFeature(BaseModel):
    feature: int
    ie: list[float | None] = Field(description="mean IE per checkpoint over the pairs")
    relie: list[float | None] = Field(description="share of |IE| per checkpoint (one-vs-all)")
    group: str = Field(description="RelIE group over these pairs")
    trajectory: str = Field(description="decoder-norm trajectory class of the feature")


class EffectsResponse(BaseModel):
    run: str
    checkpoints: list[str]
    examples: int = Field(description="pairs kept (single-token answers)")
    skipped: dict[str, int] = Field(description="pairs left out, by reason")
    steps: int
    baseline: str
    logit_diff: list[float | None] = Field(description="mean logit(correct) - logit(wrong) per checkpoint")
    error_ie: list[float | None] = Field(description="mean IE of the crosscoder's error term per checkpoint")
    features: list[LiveFeature]


class AblateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pairs: list[Row] = Field(min_length=1, description="minimal pairs, as for /effects")
    features: list[int] = Field(min_length=1, description="features zero-ablated together")
    checkpoint: str | int | None = Field(None, description="revision or index (default: every checkpoint)")


class AblatedState(BaseModel):
    logit_diff: float = Field(description="mean logit(correct) - logit(wrong)")
    accuracy: float = Field(description="share of pairs with logit(correct) > logit(wrong)")


class FeatureDelta(BaseModel):
    feature: int
    delta: list[float] = Field(description="mean logit-difference drop when this feature alone is ablated")


class AblateResponse(BaseModel):
    run: str
    checkpoints: list[str]
    examples: int
    skipped: dict[str, int]
    features: list[int]
    before: list[AblatedState]
    after: list[AblatedState] = Field(description="with every given feature ablated")
    per_feature: list[FeatureDelta]


class ActivationsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1)
    top: int = Field(5, ge=1)


class Activation(BaseModel):
    feature: int
    value: float


class TokenActivations(BaseModel):
    token: str
    id: int
    joint: list[Activation] = Field(description="top features by joint activation (positive only)")
    checkpoints: list[list[Activation]] = Field(description="per checkpoint: top features by its encoder "
                                                "contribution x_c @ W_enc[c]")


class ActivationsResponse(BaseModel):
    run: str
    checkpoints: list[str]
    tokens: list[TokenActivations]
