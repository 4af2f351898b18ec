"""The JSON shapes of the HTTP API (field names are stable: clients and the page rely on them)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Health(BaseModel):
    status: str
    runs: list[str]


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
