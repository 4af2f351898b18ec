"""Minimal-pair tasks: readers for BLiMP, CLAMS/feature-circuits and MultiBLiMP, and scoring.

Every pair becomes `clean_prefix, clean_answer, patch_answer` with single-token answers, exactly as
the paper's `utils.py` does it (method.md §9.2-9.4):
- BLiMP (one-prefix rows): token-level longest common prefix of `prefix + good` and `prefix + bad`;
- CLAMS: the given prefix and answers;
- MultiBLiMP: word-level common prefix of `sen` and `wrong_sen`, answers `" " + first differing word`;
then each answer is re-tokenised: skipped if the two lengths differ or exceed 2; with 2 tokens the
first tokens are the answers when they differ, else the shared first token joins the prefix.
Skipped pairs are counted by reason, never dropped silently. Full sentences are kept for the
full-sentence log-probability comparison that BLiMP's standard metric uses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from crossray.models.layer import encode, left_pad, model_inputs

logger = logging.getLogger(__name__)

TaskFormat = Literal["auto", "blimp", "clams", "multiblimp"]
REQUIRED = {
    "blimp": ("sentence_good", "sentence_bad"),
    "blimp-one-prefix": ("one_prefix_prefix", "one_prefix_word_good", "one_prefix_word_bad"),
    "clams": ("clean_prefix", "clean_answer", "patch_answer"),
    "multiblimp": ("sen", "wrong_sen"),
}


class TaskError(ValueError):
    """A task file or data set that cannot be read (missing field, bad JSON, nothing left)."""


class PairError(TaskError):
    """One row of a request that cannot be used: names the row (0-based) and the field."""

    def __init__(self, row: int, field: str, problem: str):
        self.row, self.field = row, field
        super().__init__(f"pairs[{row}].{field}: {problem}")


TEXT_FIELDS = {
    "blimp": ("sentence_good", "sentence_bad", "one_prefix_prefix", "one_prefix_word_good",
              "one_prefix_word_bad"),
    "clams": ("clean_prefix", "clean_answer", "patch_answer", "patch_prefix"),
    "multiblimp": ("sen", "wrong_sen"),
}
"""The fields of each format that hold text a model reads."""


MAX_FIELD_CHARS, MAX_REQUEST_TOKENS = 2000, 8192
"""Default bounds of a request's pairs: characters per text field, tokens of all the text together
(the API's `LiveLimits` defaults)."""


def check_request_rows(rows: list[dict], max_chars: int) -> None:
    """Rows sent over HTTP, before any model sees them: a known format, every text field non-empty,
    no string over `max_chars` characters. Raises `PairError` naming the first bad row and field."""
    for i, row in enumerate(rows):
        for key, value in row.items():
            if isinstance(value, str) and len(value) > max_chars:
                raise PairError(i, key, f"{len(value)} characters; at most {max_chars} per field")
        try:
            fmt = detect_format(row)
        except TaskError as e:
            raise PairError(i, "*", str(e)) from None
        for key in TEXT_FIELDS[fmt]:
            if isinstance(row.get(key), str) and not row[key].strip():
                raise PairError(i, key, "is empty")


def check_request_tokens(rows: list[dict], tokenizer, max_tokens: int) -> None:
    """The rows' text fields together hold at most `max_tokens` tokens (a bound on the model work of a
    request); raises `PairError` at the row where the total passes it."""
    texts, owners = [], []
    for i, row in enumerate(rows):
        for key in TEXT_FIELDS.get(detect_format(row), ()):
            if isinstance(row.get(key), str):
                texts.append(row[key])
                owners.append((i, key))
    if not texts:
        return
    total = 0
    for (i, key), ids in zip(owners, tokenizer(texts, add_special_tokens=False)["input_ids"], strict=True):
        total += len(ids)
        if total > max_tokens:
            raise PairError(i, key, f"the request's text reaches {total} tokens here; at most {max_tokens} "
                            "per request")


@dataclass(frozen=True)
class Example:
    clean_prefix: str
    clean_answer: str
    patch_answer: str
    clean_answer_id: int
    patch_answer_id: int
    pair_id: str = ""
    patch_prefix: str | None = None
    """Counterfactual prefix (feature-circuits tasks); the IE baseline when it has as many tokens."""


@dataclass
class Task:
    name: str
    source: str
    format: str
    examples: list[Example]
    """Pairs reduced to single-token answers (the prefix metric, IE)."""
    sentences: list[tuple[str, str]]
    """(good, bad) full sentences of every row (the full-sentence metric)."""
    n_rows: int
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> dict:
        return {"task": self.name, "rows": self.n_rows, "kept": len(self.examples),
                "skipped": sum(self.skipped.values()), "skip_reasons": dict(self.skipped)}


# -- the single-token rule -----------------------------------------------------------------------

def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def reduce_to_single_tokens(tokenizer, prefix: str, clean: str, patch: str, pair_id: str = ""
                            ) -> Example | str:
    """Example with single-token answers, or the reason the pair is skipped (method.md §9.2)."""
    ca, pa = encode(tokenizer, clean), encode(tokenizer, patch)
    if ca == pa:
        return "identical_answers"
    if len(ca) != len(pa):
        return "answer_length_mismatch"
    if len(ca) > 2 or not ca:
        return "answer_too_long" if ca else "empty_answer"
    if len(ca) == 2:
        if ca[0] != pa[0]:
            ca, pa = ca[:1], pa[:1]
        else:
            prefix = prefix + _decode(tokenizer, ca[:1])
            ca, pa = ca[1:], pa[1:]
    if not encode(tokenizer, prefix):  # nothing to condition on (and no position to patch)
        return "empty_prefix"
    return Example(prefix, _decode(tokenizer, ca), _decode(tokenizer, pa), ca[0], pa[0], pair_id)


def blimp_example(tokenizer, prefix: str, good: str, bad: str, pair_id: str = "") -> Example | str:
    """Token-level prefix split of a one-prefix BLiMP row, then the single-token rule."""
    ta = encode(tokenizer, prefix.strip() + " " + good.strip())
    tb = encode(tokenizer, prefix.strip() + " " + bad.strip())
    n = 0
    while n < min(len(ta), len(tb)) and ta[n] == tb[n]:
        n += 1
    return reduce_to_single_tokens(tokenizer, _decode(tokenizer, ta[:n]),
                                   _decode(tokenizer, ta[n:]), _decode(tokenizer, tb[n:]), pair_id)


def word_example(tokenizer, good: str, bad: str, pair_id: str = "") -> Example | str:
    """Word-level prefix split (CLAMS string version, MultiBLiMP), then the single-token rule."""
    wg, wb = good.split(), bad.split()
    n = 0
    while n < min(len(wg), len(wb)) and wg[n] == wb[n]:
        n += 1
    if n == len(wg) or n == len(wb):
        return "no_differing_word"
    return reduce_to_single_tokens(tokenizer, " ".join(wg[:n]), " " + wg[n], " " + wb[n], pair_id)


# -- readers -------------------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; a UTF-8 byte-order mark and CRLF line ends are accepted, and a line that
    is not UTF-8 or not a JSON object is an error naming the file and the line."""
    rows = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise TaskError(f"{path}:{i}: not valid UTF-8 (byte {raw[e.start]:#04x} at column "
                                f"{e.start + 1})") from e
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{i}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise TaskError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    if not rows:
        raise TaskError(f"{path}: no rows")
    return rows


def detect_format(row: dict) -> str:
    if "sen" in row or "wrong_sen" in row:
        return "multiblimp"
    if "clean_prefix" in row:
        return "clams"
    if "sentence_good" in row or "one_prefix_prefix" in row:
        return "blimp"
    raise TaskError(f"cannot tell the task format from fields {sorted(row)}; pass the format")


def _require(rows: list[dict], fields: tuple[str, ...], where: str) -> None:
    for i, row in enumerate(rows, 1):
        missing = [f for f in fields if not isinstance(row.get(f), str)]
        if missing:
            raise TaskError(f"{where}:{i}: missing or non-string field(s) {missing}")


def rows_to_task(rows: list[dict], tokenizer, name: str, source: str, fmt: str = "auto") -> Task:
    fmt = detect_format(rows[0]) if fmt == "auto" else fmt
    skipped: Counter = Counter()
    examples: list[Example] = []
    sentences: list[tuple[str, str]] = []

    def keep(result: Example | str) -> None:
        if isinstance(result, str):
            skipped[result] += 1
        else:
            examples.append(result)

    match fmt:
        case "blimp":
            _require(rows, REQUIRED["blimp"], source)
            one = [bool(r.get("one_prefix_method")) for r in rows]
            if any(one) and not all(one):
                raise TaskError(f"{source}: mixes one-prefix and two-prefix rows")
            sentences = [(r["sentence_good"], r["sentence_bad"]) for r in rows]
            if all(one):
                _require(rows, REQUIRED["blimp-one-prefix"], source)
                for r in rows:
                    keep(blimp_example(tokenizer, r["one_prefix_prefix"], r["one_prefix_word_good"],
                                       r["one_prefix_word_bad"], str(r.get("pairID", ""))))
            else:
                skipped["two_prefix"] += len(rows)
        case "clams":
            _require(rows, REQUIRED["clams"], source)
            for i, r in enumerate(rows):
                ex = reduce_to_single_tokens(tokenizer, r["clean_prefix"], r["clean_answer"],
                                             r["patch_answer"], str(r.get("pairID", i)))
                if isinstance(ex, Example) and isinstance(r.get("patch_prefix"), str):
                    ex = dataclasses.replace(ex, patch_prefix=r["patch_prefix"])
                keep(ex)
                good = r.get("sentence_good") or r["clean_prefix"] + r["clean_answer"]
                bad = r.get("sentence_bad") or r["clean_prefix"] + r["patch_answer"]
                sentences.append((good, bad))
        case "multiblimp":
            _require(rows, REQUIRED["multiblimp"], source)
            for i, r in enumerate(rows):
                keep(word_example(tokenizer, r["sen"], r["wrong_sen"], str(r.get("pairID", i))))
                sentences.append((r["sen"], r["wrong_sen"]))
        case other:
            raise TaskError(f"unknown task format {other!r}; known: blimp, clams, multiblimp")
    task = Task(name, source, fmt, examples, sentences, len(rows), skipped)
    logger.info("task %s: %d rows, %d kept, skipped %s", name, len(rows), len(examples),
                dict(skipped) or "none")
    return task


def load_task(spec: str | Path, tokenizer, fmt: TaskFormat = "auto", name: str | None = None,
              hub_config: str | None = None, split: str = "train") -> Task:
    """A task from a local JSONL file, or a hub data set name (`datasets.load_dataset`) when online."""
    path = Path(spec)
    if path.suffix == ".jsonl" or path.exists():
        if not path.is_file():
            raise TaskError(f"task file {path} does not exist")
        return rows_to_task(read_jsonl(path), tokenizer, name or path.stem, str(path), fmt)
    import datasets

    try:
        ds = datasets.load_dataset(str(spec), hub_config, split=split)
    except Exception as e:  # noqa: BLE001 (datasets raises many types; all mean "not loadable")
        raise TaskError(f"cannot load task data set {spec!r} ({hub_config}): {e}") from e
    rows = [dict(r) for r in ds]
    if not rows:
        raise TaskError(f"task data set {spec!r} is empty")
    return rows_to_task(rows, tokenizer, name or f"{spec}:{hub_config}", str(spec), fmt)


def load_tasks(specs: list[str | Path], tokenizer) -> list[Task]:
    """Tasks from files, folders of `*.jsonl` files, or hub names."""
    tasks = []
    for spec in specs:
        p = Path(spec)
        files = sorted(p.glob("*.jsonl")) if p.is_dir() else [spec]
        if p.is_dir() and not files:
            raise TaskError(f"task folder {p} holds no *.jsonl files")
        tasks += [load_task(f, tokenizer) for f in files]
    return tasks


# -- scoring -------------------------------------------------------------------------------------

@torch.inference_mode()
def prefix_logit_diffs(model, tokenizer, examples: list[Example], batch_size: int = 64
                       ) -> torch.Tensor:
    """logit(clean) - logit(patch) at the last prefix position, per example."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        ids, mask = left_pad(tokenizer, [encode(tokenizer, e.clean_prefix) for e in chunk])
        logits = model(**model_inputs(model, ids.to(device), mask.to(device))).logits[:, -1].float()
        clean = torch.tensor([e.clean_answer_id for e in chunk], device=device)
        patch = torch.tensor([e.patch_answer_id for e in chunk], device=device)
        rows = torch.arange(len(chunk), device=device)
        out.append((logits[rows, clean] - logits[rows, patch]).cpu())
    return torch.cat(out) if out else torch.empty(0)


@torch.inference_mode()
def sentence_logprobs(model, tokenizer, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
    """Total log-probability of each sentence, conditioned on an end-of-text token (lm-eval's way).

    Only targets whose preceding token is real count: with left padding, the first real token (the
    end-of-text) follows a pad, and scoring it would make a sentence's score depend on the padding
    of its batch. So scores equal one-sentence-at-a-time scoring whatever the batch."""
    device = next(model.parameters()).device
    bos = tokenizer.eos_token_id if tokenizer.bos_token_id is None else tokenizer.bos_token_id
    out = []
    for i in range(0, len(sentences), batch_size):
        ids = [[bos] + encode(tokenizer, s) for s in sentences[i:i + batch_size]]
        input_ids, mask = left_pad(tokenizer, ids)
        input_ids, mask = input_ids.to(device), mask.to(device)
        logp = model(**model_inputs(model, input_ids, mask)).logits[:, :-1].float().log_softmax(-1)
        real_pair = mask[:, 1:] * mask[:, :-1]  # target and its context token both real
        tok_lp = logp.gather(-1, input_ids[:, 1:, None])[..., 0] * real_pair
        out.append(tok_lp.sum(-1).cpu())
    return torch.cat(out) if out else torch.empty(0)


def score_task(model, tokenizer, task: Task, batch_size: int = 64) -> dict:
    """Prefix-logit accuracy (single-token examples) and full-sentence accuracy (all rows)."""
    diffs = prefix_logit_diffs(model, tokenizer, task.examples, batch_size)
    good = sentence_logprobs(model, tokenizer, [g for g, _ in task.sentences], batch_size)
    bad = sentence_logprobs(model, tokenizer, [b for _, b in task.sentences], batch_size)
    return {
        "task": task.name,
        "prefix_accuracy": float((diffs > 0).float().mean()) if len(diffs) else float("nan"),
        "prefix_logit_diff": float(diffs.mean()) if len(diffs) else float("nan"),
        "sentence_accuracy": float((good > bad).float().mean()) if len(good) else float("nan"),
        "n_prefix": len(diffs),
        "n_sentence": len(good),
        "n_skipped": sum(task.skipped.values()),
    }
