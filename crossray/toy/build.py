"""Build the embedded default: a tiny GPT-NeoX family pretrained locally, with Pythia-style revisions.

Steps (all seeded, CPU, a minute or two on 2 cores):
1. generate the toy corpus (`grammar.Grammar`), documents of whole sentences, written as JSONL;
2. train a byte-level BPE tokenizer on it with `tokenizers`, like GPT-NeoX's (no BOS is prepended);
3. train a tiny GPT-NeoX with plain torch on fixed-length token sequences (the first `seq_len` tokens of
   each document, like the paper's corpus), saving `save_pretrained` checkpoints at log-spaced steps
   named like Pythia revisions (`step0`, `step16`, ...);
4. write minimal-pair task files in BLiMP's native JSONL format.

The result lives in one folder, keyed by the hash of its config; a folder holding a finished build
of the same config is reused as is. The build holds the cache entry's lock (`crossray.cache`): a second
process asking for the same family waits for the first and reuses its build; it is built in a private
folder and renamed into place whole; a folder whose `family.json` lists a revision, task or corpus file
that is not on disk is rebuilt, not used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from crossray.cache import cache_dir, entry_lock
from crossray.toy.grammar import PARADIGMS, Grammar, answer_words, minimal_pair

logger = logging.getLogger(__name__)

FAMILY_FILE = "family.json"
BUILD_VERSION = 1  # bump when the build's output changes for the same config


@dataclass(frozen=True)
class ToyConfig:
    """Everything that determines the toy family; its hash keys the cache."""

    seed: int = 0
    """Seed of the corpus, the tokenizer order, the model init and the data order."""
    n_documents: int = 6000
    """Documents in the training corpus."""
    sentences_per_document: int = 12
    """Sentences per document; documents shorter than `seq_len` tokens are dropped."""
    vocab_size: int = 1024
    """BPE vocabulary size (must leave every task answer a single token)."""
    seq_len: int = 64
    """Tokens per training sequence (the first `seq_len` tokens of a document)."""
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    batch_size: int = 32
    lr: float = 6e-4
    max_step: int = 1000
    """Last training step (the `main`-like final revision is `step{max_step}`)."""
    checkpoint_steps: tuple[int, ...] = (0, 32, 64, 96, 128, 160, 192, 256, 384, 512, 768, 1000)
    """Steps at which a revision is saved: dense where agreement emerges (about 64-384), like Pythia's."""
    n_task_pairs: int = 200
    """Minimal pairs per task paradigm."""

    def __post_init__(self) -> None:
        if sorted(self.checkpoint_steps) != list(self.checkpoint_steps):
            raise ValueError("checkpoint_steps must be increasing")
        if self.checkpoint_steps[-1] != self.max_step:
            raise ValueError("checkpoint_steps must end at max_step")
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")

    def key(self) -> str:
        blob = json.dumps({"version": BUILD_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_family_dir(cfg: ToyConfig) -> Path:
    return cache_dir() / f"toy-{cfg.key()}"


def missing_parts(out: Path, meta: dict) -> list[str]:
    """What `family.json` lists that is not on disk: revisions (config and weights), tasks, corpus."""
    wanted = [f"{r}/config.json" for r in meta.get("revisions", [])]
    wanted += [f"{r}/model.safetensors" for r in meta.get("revisions", [])]
    wanted += [(Path("tasks") / t).as_posix() for t in meta.get("tasks", [])]
    wanted += ["corpus/train.jsonl", "corpus/validation.jsonl"]
    return [w for w in wanted if not (out / w).is_file()]


def is_built(out: Path, cfg: ToyConfig) -> bool:
    """A finished, complete build of `cfg` is in `out`."""
    try:
        meta = json.loads((out / FAMILY_FILE).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("config_key") == cfg.key() and not missing_parts(out, meta)


def build_toy_family(out: str | Path | None = None, cfg: ToyConfig | None = None) -> Path:
    """Build the toy family into `out` (default: the cache folder for `cfg`); reuse a finished build,
    or wait for another process building it."""
    cfg = cfg or ToyConfig()
    out = Path(out) if out is not None else default_family_dir(cfg)
    if is_built(out, cfg):
        logger.info("toy family %s already built in %s", cfg.key(), out)
        return out
    with entry_lock(out):
        if is_built(out, cfg):  # another process built it while this one waited
            logger.info("toy family %s built by another process in %s", cfg.key(), out)
            return out
        return _build(out, cfg)


def _build(out: Path, cfg: ToyConfig) -> Path:
    if out.exists() and any(out.iterdir()):
        if (out / FAMILY_FILE).exists() or (out / ".building").exists():
            meta = json.loads((out / FAMILY_FILE).read_text()) if (out / FAMILY_FILE).exists() else {}
            missing = missing_parts(out, meta)[:5] if meta.get("config_key") == cfg.key() else []
            logger.warning("replacing the toy family in %s (%s)", out, f"incomplete: missing {missing}"
                           if missing else "another config, or an interrupted build")
            shutil.rmtree(out)
        else:
            raise ValueError(f"{out} exists and is not a toy family folder; refusing to overwrite it")
    tmp = out.with_name(out.name + ".tmp")  # private: only the lock holder writes here
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / ".building").touch()
    t0 = time.time()
    docs = write_corpus(tmp / "corpus", cfg)
    tokenizer = train_tokenizer(docs, cfg)
    check_single_token_answers(tokenizer)
    write_tasks(tmp / "tasks", cfg)
    history = train_model(tmp, tokenizer, docs, cfg)
    meta = {
        "name": "toy",
        "config_key": cfg.key(),
        "config": dataclasses.asdict(cfg),
        "revisions": [f"step{s}" for s in cfg.checkpoint_steps],
        "tokens_per_step": cfg.batch_size * cfg.seq_len,
        "naming": "pythia",
        "tasks": sorted(p.name for p in (tmp / "tasks").glob("*.jsonl")),
        "loss_history": history,
        "build_seconds": round(time.time() - t0, 1),
    }
    (tmp / FAMILY_FILE).write_text(json.dumps(meta, indent=2))
    (tmp / ".building").unlink()
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    logger.info("built toy family %s in %.0fs: %s", cfg.key(), time.time() - t0, out)
    return out


# -- corpus --------------------------------------------------------------------------------------

def write_corpus(folder: Path, cfg: ToyConfig) -> list[str]:
    """Write train/validation JSONL documents (field `text`) and return the train documents."""
    folder.mkdir(parents=True)
    grammar = Grammar(cfg.seed)
    n_val = max(cfg.n_documents // 20, 16)
    docs = [grammar.document(cfg.sentences_per_document) for _ in range(cfg.n_documents + n_val)]
    for split, part in (("train", docs[:cfg.n_documents]), ("validation", docs[cfg.n_documents:])):
        with open(folder / f"{split}.jsonl", "w") as f:
            for d in part:
                f.write(json.dumps({"text": d}) + "\n")
    return docs[: cfg.n_documents]


def write_tasks(folder: Path, cfg: ToyConfig) -> None:
    folder.mkdir(parents=True)
    grammar = Grammar(cfg.seed + 1)  # tasks use their own stream, not sentences of the corpus
    for uid in PARADIGMS:
        with open(folder / f"{uid}.jsonl", "w") as f:
            for i in range(cfg.n_task_pairs):
                f.write(json.dumps(minimal_pair(grammar, uid, i)) + "\n")


# -- tokenizer -----------------------------------------------------------------------------------

EOS = "<|endoftext|>"
PAD = "<|padding|>"


def train_tokenizer(docs: list[str], cfg: ToyConfig):
    """Byte-level BPE like GPT-NeoX's, wrapped so `AutoTokenizer.from_pretrained` loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   bos_token=EOS, unk_token=None, model_max_length=cfg.seq_len * 4)


def check_single_token_answers(tokenizer) -> None:
    long = [w for w in sorted(answer_words()) if len(tokenizer.encode(" " + w)) != 1]
    if long:
        raise ValueError(f"toy tokenizer splits task answers {long}; raise vocab_size")


# -- model ---------------------------------------------------------------------------------------

def _model_config(cfg: ToyConfig, vocab_size: int, tokenizer):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=4 * cfg.hidden_size,
        max_position_embeddings=cfg.seq_len * 4,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tokenize_documents(tokenizer, docs: list[str], seq_len: int) -> torch.Tensor:
    """First `seq_len` tokens of every document at least that long, like the paper's corpus."""
    from crossray.tokens import pack

    rows = pack(tokenizer, docs, seq_len)
    if not len(rows):
        raise ValueError(f"no document has {seq_len} tokens")
    return torch.from_numpy(rows).long()


def _lr_at(step: int, cfg: ToyConfig) -> float:
    warmup = 16
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.max_step - warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_model(out: Path, tokenizer, docs: list[str], cfg: ToyConfig) -> list[dict]:
    """Train the tiny GPT-NeoX and save a revision at every checkpoint step; return the loss curve."""
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(cfg.seed)
    data = tokenize_documents(tokenizer, docs, cfg.seq_len)
    model = GPTNeoXForCausalLM(_model_config(cfg, len(tokenizer), tokenizer))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)
    gen = torch.Generator().manual_seed(cfg.seed)
    saves = set(cfg.checkpoint_steps)
    history, step = [], 0
    model.train()
    with tqdm(total=cfg.max_step, desc="toy pretraining", disable=None) as bar:
        while True:
            if step in saves:
                _save_revision(model, tokenizer, out / f"step{step}")
            if step == cfg.max_step:
                break
            idx = torch.randint(len(data), (cfg.batch_size,), generator=gen)
            batch = data[idx]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % 50 == 0 or step == 1:
                history.append({"step": step, "loss": round(loss.item(), 4)})
                bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
    return history


def _save_revision(model, tokenizer, folder: Path) -> None:
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model.train()

