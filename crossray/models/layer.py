"""Load any Hugging Face causal LM checkpoint and run it up to the residual stream entering block L.

`blocks.L.hook_resid_pre` in TransformerLens terms (method.md §1) is the input of decoder block L,
i.e. `output_hidden_states[L]` of the full model (`L = 0` is the embedding output). The truncated
forward raises out of a pre-hook on block L, so blocks L.. and the LM head never run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from crossray.checkpoints import CheckpointError, Family

logger = logging.getLogger(__name__)

# model_type -> dotted path of the decoder block list inside `AutoModelForCausalLM`
BLOCK_PATHS = {
    "gpt_neox": "gpt_neox.layers",
    "gpt2": "transformer.h",
    "bloom": "transformer.h",
    "gptj": "transformer.h",
    "falcon": "transformer.h",
    "llama": "model.layers",
    "olmo": "model.layers",
    "olmo2": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "opt": "model.decoder.layers",
}


def find_blocks(model: nn.Module, block_path: str | None = None) -> nn.ModuleList:
    """The decoder block list of `model`, by architecture or an explicit dotted `block_path`."""
    owner, attr = _block_owner(model, block_path)
    return getattr(owner, attr)


def _block_owner(model: nn.Module, block_path: str | None) -> tuple[nn.Module, str]:
    """(module holding the block list, attribute name), so the list can be swapped temporarily."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    path = block_path or BLOCK_PATHS.get(model_type or "")
    if path is None:
        raise ValueError(
            f"unknown architecture {model_type!r}: pass block_path (the dotted path of its block "
            f"list, e.g. 'model.layers'); known: {sorted(BLOCK_PATHS)}")
    obj: Any = model
    parts = path.split(".")
    for part in parts:
        if not hasattr(obj, part):
            raise ValueError(f"block_path {path!r} does not exist in {type(model).__name__}")
        owner, obj = obj, getattr(obj, part)
    if not isinstance(obj, nn.ModuleList):
        raise ValueError(f"block_path {path!r} is a {type(obj).__name__}, not a ModuleList")
    return owner, parts[-1]


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens (no BOS: the paper's convention)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def left_pad(tokenizer, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (input_ids, attention_mask) of token id lists."""
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    return input_ids, mask


def model_inputs(model, input_ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """Forward kwargs with position ids that ignore left padding (ALiBi models take none)."""
    kw = {"input_ids": input_ids, "attention_mask": mask, "use_cache": False}
    if model.config.model_type != "bloom":
        kw["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return kw


class _StopForward(Exception):  # noqa: N818 (control flow, not an error)
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


def check_layer(layer: int, n_blocks: int, what: str) -> None:
    if not 0 <= layer < n_blocks:
        raise CheckpointError(
            f"layer {layer} out of range for {what} with {n_blocks} blocks "
            f"(the residual stream entering block L exists for L = 0..{n_blocks - 1})")


@dataclass
class LayerModel:
    """A checkpoint truncated at the residual stream entering block `layer`."""

    model: nn.Module
    layer: int
    blocks: nn.ModuleList
    name: str = ""
    block_path: str | None = None

    def __post_init__(self) -> None:
        check_layer(self.layer, len(self.blocks), self.name or type(self.model).__name__)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    def resid_pre(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """Residual stream entering block `layer`, shape (B, S, D); later blocks never run."""
        def stop(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            raise _StopForward(hidden)

        handle = self.blocks[self.layer].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            self.model(**model_inputs(self.model, input_ids, attention_mask))
        except _StopForward as s:
            return s.hidden
        finally:
            handle.remove()
        raise AssertionError("block hook did not fire")  # pragma: no cover

    @contextmanager
    def _suffix_only(self, hidden_BSD: torch.Tensor) -> Iterator[None]:
        """Run only blocks `layer`.. with `hidden_BSD` entering block `layer` (the block list is
        sliced for the duration, so earlier blocks never run; embeddings still do, cheaply)."""
        owner, attr = _block_owner(self.model, self.block_path)
        full = getattr(owner, attr)
        setattr(owner, attr, nn.ModuleList(list(full)[self.layer:]))

        def swap(_module, args, kwargs):
            if args:
                return (hidden_BSD, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden_BSD}

        handle = getattr(owner, attr)[0].register_forward_pre_hook(swap, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            setattr(owner, attr, full)

    def logit_diff_from(self, hidden_BSD: torch.Tensor, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor, plus: torch.Tensor, minus: torch.Tensor
                        ) -> torch.Tensor:
        """logit[plus] - logit[minus] at the last position, (B,), with `hidden_BSD` entering block
        `layer`. Only the suffix runs, and only two rows of the unembedding are touched (the full
        vocabulary projection and its backward dominated integrated gradients)."""
        if getattr(self.model.config, "final_logit_softcapping", None):  # logits are not linear in h
            logits = self.last_logits_from(hidden_BSD, input_ids, attention_mask)
            rows = torch.arange(len(plus), device=logits.device)
            return logits[rows, plus].float() - logits[rows, minus].float()
        with self._suffix_only(hidden_BSD):
            out = self.model.base_model(**model_inputs(self.model, input_ids, attention_mask))
        h_BD = out.last_hidden_state[:, -1]  # final norm already applied by the base model
        head = self.model.get_output_embeddings()
        w_BD = head.weight[plus] - head.weight[minus]
        diff = (h_BD.float() * w_BD.float()).sum(-1)
        if getattr(head, "bias", None) is not None:
            diff = diff + (head.bias[plus] - head.bias[minus]).float()
        return diff

    def last_logits_from(self, hidden_BSD: torch.Tensor, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits at the last position, (B, V), with `hidden_BSD` as the residual entering block
        `layer`: only the suffix of the model runs and only the last position is unembedded."""
        with self._suffix_only(hidden_BSD):
            out = self.model(**model_inputs(self.model, input_ids, attention_mask), logits_to_keep=1)
        return out.logits[:, -1]


def load_tokenizer(family: Family, revision: str):
    """The family's tokenizer, left-padded with pad = eos when it defines none (like nnsight)."""
    from transformers import AutoTokenizer

    src, rev = family.tokenizer_location(revision)
    tok = AutoTokenizer.from_pretrained(src, revision=rev)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(family: Family, revision: str, dtype: torch.dtype | str = torch.float32, *,
               device: str | torch.device) -> nn.Module:
    """A checkpoint in `dtype`, whatever dtype it was saved in (pinned, so a checkpoint stored in fp16
    is not silently scored or differentiated in fp16; the paper ran fp32), on `device`: no default, so
    every caller names where its model computes (`rayenv.compute_device` in a Ray task)."""
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    src, rev = family.location(revision)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, revision=rev, dtype=dtype)
    except OSError as e:  # hub: unknown revision or repo, or offline without a cache
        raise CheckpointError(f"cannot load revision {revision!r} of {family.name}: {e}") from e
    return model.to(device).eval().requires_grad_(False)


def load_layer_model(family: Family, revision: str, layer: int, dtype: torch.dtype | str = torch.float32, *,
                     device: str | torch.device) -> LayerModel:
    model = load_model(family, revision, dtype=dtype, device=device)
    blocks = find_blocks(model, family.block_path)
    return LayerModel(model, layer, blocks, name=f"{family.name}@{revision}", block_path=family.block_path)
