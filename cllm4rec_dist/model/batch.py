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

import heapq
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


ATTENTION_TOKENS = 2048
"""The packer's cost model: a row of width W costs W x (1 + W / ATTENTION_TOKENS) token-units. The linear layers
cost ~2 x (a layer's weights) FLOPs per token, the attention GEMMs ~4 x d x W per token, since they run over the
whole W x W square of a row, masked blocks (other documents, padding) included: 2 x 3.54M / (4 x 576) = 3072 for
SmolLM2-135M, 4,608 for GPT-2; taken lower to count the element-wise work on the scores (mask, softmax) too."""

_ALL_ROW_COUNTS = 64  # row counts tried one by one up to here, then in steps of ~5% (large scoring batches)


def _first_fit(order: list[int], lengths: list[int], width: int) -> tuple[list[int], list[int], int]:
    """First-fit decreasing into rows of ``width``: (row of each document, its first column, the width)."""
    bins: list[int] = []  # used width of each row
    doc_rows, doc_starts = [0] * len(lengths), [0] * len(lengths)
    for k in order:
        row = next((r for r, used in enumerate(bins) if used + lengths[k] <= width), len(bins))
        if row == len(bins):
            bins.append(0)
        doc_rows[k], doc_starts[k] = row, bins[row]
        bins[row] += lengths[k]
    return doc_rows, doc_starts, width


def _balanced(order: list[int], lengths: list[int], num_rows: int) -> tuple[list[int], list[int], int]:
    """Each document, longest first, into the least-filled of ``num_rows`` rows (ties: the lowest row), the width
    being the fullest row's: (row of each document, its first column, the width). Every row gets a document
    when ``num_rows <= len(lengths)``."""
    heap = [(0, r) for r in range(num_rows)]
    doc_rows, doc_starts = [0] * len(lengths), [0] * len(lengths)
    for k in order:
        used, row = heapq.heappop(heap)
        doc_rows[k], doc_starts[k] = row, used
        heapq.heappush(heap, (used + lengths[k], row))
    return doc_rows, doc_starts, max(used for used, _ in heap)


def plan_rows(lengths: list[int], attention_tokens: int = ATTENTION_TOKENS) -> tuple[list[int], list[int], int]:
    """Where each document of a packed batch goes: (row of each document, its first column, the row width).

    Rows need not be as wide as the longest document: for each row count R (1 .. the count at which rows are
    about one longest document wide) the documents are balanced over R rows (longest first, each into the
    least-filled row: the width is then about sum(lengths) / R, and the rows nearly full whenever documents are
    short against it); first-fit decreasing into rows as wide as the longest document (the former layout) is
    one more candidate. The cheapest under ``ATTENTION_TOKENS``'s cost model wins (ties: fewer rows): wide
    rows waste attention on masked blocks, narrow ones padding. A document is never split across rows (each
    loss needs every earlier token of its document in the same attention context). Pure function of the
    lengths (ties keep input order), so a batch's layout never depends on anything else.
    """
    order = sorted(range(len(lengths)), key=lambda k: -lengths[k])
    total, longest = sum(lengths), max(lengths)
    most = min(len(lengths), -(-total // longest))
    counts, count = [], 1
    while count <= most:
        counts.append(count)
        count = count + 1 if count < _ALL_ROW_COUNTS else max(count + 1, int(count * 1.05))
    plans = [_balanced(order, lengths, r) for r in counts] + [_first_fit(order, lengths, longest)]

    def cost(plan):
        rows, width = max(plan[0]) + 1, plan[2]
        return rows * width * (1 + width / attention_tokens), rows

    return min(plans, key=cost)


def rows_as_wide_as_the_longest(lengths: list[int]) -> tuple[list[int], list[int], int]:
    """The former layout (a ``plan`` for ``pack_rows``): first-fit decreasing into rows as wide as the longest
    document. Kept for benchmarks/step_kinds.py's before/after comparison."""
    return _first_fit(sorted(range(len(lengths)), key=lambda k: -lengths[k]), lengths, max(lengths))


def pack_rows(rows: list[list[int]], pack: bool = True, plan=plan_rows) -> PackedRows:
    """Lay token rows out for one forward pass.

    pack=False: one right-padded row per document. pack=True: several documents to a row as ``plan`` (lengths ->
    (row of each document, its first column, the width); default ``plan_rows``) lays them out, so that a batch of
    mixed lengths costs about sum(lengths) tokens instead of B * max(lengths).
    """
    if not rows:
        raise ValueError("pack_rows needs at least one document")
    lengths = [len(r) for r in rows]
    if min(lengths) < 1:
        raise ValueError("every document needs at least one token")
    if pack:
        doc_rows, doc_starts, width = plan(lengths)
        num_rows = max(doc_rows) + 1
    else:
        doc_rows, doc_starts, num_rows, width = list(range(len(rows))), [0] * len(rows), len(rows), max(lengths)
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

