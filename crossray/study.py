"""Studies: several checkpoint sets of one family, run as one (design.md, Studies).

A study config is a run config with `study.sets`. The sets are resolved against the checkpoints the
pipeline selects (`pipeline.revisions`, or `n_checkpoints` chosen by screening): `adjacent` is every
adjacent pair of them, `all` the N-way set, an explicit list any revisions that were screened. Each
set becomes a config of its own (the study's settings, its revisions pinned, its overrides applied),
so a set's crosscoder, evaluation and attribution are exactly those of a plain run of that set.

The comparison (`compare`) puts what can be compared on one timeline: features of different sets
live in different latent spaces, so it compares per task and per checkpoint the IE mass, the groups of
the top features by RelDec and by RelIE, and, for each pair, how much of the later checkpoint's IE
comes from features new to it; where two sets share a checkpoint, it matches their top features by
decoder cosine at that checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from crossray.config import Config, SetSpec
from crossray.schema import apply_overrides, from_dict, to_dict

NEW_FEATURE_SHARE = 0.9
"""A feature is new to the later checkpoint of a pair when its RelIE towards it exceeds this."""


@dataclass(frozen=True)
class StudySet:
    name: str
    revisions: tuple[str, ...]
    config: Config
    """The set's own config: the study's settings, `pipeline.revisions` the set, its overrides."""


def is_study(cfg: Config) -> bool:
    return bool(cfg.study.sets)


def expand(specs: Sequence[SetSpec], selected: Sequence[str], screened: Sequence[str]
           ) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """(name, revisions, overrides) of every set, in the order given, duplicates refused. `selected`
    are the study's checkpoints (what `adjacent` and `all` expand), `screened` every revision a set
    may name, in training order."""
    out: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []
    for spec in specs:
        if spec.expand == "adjacent":
            groups = [tuple(selected[i:i + 2]) for i in range(len(selected) - 1)]
        elif spec.expand == "all":
            groups = [tuple(selected)]
        else:
            missing = [r for r in spec.revisions if r not in screened]
            if missing:
                raise ValueError(f"study set {list(spec.revisions)}: {missing} are not among the screened "
                                 f"revisions {list(screened)}")
            order = [screened.index(r) for r in spec.revisions]
            if order != sorted(order):
                raise ValueError(f"study set {list(spec.revisions)}: list its revisions in training order "
                                 f"({', '.join(sorted(spec.revisions, key=screened.index))})")
            groups = [tuple(spec.revisions)]
        for revisions in groups:
            name = spec.name or "-".join(revisions)
            if any(name == n or revisions == r for n, r, _ in out):
                raise ValueError(f"study set {name} ({', '.join(revisions)}) is given twice")
            out.append((name, revisions, spec.overrides))
    if len(out) < 1 or any(len(r) < 2 for _, r, _ in out):
        raise ValueError(f"the study's sets need two or more checkpoints each; selected {list(selected)}")
    return out


def set_config(cfg: Config, name: str, revisions: Sequence[str], overrides: Sequence[str]) -> Config:
    """A set's config: the study's, with its revisions pinned, its name, and its overrides."""
    data: dict[str, Any] = to_dict(cfg)
    data["pipeline"].update(revisions=list(revisions), n_checkpoints=len(revisions), name=name)
    data["study"] = {"sets": []}
    registry = cfg.launch.register_name or f"crossray-{cfg.pipeline.name}"  # one registered model a set
    data["launch"]["register_name"] = f"{registry}-{name}"
    pairs = dict(item.split("=", 1) for item in overrides)
    try:
        data = apply_overrides(Config, data, pairs)
        return from_dict(Config, data, f"study set {name}:")
    except (ValueError, KeyError) as e:
        raise ValueError(f"study set {name}: {e.args[0] if isinstance(e, KeyError) else e}") from None


def resolve_sets(cfg: Config, selected: Sequence[str], screened: Sequence[str]) -> list[StudySet]:
    return [StudySet(name, revisions, set_config(cfg, name, revisions, overrides))
            for name, revisions, overrides in expand(cfg.study.sets, selected, screened)]


def union(sets: Sequence[StudySet], order: Sequence[str]) -> list[str]:
    """Every revision some set reads, in training order: what the study extracts, once each."""
    wanted = {r for s in sets for r in s.revisions}
    return [r for r in order if r in wanted]


def columns(revisions: Sequence[str], union_revisions: Sequence[str]) -> tuple[int, ...]:
    """Where a set's revisions sit in the union's checkpoint axis."""
    return tuple(union_revisions.index(r) for r in revisions)


def planned_sets(cfg: Config) -> list[StudySet]:
    """The sets as far as a plan can tell without screening, with the checks a run applies to them
    (their overrides, duplicates, training settings they must share): `adjacent` and `all` expand over
    `pipeline.revisions` when given (else over n_checkpoints placeholders `c1`, `c2`, ...)."""
    from crossray.train import check_shared

    selected = list(cfg.pipeline.revisions) or [f"c{i + 1}" for i in range(cfg.pipeline.n_checkpoints)]
    screened = list(cfg.pipeline.screen_revisions) or selected
    screened += [r for s in cfg.study.sets for r in s.revisions if r not in screened]
    sets = resolve_sets(cfg, selected, screened)
    check_shared({f"study set {s.name}": s.config.train for s in sets})  # trained together
    return sets


def union_config(cfg: Config) -> Config:
    """The config whose plan is the study's extraction: the union of the sets' revisions (pinned when
    every set names its revisions, else as many as the plan can tell)."""
    sets = planned_sets(cfg)
    order = list(cfg.pipeline.screen_revisions) or list(cfg.pipeline.revisions)
    names = list(dict.fromkeys(r for s in sets for r in s.revisions))
    pinned = [r for r in order if r in names] if all(r in order for r in names) else []
    p = dataclasses.replace(cfg.pipeline, revisions=tuple(pinned), n_checkpoints=max(2, len(names)))
    return dataclasses.replace(cfg, pipeline=p, study=dataclasses.replace(cfg.study, sets=()))


# -- the comparison -------------------------------------------------------------------------------

MATCH_COSINE = 0.7
"""Two features of different sets are matched at a checkpoint when their decoders there have at
least this cosine."""


@dataclass(frozen=True)
class SetTables:
    """What the comparison reads of one finished set."""

    name: str
    revisions: list[str]
    tokens_seen: list[int | None]
    effects: Any
    """The attribute stage's effects table (pandas)."""
    features: Any
    """The analyse stage's features table (pandas: group by RelDec)."""
    selected: dict[str, list[int]]
    """Per task, the selected top features."""
    decoders: dict[int, Any]
    """Each selected feature's decoder (C, D), for matching features across sets (only those: the
    whole W_dec of a paper-size set is 400 MB)."""


def timeline(s: SetTables) -> list[dict]:
    """Per task and checkpoint of a set: IE mass (sum of |IE| over every feature, and over the top
    features), the top features' groups by RelDec and by RelIE, their mean RelIE at the checkpoint."""
    rows = []
    groups = s.features.set_index("feature")["group"]
    for task, sub in s.effects.groupby("task", sort=True):
        top = s.selected.get(str(task), [])
        for c, (rev, seen) in enumerate(zip(s.revisions, s.tokens_seen, strict=True)):
            at = sub[sub.checkpoint_index == c]
            top_rows = at[at.feature.isin(top)]
            by_reldec = groups.reindex(top).fillna("").astype(str)
            rows.append({"task": str(task), "set": s.name, "revision": rev, "tokens_seen": seen,
                         "ie_mass": float(at.ie.abs().sum()), "top_ie_mass": float(top_rows.ie.abs().sum()),
                         "top_features": len(top),
                         "top_shared_by_reldec": int(by_reldec.str.contains("shared").sum()),
                         "top_specific_by_reldec": int((by_reldec == f"{rev} specific").sum()),
                         "top_specific_by_relie": int((top_rows.group == f"{rev} specific").sum()),
                         "top_mean_relie": float(top_rows.relie.mean()) if len(top_rows) else float("nan")})
    return rows


def new_feature_shares(s: SetTables) -> list[dict]:
    """For each adjacent pair a < b of a set and each task: how much of b's IE (sum of |IE|) comes
    from features new to b (b's share of a + b in RelIE above `NEW_FEATURE_SHARE`), how much from the
    others (shared with a, or a's)."""
    from crossray.store import column

    rows = []
    for task, sub in s.effects.groupby("task", sort=True):
        wide = sub.pivot_table(index="feature", columns="checkpoint_index", values="ie", aggfunc="first")
        for c in range(len(s.revisions) - 1):
            a, b = s.revisions[c], s.revisions[c + 1]
            ie_a, ie_b = wide[c].abs(), wide[c + 1].abs()
            if len(s.revisions) == 2:
                share_b = ie_b / (ie_a + ie_b).where(ie_a + ie_b > 0)
            else:
                pair = sub.drop_duplicates("feature").set_index("feature")[column("relie_pair", f"{a}-{b}")]
                share_b = pair.reindex(wide.index)
            new = share_b > NEW_FEATURE_SHARE
            total = float(ie_b.sum())
            rows.append({"task": str(task), "set": s.name, "earlier": a, "later": b, "ie_later": total,
                         "ie_later_from_new": float(ie_b[new].sum()), "new_features": int(new.sum()),
                         "share_from_new": float(ie_b[new].sum() / total) if total > 0 else float("nan")})
    return rows


def matched_features(a: SetTables, b: SetTables, k: int = 10) -> list[dict]:
    """Where sets a and b share a checkpoint: per task, how many of a's top-k features (by |IE| at
    that checkpoint) have a decoder there with cosine >= MATCH_COSINE to one of b's top-k, and the
    mean of the best cosines."""
    import torch

    rows = []
    for rev in [r for r in a.revisions if r in b.revisions]:
        ca, cb = a.revisions.index(rev), b.revisions.index(rev)
        for task in sorted(set(a.selected) & set(b.selected)):
            tops = [_top_at(s, task, c, k) for s, c in ((a, ca), (b, cb))]
            if not tops[0] or not tops[1]:
                continue
            unit = lambda s, c, top: torch.nn.functional.normalize(  # noqa: E731
                torch.stack([s.decoders[f][c] for f in top]).float(), dim=-1)
            da, db = unit(a, ca, tops[0]), unit(b, cb, tops[1])
            best = (da @ db.T).max(dim=1).values
            rows.append({"task": task, "revision": rev, "set_a": a.name, "set_b": b.name, "k": len(tops[0]),
                         "matched": int((best >= MATCH_COSINE).sum()),
                         "mean_best_cosine": float(best.mean())})
    return rows


def _top_at(s: SetTables, task: str, c: int, k: int) -> list[int]:
    sub = s.effects[(s.effects.task == task) & (s.effects.checkpoint_index == c)
                    & s.effects.feature.isin(s.selected.get(task, []))]
    return sub.assign(size=sub.ie.abs()).nlargest(k, "size").feature.astype(int).tolist()


def compare(sets: Sequence[SetTables], k: int = 10) -> dict[str, list[dict]]:
    """The study's comparison tables: `timeline`, `new_features`, `matched`."""
    return {"timeline": [row for s in sets for row in timeline(s)],
            "new_features": [row for s in sets for row in new_feature_shares(s)],
            "matched": [row for i, a in enumerate(sets) for b in sets[i + 1:]
                        for row in matched_features(a, b, k)]}
