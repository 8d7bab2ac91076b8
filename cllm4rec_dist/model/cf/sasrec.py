"""SASRec (Kang & McAuley, ICDM 2018): self-attentive sequential recommendation, A-LLMRec's stage-0 model.

As in the paper: item embeddings (scaled by sqrt(dim), as the authors' code does) plus LEARNED
position embeddings, dropout, then ``num_blocks`` blocks of causal self-attention and a
point-wise two-layer feed-forward network, each sub-layer ``x + Dropout(sublayer(LayerNorm(x)))``,
and a final layer norm. The output at position t scores the item at t+1 by a dot product with
the (shared) item embedding table. Trained with binary cross-entropy on the true next item
against one sampled negative per position (``model/cf/loss.py``).

Histories follow the package convention: right-aligned, left-padded with PAD. The most recent
item always sits at position ``max_len - 1``; padded positions neither attend nor are attended
to, and their outputs are zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cllm4rec_dist.model.cf import CF_MODELS, PAD, SequentialCF


@dataclass
class SASRecSettings:
    """SASRec's hyperparameters (defaults: the paper's)."""

    dim: int = 50
    """Embedding and hidden size d (paper: 50)."""
    max_len: int = 50
    """Longest history the model reads, n (paper: 50 for sparse data, 200 for MovieLens-1M); older items are dropped."""
    num_blocks: int = 2
    """Self-attention blocks b (paper: 2)."""
    num_heads: int = 1
    """Attention heads (paper: 1)."""
    dropout: float = 0.2
    """Dropout on embeddings, attention weights and feed-forward outputs (paper: 0.2 MovieLens, 0.5 sparse Amazon)."""

    def validate(self) -> SASRecSettings:
        if self.dim < 1 or self.max_len < 1 or self.num_blocks < 1 or self.num_heads < 1:
            raise ValueError("sasrec: dim, max_len, num_blocks and num_heads must be >= 1")
        if self.dim % self.num_heads:
            raise ValueError(f"sasrec.dim ({self.dim}) must be divisible by sasrec.num_heads ({self.num_heads})")
        if not 0 <= self.dropout < 1:
            raise ValueError("sasrec.dropout must be in [0, 1)")
        return self


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t that hold an item (and itself)."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        batch, length, dim = queries.shape

        def heads(x):
            return x.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

        q, k, v = heads(self.query(queries)), heads(self.key(keys)), heads(self.value(keys))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None],
                                             dropout_p=self.dropout if self.training else 0.0)
        return out.transpose(1, 2).reshape(batch, length, dim)


class SASRecBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim, eps=1e-8)
        self.attention = CausalSelfAttention(dim, num_heads, dropout)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-8)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        normed = self.attention_norm(x)  # the paper's g(x) = x + Dropout(g(LayerNorm(x))) for both sub-layers
        x = x + self.dropout(self.attention(normed, normed, allowed))
        x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        return x * present


class SASRec(SequentialCF):
    """Self-attentive sequential recommender; see the module docstring."""

    name = "sasrec"
    Settings = SASRecSettings

    def __init__(self, num_items: int, settings: SASRecSettings | None = None):
        super().__init__()
        self.settings = (settings or SASRecSettings()).validate()
        s = self.settings
        self.num_items, self.dim = num_items, s.dim
        # Row 0 is the padding row (item i lives at row i + 1), kept at zero.
        self.item_table = nn.Embedding(num_items + 1, s.dim, padding_idx=0)
        self.position_table = nn.Embedding(s.max_len, s.dim)
        self.embedding_dropout = nn.Dropout(s.dropout)
        self.blocks = nn.ModuleList(SASRecBlock(s.dim, s.num_heads, s.dropout) for _ in range(s.num_blocks))
        self.final_norm = nn.LayerNorm(s.dim, eps=1e-8)
        for _name, param in self.named_parameters():  # the authors' code: Xavier-normal, skipping 1-d params
            if param.dim() > 1:
                nn.init.xavier_normal_(param)
        with torch.no_grad():
            self.item_table.weight[0].zero_()

    def item_embeddings(self) -> torch.Tensor:
        return self.item_table.weight[1:]

    def sequence_output(self, histories: torch.Tensor) -> torch.Tensor:
        """``[B, L, dim]``: the representation after each position (zero at padded positions)."""
        histories = histories[:, -self.settings.max_len:]
        length = histories.shape[1]
        present = histories != PAD
        x = self.item_table(histories + 1) * math.sqrt(self.dim)
        positions = torch.arange(self.settings.max_len - length, self.settings.max_len, device=histories.device)
        x = self.embedding_dropout(x + self.position_table(positions)[None])
        present_f = present[..., None].to(x.dtype)
        x = x * present_f
        causal = torch.ones(length, length, dtype=torch.bool, device=histories.device).tril()
        # query t may attend key s when s <= t and s holds an item; every position may attend itself,
        # so a padded query still has one key (its output is zeroed anyway) and no row is all -inf.
        allowed = (causal[None] & present[:, None, :]) | torch.eye(length, dtype=torch.bool, device=histories.device)
        for block in self.blocks:
            x = block(x, allowed, present_f)
        return self.final_norm(x) * present_f


CF_MODELS["sasrec"] = SASRec
