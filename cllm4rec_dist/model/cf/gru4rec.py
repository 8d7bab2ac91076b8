"""GRU4Rec (Hidasi et al., ICLR 2016): a recurrent sequential recommender, the second stage-0 model.

Item embeddings, dropout, a GRU over the history, and a dot product of the hidden state with
the item embedding table (tied input/output embeddings, as in the GRU4Rec follow-ups). Here it
is trained like SASRec (BCE on the next item against one sampled negative per position,
``model/cf/loss.py``) on full user histories rather than with GRU4Rec's session-parallel
mini-batches and ranking losses, so the two models differ only in the sequence encoder; that is
what A-LLMRec's model-agnostic claim needs.

Left-padded histories are packed so that the GRU never steps over padding: the hidden state at
the most recent position depends on the user's items only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from cllm4rec_dist.model.cf import CF_MODELS, PAD, SequentialCF


@dataclass
class GRU4RecSettings:
    """GRU4Rec's hyperparameters."""

    dim: int = 50
    """Embedding and hidden size (50, like SASRec, so the two plug into A-LLMRec alike)."""
    max_len: int = 50
    """Longest history the model reads; older items are dropped."""
    num_layers: int = 1
    """Stacked GRU layers (GRU4Rec: 1)."""
    dropout: float = 0.2
    """Dropout on the item embeddings and the GRU output."""

    def validate(self) -> GRU4RecSettings:
        if self.dim < 1 or self.max_len < 1 or self.num_layers < 1:
            raise ValueError("gru4rec: dim, max_len and num_layers must be >= 1")
        if not 0 <= self.dropout < 1:
            raise ValueError("gru4rec.dropout must be in [0, 1)")
        return self


class GRU4Rec(SequentialCF):
    """Recurrent sequential recommender; see the module docstring."""

    name = "gru4rec"
    Settings = GRU4RecSettings

    def __init__(self, num_items: int, settings: GRU4RecSettings | None = None):
        super().__init__()
        self.settings = (settings or GRU4RecSettings()).validate()
        s = self.settings
        self.num_items, self.dim = num_items, s.dim
        self.item_table = nn.Embedding(num_items + 1, s.dim, padding_idx=0)  # row 0 = padding
        nn.init.normal_(self.item_table.weight, std=s.dim ** -0.5)
        with torch.no_grad():
            self.item_table.weight[0].zero_()
        self.dropout = nn.Dropout(s.dropout)
        self.gru = nn.GRU(s.dim, s.dim, num_layers=s.num_layers, batch_first=True)

    def item_embeddings(self) -> torch.Tensor:
        return self.item_table.weight[1:]

    def sequence_output(self, histories: torch.Tensor) -> torch.Tensor:
        """``[B, L, dim]``: the hidden state after each position (zero at padded positions)."""
        histories = histories[:, -self.settings.max_len:]
        batch, length = histories.shape
        lengths = (histories != PAD).sum(1)
        # Left-padded -> right-padded: row b's items move to columns 0 .. len_b - 1.
        shift = (torch.arange(length, device=histories.device)[None] + (length - lengths)[:, None]) % length
        items = histories.gather(1, shift)
        x = self.dropout(self.item_table(items + 1))
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=length)
        out = out * (lengths > 0)[:, None, None].to(out.dtype)
        # Right-padded -> left-padded again (scatter back through the same shift).
        aligned = torch.zeros_like(out).scatter(1, shift[..., None].expand(-1, -1, self.dim), out)
        present = (histories != PAD)[..., None].to(out.dtype)
        return self.dropout(aligned) * present


CF_MODELS["gru4rec"] = GRU4Rec
