"""Model families, their pretraining checkpoints (revisions), tokens seen, and weight hashes.

A family is either a hub repo with a list of revisions (Pythia `stepN`/`main`, OLMo
`stepN-tokensXB`/`main`, BLOOM `global_stepN`/`main` with its tokenizer in another repo) or a local
folder whose sub-folders are revisions (the toy family). Either way a checkpoint loads through
`from_pretrained(source, revision=...)`, so the toy exercises the real code path.

Checkpoint sets are refused when two members have identical weights: public Pythia branches have
served identical weights under different names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

Naming = Literal["pythia", "olmo", "bloom", "plain"]

# Tokens per optimizer step, and the step `main` points at, per naming scheme.
PYTHIA_TOKENS_PER_STEP = 2_097_152  # 1024 sequences x 2048 tokens
PYTHIA_MAIN_STEP = 143_000
BLOOM_TOKENS_PER_STEP = 550_000  # the paper's label convention (method.md §1.1), not exact
BLOOM_MAIN_STEP = 620_000  # 341B / 550k, so `main` gets the paper's 341B label


class CheckpointError(ValueError):
    """A checkpoint or checkpoint set that cannot be used (missing, duplicate, malformed)."""


@dataclass(frozen=True)
class Revision:
    name: str
    step: int | None
    tokens_seen: int | None

    @property
    def label(self) -> str:
        return format_tokens(self.tokens_seen) if self.tokens_seen is not None else self.name


def format_tokens(t: int) -> str:
    """The paper's token labels: 1B, 128M, ... (method.md §1.1)."""
    if t >= 1e9:
        return f"{t / 1e9:.0f}B"
    if t >= 1e6:
        return f"{t / 1e6:.0f}M"
    return str(t)


def parse_revision(name: str, naming: Naming, tokens_per_step: int | None = None) -> Revision:
    """Step and tokens seen of a revision name under a naming scheme."""
    match naming:
        case "pythia":
            step = PYTHIA_MAIN_STEP if name == "main" else _step(name, r"step(\d+)")
            per = tokens_per_step or PYTHIA_TOKENS_PER_STEP
            return Revision(name, step, step * per if step is not None else None)
        case "olmo":
            if name == "main":
                return Revision(name, None, None)
            m = re.fullmatch(r"step(\d+)-tokens(\d+)B", name)
            if not m:
                raise CheckpointError(f"OLMo revision {name!r} is not of the form stepN-tokensXB")
            return Revision(name, int(m[1]), int(m[2]) * 1_000_000_000)
        case "bloom":
            step = BLOOM_MAIN_STEP if name == "main" else _step(name, r"global_step(\d+)")
            per = tokens_per_step or BLOOM_TOKENS_PER_STEP
            return Revision(name, step, step * per if step is not None else None)
        case "plain":
            m = re.search(r"(\d+)$", name)
            step = int(m[1]) if m else None
            tokens = step * tokens_per_step if step is not None and tokens_per_step else None
            return Revision(name, step, tokens)
        case other:
            raise ValueError(f"unknown naming scheme {other!r}")


def _step(name: str, pattern: str) -> int:
    m = re.fullmatch(pattern, name)
    if not m:
        raise CheckpointError(f"revision {name!r} does not match {pattern!r}")
    return int(m[1])


@dataclass(frozen=True)
class Family:
    """A model family: where its checkpoints live and how its revisions are named."""

    name: str
    source: str
    """Hub repo id, or a local folder whose sub-folders are revisions."""
    revisions: tuple[str, ...] = ()
    """Revisions to consider; empty means every sub-folder of a local family."""
    naming: Naming = "pythia"
    tokenizer: str | None = None
    """Tokenizer repo or folder when it is not stored with the checkpoints (BLOOM intermediate)."""
    tokens_per_step: int | None = None
    block_path: str | None = None
    """Dotted path of the block list, for architectures crossray does not know."""

    def stage_identity(self) -> str:
        """A family in a stage key: its name (its checkpoints enter keys by their weight hashes)."""
        return self.name

    @property
    def is_local(self) -> bool:
        return Path(self.source).exists() or self.source.startswith(("/", "./", "../"))

    @classmethod
    def from_dir(cls, folder: str | Path, **overrides) -> Family:
        """A local family; reads `family.json` (toy builds) when present."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"family folder {folder} does not exist")
        meta_file = folder / "family.json"
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        kwargs = dict(
            name=meta.get("name", folder.name),
            source=str(folder),
            revisions=tuple(meta.get("revisions", ())),
            naming=meta.get("naming", "plain"),
            tokens_per_step=meta.get("tokens_per_step"),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def available_revisions(self) -> list[str]:
        if self.revisions:
            return list(self.revisions)
        if not self.is_local:
            raise CheckpointError(f"family {self.name}: a hub family needs an explicit revision list")
        subs = [p.name for p in Path(self.source).iterdir() if (p / "config.json").exists()]
        return sorted(subs, key=lambda r: (parse_revision(r, self.naming, self.tokens_per_step).step
                                           or 0, r))

    def revision(self, name: str) -> Revision:
        return parse_revision(name, self.naming, self.tokens_per_step)

    def location(self, revision: str) -> tuple[str, str | None]:
        """(`from_pretrained` path or repo, revision argument) of a checkpoint; checks local folders."""
        if self.is_local:
            path = Path(self.source) / revision
            if not (path / "config.json").exists():
                root = Path(self.source)
                on_disk = [r for r in self.available_revisions() if (root / r / "config.json").exists()]
                listed = (f"; {revision!r} is listed in {root}/family.json but missing on disk (an "
                          "interrupted build: delete the folder to rebuild it)"
                          ) if revision in self.revisions else ""
                raise CheckpointError(
                    f"revision {revision!r} of family {self.name} not found: no {path}/config.json "
                    f"(available: {', '.join(on_disk) or 'none'}){listed}")
            return str(path), None
        return self.source, revision

    def tokenizer_location(self, revision: str) -> tuple[str, str | None]:
        if self.tokenizer:
            return self.tokenizer, None
        return self.location(revision)


def resolve_family(spec: str, revisions: Sequence[str] | None = None, naming: str | None = None,
                   tokenizer: str | None = None) -> Family:
    """A family from `toy` (the embedded default, built or reused), a local folder, or a hub repo;
    the revisions, naming scheme and tokenizer override the family's own when given."""
    given = {"revisions": tuple(revisions or ()), "naming": naming, "tokenizer": tokenizer}
    overrides = {k: v for k, v in given.items() if v}
    if spec == "toy":
        from crossray.toy.build import build_toy_family

        return Family.from_dir(build_toy_family(), **overrides)
    if Path(spec).expanduser().is_dir():
        return Family.from_dir(Path(spec).expanduser(), **overrides)
    if spec.startswith(("/", ".", "~")):
        raise CheckpointError(f"family folder {spec} does not exist")
    overrides.setdefault("naming", "pythia")
    return Family(name=spec.split("/")[-1], source=spec, **overrides)


# -- weight hashes -------------------------------------------------------------------------------

def weights_hash(path: str | Path) -> str:
    """SHA-256 over a checkpoint folder's tensors (names, dtypes, shapes, bytes), file-layout free.

    Remembered per folder in `$CROSSRAY_CACHE/weight-hashes.json`, keyed by the files' paths, sizes
    and modification times, so re-planning a run does not re-read gigabytes of weights.
    """
    files = sorted(Path(path).resolve().glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {path}")
    from crossray.cache import cache_dir, entry_lock

    cache = cache_dir() / "weight-hashes.json"
    stat = json.dumps([(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files])
    known = _read_json(cache)
    if stat in known:
        return known[stat]
    digest = _hash_tensors(files)  # outside the lock: gigabytes at scale
    with entry_lock(cache):  # read, add, replace: two runs hashing at once both keep their entries
        known = {**_read_json(cache), stat: digest}
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(known))
        tmp.replace(cache)
    return digest


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _hash_tensors(files: list[Path]) -> str:
    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    tensors = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensors[k] = (f, k)
    for name in sorted(tensors):
        f, k = tensors[name]
        with safe_open(f, framework="pt") as st:
            t = st.get_tensor(k).contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def checkpoint_hash(family: Family, revision: str) -> str:
    """Weight hash of one checkpoint; hub checkpoints go through the hub cache (offline-safe)."""
    src, rev = family.location(revision)
    if rev is None:
        return weights_hash(src)
    from huggingface_hub import snapshot_download

    return weights_hash(snapshot_download(src, revision=rev, allow_patterns=["*.safetensors"]))


@dataclass(frozen=True)
class CheckpointSet:
    family: Family
    revisions: tuple[str, ...]
    hashes: tuple[str, ...]

    def describe(self) -> list[dict]:
        out = []
        for rev, h in zip(self.revisions, self.hashes, strict=True):
            r = self.family.revision(rev)
            out.append({"revision": rev, "step": r.step, "tokens_seen": r.tokens_seen,
                        "label": r.label, "weights_sha256": h})
        return out


def resolve_checkpoint_set(family: Family, revisions: list[str] | tuple[str, ...]) -> CheckpointSet:
    """Hash every checkpoint of the set; refuse fewer than two or any two with identical weights."""
    if len(revisions) < 2:
        raise CheckpointError(f"a checkpoint set needs at least 2 revisions, got {list(revisions)}")
    if len(set(revisions)) != len(revisions):
        raise CheckpointError(f"revision listed twice in {list(revisions)}")
    hashes = [checkpoint_hash(family, r) for r in revisions]
    seen: dict[str, str] = {}
    for rev, h in zip(revisions, hashes, strict=True):
        if h in seen:
            raise CheckpointError(
                f"checkpoints {seen[h]!r} and {rev!r} of family {family.name} have identical "
                f"weights (sha256 {h[:12]}); a crosscoder over them is meaningless")
        seen[h] = rev
    return CheckpointSet(family, tuple(revisions), tuple(hashes))
