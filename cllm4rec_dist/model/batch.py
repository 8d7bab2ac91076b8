"""The batches the loader hands to the model: token ids in the extended space, laid out in rows.

Token space (see corpus/ids.py): vocab ids 0..V-1, user i -> V + i, item j -> V + I + j.

Layout. A batch holds B DOCUMENTS in R rows of width T. Document k occupies
``input_ids[doc_rows[k], doc_starts[k] : doc_starts[k] + lengths[k]]`` with position ids
0..lengths[k]-1. Either one document per row, right-padded (R = B, every start 0), or PACKED:
several documents share a row (``pack_rows``), which removes most padding. Attention is causal
WITHIN a document only: the backbone is called without a 2D mask and with ``position_ids`` that
restart at 0 for every document, from which transformers builds a block-diagonal causal mask.
Right padding needs no mask either: under causal attention no real token sees a later pad.
Padding positions hold ``PAD_ID`` (a vocab id) with ``attention_mask`` 0 (here: "not a real token",
used to skip pads when counting id tokens); they are never a target.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

PAD_ID = 0


class _DocumentLayout:
    """Shared by PackedRows, LMBatch and RecBatch (fields input_ids, lengths, position_ids, doc_rows, doc_starts)."""

    def __post_init__(self):
        # a batch built by hand (tests, benchmarks): one document per row, starting at column 0
        rows, width = self.input_ids.shape
        device = self.input_ids.device
        if self.position_ids is None:
            self.position_ids = torch.arange(width, device=device).repeat(rows, 1)
        if self.doc_rows is None:
            self.doc_rows = torch.arange(rows, device=device)
        if self.doc_starts is None:
            self.doc_starts = torch.zeros(rows, dtype=torch.long, device=device)

    def to(self, device):
        return type(self)(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def document(self, k: int) -> torch.Tensor:
        """Token ids of document k."""
        start = int(self.doc_starts[k])
        return self.input_ids[int(self.doc_rows[k]), start:start + int(self.lengths[k])]

    @property
    def real_token_fraction(self) -> float:
        return float(self.lengths.sum()) / max(self.input_ids.numel(), 1)


@dataclass
class PackedRows(_DocumentLayout):
    """Where each document lies: rows of token ids, real-token mask, positions, and document spans."""

    input_ids: torch.Tensor       # (R, T) int64
    attention_mask: torch.Tensor  # (R, T) int64, 1 for real tokens
    position_ids: torch.Tensor    # (R, T) int64, 0.. within each document
    doc_rows: torch.Tensor        # (B,) int64 row of document k
    doc_starts: torch.Tensor      # (B,) int64 first column of document k
    lengths: torch.Tensor         # (B,) int64 tokens of document k


def pack_rows(rows: list[list[int]], pack: bool = True) -> PackedRows:
    """Lay token rows out for one forward pass.

    pack=False: one right-padded row per document. pack=True: first-fit decreasing bin packing into
    rows as wide as the longest document (deterministic: ties keep input order), so that a batch of
    mixed lengths costs about sum(lengths) tokens instead of B * max(lengths).
    """
    if not rows:
        raise ValueError("pack_rows needs at least one document")
    lengths = [len(r) for r in rows]
    if min(lengths) < 1:
        raise ValueError("every document needs at least one token")
    width = max(lengths)
    if pack:
        bins: list[int] = []  # used width of each row
        doc_rows, doc_starts = [0] * len(rows), [0] * len(rows)
        for k in sorted(range(len(rows)), key=lambda k: -lengths[k]):
            row = next((r for r, used in enumerate(bins) if used + lengths[k] <= width), len(bins))
            if row == len(bins):
                bins.append(0)
            doc_rows[k], doc_starts[k] = row, bins[row]
            bins[row] += lengths[k]
        num_rows = len(bins)
    else:
        doc_rows, doc_starts, num_rows = list(range(len(rows))), [0] * len(rows), len(rows)
    ids = torch.full((num_rows, width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((num_rows, width), dtype=torch.long)
    positions = torch.zeros((num_rows, width), dtype=torch.long)
    used = [0] * num_rows
    for k, row in enumerate(rows):
        r, s, n = doc_rows[k], doc_starts[k], lengths[k]
        ids[r, s:s + n] = torch.tensor(row, dtype=torch.long)
        mask[r, s:s + n] = 1
        positions[r, s:s + n] = torch.arange(n)
        used[r] = max(used[r], s + n)
    for r, end in enumerate(used):  # a row's padding tail is one more "document": it sees nothing real
        positions[r, end:] = torch.arange(width - end)
    return PackedRows(ids, mask, positions, torch.tensor(doc_rows, dtype=torch.long),
                     torch.tensor(doc_starts, dtype=torch.long), torch.tensor(lengths, dtype=torch.long))


@dataclass
class LMBatch(_DocumentLayout):
    """A batch of documents for the L-step (MAIN = item tokens) or the C-step (MAIN = text tokens).

    Each document is PROMPT followed by MAIN. The loss covers MAIN only: document position t predicts
    token t+1 for t in [prompt_lengths-1, lengths-2], so the first MAIN token is predicted from the
    last prompt position. Per-document tensors are indexed by document k; see the module doc for
    the row layout (the last three fields default to one right-padded document per row).
    """

    input_ids: torch.Tensor       # (R, T) int64
    attention_mask: torch.Tensor  # (R, T) int64, 1 for real tokens
    prompt_lengths: torch.Tensor  # (B,) int64
    lengths: torch.Tensor         # (B,) int64, prompt + main
    position_ids: torch.Tensor | None = None  # (R, T) int64
    doc_rows: torch.Tensor | None = None      # (B,) int64
    doc_starts: torch.Tensor | None = None    # (B,) int64

    @classmethod
    def from_rows(cls, rows: list[list[int]], prompt_lengths: list[int], pack: bool = True) -> LMBatch:
        layout = pack_rows(rows, pack)
        return cls(layout.input_ids, layout.attention_mask, torch.tensor(prompt_lengths, dtype=torch.long),
                   layout.lengths, layout.position_ids, layout.doc_rows, layout.doc_starts)

    @property
    def num_target_tokens(self) -> int:
        return int((self.lengths - self.prompt_lengths).sum())


@dataclass
class RecBatch(_DocumentLayout):
    """A batch of rec prompts (kept items, reordered) with the held-out items as multi-hot targets.

    ``target_rows[k]`` is the DOCUMENT (user k of the batch, not a layout row) of the k-th held-out
    item ``target_items[k]`` (an item index 0..J-1). The score vector comes from the last prompt token.
    """

    input_ids: torch.Tensor       # (R, T) int64
    attention_mask: torch.Tensor  # (R, T) int64
    lengths: torch.Tensor         # (B,) int64
    users: torch.Tensor           # (B,) int64 user index 0..I-1
    target_rows: torch.Tensor     # (N,) int64
    target_items: torch.Tensor    # (N,) int64
    position_ids: torch.Tensor | None = None  # (R, T) int64
    doc_rows: torch.Tensor | None = None      # (B,) int64
    doc_starts: torch.Tensor | None = None    # (B,) int64

    @classmethod
    def from_rows(cls, rows: list[list[int]], users: list[int], target_rows: list[int], target_items: list[int],
                  pack: bool = True) -> RecBatch:
        layout = pack_rows(rows, pack)
        as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
        return cls(layout.input_ids, layout.attention_mask, layout.lengths, as_long(users), as_long(target_rows),
                   as_long(target_items), layout.position_ids, layout.doc_rows, layout.doc_starts)

