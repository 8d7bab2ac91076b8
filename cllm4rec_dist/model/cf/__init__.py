"""Sequential collaborative-filtering models (A-LLMRec's stage 0), behind one small interface.

A-LLMRec is model-agnostic in its CF model: any model that gives item embeddings, a user
representation from a time-ordered history and candidate scores can be aligned with the LLM.
``SequentialCF`` is that contract; ``CF_MODELS`` maps a config name to an implementation.

Conventions shared by every implementation and every caller:
* items are the dataset's contiguous indices ``0 .. num_items-1``;
* a batch of histories is a LongTensor ``[B, L]``, right-aligned (the most recent item last) and
  left-padded with ``PAD`` (= -1); ``pad_histories`` builds it and keeps the last ``max_len`` items;
* ``user_representation`` is the representation at the last (most recent) position, the x_u of
  the A-LLMRec paper, and ``score(h, c) == (user_representation(h)[:, None] * item_embeddings()[c]).sum(-1)``
  for dot-product models.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

PAD = -1


def pad_histories(histories: list[list[int]], max_len: int) -> torch.Tensor:
    """Right-aligned, left-padded ``[B, max_len]`` LongTensor of the last ``max_len`` items of each history."""
    out = torch.full((len(histories), max_len), PAD, dtype=torch.long)
    for row, items in enumerate(histories):
        tail = list(items)[-max_len:]
        if tail:
            out[row, max_len - len(tail):] = torch.as_tensor(tail, dtype=torch.long)
    return out


class SequentialCF(nn.Module):
    """The interface every stage-0 CF model implements (see the module docstring)."""

    name: str
    """The model's key in ``CF_MODELS``."""
    num_items: int
    dim: int

    def item_embeddings(self) -> torch.Tensor:
        """``[num_items, dim]``: E_i, the item table the model scores with."""
        raise NotImplementedError

    def sequence_output(self, histories: torch.Tensor) -> torch.Tensor:
        """``[B, L, dim]``: the output after each position (what next-item training scores); zero at PAD."""
        raise NotImplementedError

    def user_representation(self, histories: torch.Tensor) -> torch.Tensor:
        """``[B, dim]``: x_u, the model's output at the most recent position of each history."""
        return self.sequence_output(histories)[:, -1]

    def score(self, histories: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """``[B, C]`` scores of ``candidates`` (``[B, C]`` item indices) after each history."""
        users = self.user_representation(histories)
        return (users[:, None, :] * self.item_embeddings()[candidates]).sum(-1)

    def config(self) -> dict:
        """What rebuilds the model with ``build_cf_model``: its registered name, catalogue size and settings."""
        return {"model": self.name, "num_items": self.num_items, "settings": dataclasses.asdict(self.settings)}


# name -> class; filled by the implementations' modules (sasrec, gru4rec, ...).
CF_MODELS: dict[str, type[SequentialCF]] = {}


def build_cf_model(config: dict) -> SequentialCF:
    """A model from its ``config()`` dict: ``{"model": name, "num_items": J, "settings": {...}}``."""
    name = config.get("model")
    if name not in CF_MODELS:
        raise ValueError(f"unknown CF model {name!r}; known: {', '.join(sorted(CF_MODELS))}")
    cls = CF_MODELS[name]
    return cls(int(config["num_items"]), cls.Settings(**config.get("settings", {})))


# The implementations register themselves on import (imported last: they import this module).
from cllm4rec_dist.model.cf import gru4rec, sasrec  # noqa: E402,F401
from cllm4rec_dist.model.options import CF_MODEL_NAMES  # noqa: E402

if sorted(CF_MODELS) != sorted(CF_MODEL_NAMES):  # the names a config is checked against, without torch
    raise ImportError(f"model/options.py CF_MODEL_NAMES {CF_MODEL_NAMES} != registered {sorted(CF_MODELS)}")
