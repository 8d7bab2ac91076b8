"""Row sharding of the trainable tables and the item head over the ranks of a data-parallel job.

With ``row`` sharding, rank r of W holds rows [r*ceil(n/W), (r+1)*ceil(n/W)) of every sharded (n, d) table: the
same split as a DTensor placed ``Shard(0)`` (torch.chunk), so a checkpoint can describe each rank's part as a DTensor
and ``torch.distributed.checkpoint`` can reshard it onto any other number of ranks (train/checkpoint.py).

Every rank trains on its OWN batch (data parallel) while the rows live on their owners, so the tensor-parallel
layouts of ``torch.distributed.tensor.parallel`` (which expect the same input on every rank of the group) do not
apply as they are. The three collective ops here are the data-parallel form of the same layouts:

* ``RowShardedTable`` (row-wise sharded embedding): the ranks' ids are all-gathered, every rank reads the rows it
  owns (zeros elsewhere), and a reduce-scatter hands each rank the rows of its own ids. Backward: the output
  gradients are all-gathered and each owner adds them into its rows; no rank ever holds another rank's rows.
* ``vocab_parallel_nll`` (class-sharded output layer + vocabulary-parallel cross-entropy): hidden states are
  all-gathered, each rank computes the logsumexp over ITS classes (chunked, model/item_softmax.py), the global
  logsumexp is an all-reduce (max, then sum of exp), the target logit comes from the rank owning the target class;
  backward recomputes each rank's chunk of softmax, keeps the head gradient for its own classes and
  reduce-scatters the hidden-state gradients to the ranks they belong to. The head is never gathered.
* ``row_sharded_topk``: whole-catalogue scoring per rank over its classes, top-K per rank, merged per user.

Each rank's loss is the loss of its own batch, as in data parallel; the gradient a rank accumulates into its rows
is the SUM over all ranks' losses (an owner sees every rank's use of its rows), so the optimizer divides it by W
to get data parallel's average (train/engines.py ``ShardedEngine``). All collectives run on one process group of
their own (``sharding_group``), so they never interleave with DeepSpeed's traffic on the default group; every rank
must make the same calls in the same order (an idle rank calls with empty inputs, never skips a call).

On one process (no process group, or a world of 1) the ops are the plain ones: an ``nn.Embedding`` lookup,
``item_softmax.sparse_softmax_nll`` and ``item_softmax.chunked_topk``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from cllm4rec_dist.model.options import TABLE_SHARDINGS  # noqa: F401 (re-exported)

from .item_softmax import (
    DEFAULT_MAX_LOGIT_ELEMENTS,
    chunk_sizes,
    chunked_lse,
    chunked_topk,
    softmax_gradients,
    sparse_softmax_nll,
)

INIT_BLOCK_ROWS = 8192
"""Row sharded tables are initialised block by block, each block from its own seed, so the values do not
depend on how many ranks hold the table (and no rank ever draws rows it does not own)."""


@dataclass(frozen=True)
class RowLayout:
    """Which rows of an (num_rows, d) table rank ``rank`` of ``world_size`` holds (DTensor Shard(0) split)."""

    num_rows: int
    rank: int = 0
    world_size: int = 1

    @property
    def rows_per_rank(self) -> int:
        return max(1, math.ceil(self.num_rows / self.world_size))

    @property
    def start(self) -> int:
        return min(self.rank * self.rows_per_rank, self.num_rows)

    @property
    def stop(self) -> int:
        return min(self.start + self.rows_per_rank, self.num_rows)

    @property
    def local_rows(self) -> int:
        return self.stop - self.start

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_GROUPS: dict[int, object] = {}


def sharding_group():
    """The process group of the sharding collectives (created on first use, on every rank in the same order)."""
    world = dist.get_world_size()
    if world not in _GROUPS:
        _GROUPS[world] = dist.new_group(list(range(world)))
    return _GROUPS[world]


def current_layout(num_rows: int) -> RowLayout:
    """This process's rows of a table sharded over the initialised process group (all of them on one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return RowLayout(num_rows, dist.get_rank(), dist.get_world_size())
    return RowLayout(num_rows)


# ---- small collectives with uneven sizes -----------------------------------------------------------


def _all_gather_padded(local: torch.Tensor, group, fill=0) -> tuple[torch.Tensor, list[int], int]:
    """All-gather tensors whose first dimension differs by rank: (W * max_n, ...) padded with ``fill``,
    the per-rank counts and max_n. Rank p's rows sit at [p * max_n, p * max_n + counts[p])."""
    world = dist.get_world_size(group)
    count = torch.tensor([local.shape[0]], dtype=torch.long, device=local.device)
    counts = torch.empty(world, dtype=torch.long, device=local.device)
    dist.all_gather_single(counts, count, group=group)
    counts = counts.tolist()
    max_n = max(max(counts), 1)
    padded = torch.full((max_n, *local.shape[1:]), fill, dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    gathered = torch.empty((world * max_n, *local.shape[1:]), dtype=local.dtype, device=local.device)
    dist.all_gather_single(gathered, padded.contiguous(), group=group)
    return gathered, counts, max_n


def _all_gather_same(local: torch.Tensor, group) -> torch.Tensor:
    """All-gather equally shaped tensors: (W * n, ...)."""
    out = torch.empty((dist.get_world_size(group) * local.shape[0], *local.shape[1:]), dtype=local.dtype,
                      device=local.device)
    dist.all_gather_single(out, local.contiguous(), group=group)
    return out


# ---- row-wise sharded embedding --------------------------------------------------------------------


class _RowShardedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, layout: RowLayout, group):
        all_ids, _, max_n = _all_gather_padded(ids.reshape(-1), group, fill=-1)
        local = all_ids - layout.start
        owned = (all_ids >= 0) & (local >= 0) & (local < layout.local_rows)
        rows = torch.zeros(all_ids.shape[0], weight.shape[1], dtype=weight.dtype, device=weight.device)
        rows[owned] = weight[local[owned]]
        out = torch.empty(max_n, weight.shape[1], dtype=weight.dtype, device=weight.device)
        dist.reduce_scatter_single(out, rows, group=group)  # rows of other owners are zeros: the sum is the lookup
        ctx.save_for_backward(owned, local[owned])
        ctx.layout, ctx.group, ctx.max_n, ctx.shape = layout, group, max_n, ids.shape
        return out[: ids.numel()].reshape(*ids.shape, weight.shape[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        owned, local_rows = ctx.saved_tensors
        padded = torch.zeros(ctx.max_n, grad_out.shape[-1], dtype=grad_out.dtype, device=grad_out.device)
        padded[: grad_out[..., 0].numel()] = grad_out.reshape(-1, grad_out.shape[-1])
        all_grads = _all_gather_same(padded, ctx.group)
        grad_weight = torch.zeros(ctx.layout.local_rows, grad_out.shape[-1], dtype=grad_out.dtype,
                                  device=grad_out.device)
        grad_weight.index_add_(0, local_rows, all_grads[owned])
        return None, grad_weight, None, None


class RowShardedTable(nn.Module):
    """An (num_rows, dim) fp32 table of which this rank holds ``layout``'s rows as ``weight``; called with
    GLOBAL row ids like an ``nn.Embedding`` (every rank must call it the same number of times)."""

    def __init__(self, num_rows: int, dim: int, layout: RowLayout, device=None):
        super().__init__()
        if layout.num_rows != num_rows:
            raise ValueError(f"layout of {layout.num_rows} rows for a table of {num_rows}")
        self.num_rows, self.dim, self.layout = num_rows, dim, layout
        self.weight = nn.Parameter(torch.empty(layout.local_rows, dim, device=device, dtype=torch.float32))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.layout.distributed:
            return nn.functional.embedding(ids, self.weight)
        return _RowShardedLookup.apply(ids, self.weight, self.layout, sharding_group())

    def extra_repr(self) -> str:
        return (f"{self.num_rows}, {self.dim}, rows {self.layout.start}..{self.layout.stop - 1} "
                f"on rank {self.layout.rank} of {self.layout.world_size}")


def _on_cpu(value: float | torch.Tensor) -> float | torch.Tensor:
    return value.cpu() if isinstance(value, torch.Tensor) else value


@torch.no_grad()
def init_rows_(weight: torch.Tensor, first_row: int, std: float | torch.Tensor, seed: int,
               mean: float | torch.Tensor = 0.0) -> None:
    """Fill ``weight`` (the rows first_row.. of a table) with N(mean, std^2) (scalars or per-column vectors),
    block by block: row i's value depends only on (seed, i), never on how the table is split over ranks."""
    rows = weight.shape[0]
    block = first_row // INIT_BLOCK_ROWS
    while rows and block * INIT_BLOCK_ROWS < first_row + rows:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + block)
        values = torch.randn(INIT_BLOCK_ROWS, weight.shape[1], generator=generator) * _on_cpu(std) + _on_cpu(mean)
        lo = max(block * INIT_BLOCK_ROWS, first_row)
        hi = min((block + 1) * INIT_BLOCK_ROWS, first_row + rows)
        weight[lo - first_row:hi - first_row] = values[lo - block * INIT_BLOCK_ROWS:hi - block * INIT_BLOCK_ROWS]
        block += 1


# ---- class-sharded item head: vocabulary-parallel cross-entropy --------------------------------------


class _VocabParallelNLL(torch.autograd.Function):
    """sum over THIS rank's terms k of coeffs_k * -log softmax(hidden[rows_k] @ W.T)[cols_k], W = the head whose
    rows (classes) ``weight`` holds for this rank; gradients as described in the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, rows, cols, coeffs, layout: RowLayout, group, max_logit_elements: int):
        rank = layout.rank
        distinct, row_of_term = torch.unique(rows, return_inverse=True)
        h = hidden.detach()[distinct].float()
        row_scale = torch.zeros(distinct.shape[0], dtype=torch.float32, device=hidden.device)
        row_scale.index_add_(0, row_of_term, coeffs)
        all_h, row_counts, max_rows = _all_gather_padded(h, group)
        all_scale = _all_gather_padded(row_scale, group)[0]
        # terms: (row in all_h, class, coeff), padded with coeff 0 and class -1
        term_rows = row_of_term + rank * max_rows
        all_term_rows, term_counts, max_terms = _all_gather_padded(term_rows, group)
        all_cols = _all_gather_padded(cols, group, fill=-1)[0]
        all_coeffs = _all_gather_padded(coeffs, group)[0]

        w = weight.detach()
        row_chunk, class_chunk = chunk_sizes(all_h.shape[0], max(w.shape[0], 1), max_logit_elements)
        if w.shape[0]:
            local_lse = chunked_lse(all_h, w, row_chunk, class_chunk)
        else:
            local_lse = torch.full((all_h.shape[0],), float("-inf"), device=hidden.device)
        lse_max = local_lse.clone()
        dist.all_reduce(lse_max, op=dist.ReduceOp.MAX, group=group)
        finite_max = torch.where(torch.isfinite(lse_max), lse_max, torch.zeros_like(lse_max))
        sum_exp = (local_lse - finite_max).exp()
        dist.all_reduce(sum_exp, group=group)
        lse = sum_exp.log() + finite_max

        local_cols = all_cols - layout.start
        owned = (all_cols >= 0) & (local_cols >= 0) & (local_cols < layout.local_rows)
        target_logits = torch.zeros(all_cols.shape[0], dtype=torch.float32, device=hidden.device)
        target_logits[owned] = (all_h[all_term_rows[owned]] * w[local_cols[owned]].float()).sum(dim=-1)
        dist.all_reduce(target_logits, group=group)

        mine = slice(rank * max_terms, rank * max_terms + term_counts[rank])
        loss = (all_coeffs[mine] * (lse[all_term_rows[mine]] - target_logits[mine])).sum()
        ctx.save_for_backward(all_h, all_scale, all_term_rows, all_coeffs, lse, local_cols, owned, distinct)
        ctx.facts = (layout, group, max_rows, max_terms, row_chunk, class_chunk, hidden.shape, hidden.dtype)
        ctx.weight = weight
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        all_h, all_scale, all_term_rows, all_coeffs, lse, local_cols, owned, distinct = ctx.saved_tensors
        layout, group, max_rows, max_terms, row_chunk, class_chunk, hidden_shape, hidden_dtype = ctx.facts
        weight = ctx.weight.detach()
        grads = _all_gather_same(grad_loss.float().reshape(1), group)  # every rank's incoming scalar
        row_scale = all_scale * grads.repeat_interleave(max_rows)
        term_coeffs = all_coeffs * grads.repeat_interleave(max_terms)
        if weight.shape[0]:
            grad_h, grad_w = softmax_gradients(all_h, weight, lse, row_scale, row_chunk, class_chunk, True, True)
        else:
            grad_h = torch.zeros_like(all_h)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        target_rows, target_cols = all_term_rows[owned], local_cols[owned]
        scale = -term_coeffs[owned][:, None]
        grad_w.index_add_(0, target_cols, all_h[target_rows] * scale)
        grad_h.index_add_(0, target_rows, weight[target_cols].float() * scale)
        mine = torch.empty(max_rows, all_h.shape[1], dtype=torch.float32, device=all_h.device)
        dist.reduce_scatter_single(mine, grad_h, group=group)
        grad_hidden = torch.zeros(hidden_shape, dtype=torch.float32, device=all_h.device)
        grad_hidden.index_add_(0, distinct, mine[: distinct.shape[0]])
        ctx.weight = None
        return grad_hidden.to(hidden_dtype), grad_w.to(weight.dtype), None, None, None, None, None, None


def vocab_parallel_nll(hidden: torch.Tensor, weight: torch.Tensor, layout: RowLayout, rows: torch.Tensor,
                       cols: torch.Tensor, coeffs: torch.Tensor | None = None,
                       max_logit_elements: int = DEFAULT_MAX_LOGIT_ELEMENTS) -> torch.Tensor:
    """``item_softmax.sparse_softmax_nll`` over a class-sharded head: ``weight`` holds this rank's classes
    (``layout``), ``cols`` are GLOBAL class ids. Returns this rank's SUM; every rank must call it."""
    if coeffs is None:
        coeffs = torch.ones(rows.shape, dtype=torch.float32, device=hidden.device)
    if not layout.distributed:
        return sparse_softmax_nll(hidden, weight, rows, cols, coeffs, max_logit_elements=max_logit_elements)
    if not torch.is_grad_enabled():
        hidden, weight = hidden.detach(), weight.detach()
    return _VocabParallelNLL.apply(hidden, weight, rows.long(), cols.long(), coeffs.float(), layout,
                                   sharding_group(), max_logit_elements)


# ---- whole-catalogue top-K over a class-sharded head -----------------------------------------------


@torch.no_grad()
def row_sharded_topk(hidden: torch.Tensor, weight: torch.Tensor, layout: RowLayout, k: int,
                     exclude: list[torch.Tensor] | None = None,
                     max_logit_elements: int = DEFAULT_MAX_LOGIT_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """``item_softmax.chunked_topk`` over a class-sharded head: every rank scores ALL ranks' query rows against its
    own classes (top-K per rank, excluded classes never returned), then each rank merges the W candidate lists of
    its own rows. Same result as the unsharded top-K, ties to the lower class id. Every rank must call it."""
    if not layout.distributed:
        return chunked_topk(hidden, weight, k, exclude=exclude, max_logit_elements=max_logit_elements)
    group, world, device = sharding_group(), layout.world_size, hidden.device
    k = min(k, layout.num_rows)
    all_h, counts, max_rows = _all_gather_padded(hidden.float(), group)
    # excluded (query row, class) pairs of every rank, so that each owner masks its own classes
    exclude = exclude or [torch.empty(0, dtype=torch.long)] * hidden.shape[0]
    if len(exclude) != hidden.shape[0]:
        raise ValueError(f"exclude has {len(exclude)} entries for {hidden.shape[0]} rows")
    pairs = torch.cat([torch.empty(0, 2, dtype=torch.long)] + [
        torch.stack([torch.full((len(e),), u + layout.rank * max_rows, dtype=torch.long),
                     torch.as_tensor(e, dtype=torch.long).reshape(-1)], dim=1) for u, e in enumerate(exclude)])
    all_pairs = _all_gather_padded(pairs.to(device), group, fill=-1)[0]
    local_cols = all_pairs[:, 1] - layout.start
    keep = (all_pairs[:, 0] >= 0) & (local_cols >= 0) & (local_cols < layout.local_rows)
    local_exclude = [[] for _ in range(all_h.shape[0])]
    for row, col in zip(all_pairs[keep, 0].tolist(), local_cols[keep].tolist()):
        local_exclude[row].append(col)
    scores = torch.full((all_h.shape[0], k), float("-inf"), device=device)
    indices = torch.full((all_h.shape[0], k), -1, dtype=torch.long, device=device)
    if layout.local_rows:
        s, i = chunked_topk(all_h, weight, k, exclude=[torch.as_tensor(e, dtype=torch.long) for e in local_exclude],
                            max_logit_elements=max_logit_elements)
        scores[:, : s.shape[1]] = s
        indices[:, : i.shape[1]] = torch.where(i >= 0, i + layout.start, i)
    # rank p's candidates for rank q's rows go to rank q: (W senders, max_rows, k) in rank order
    got_scores, got_indices = torch.empty_like(scores), torch.empty_like(indices)
    dist.all_to_all_single(got_scores, scores, group=group)
    dist.all_to_all_single(got_indices, indices, group=group)
    n = hidden.shape[0]
    got_scores = got_scores.view(world, max_rows, k)[:, :n].permute(1, 0, 2).reshape(n, world * k)
    got_indices = got_indices.view(world, max_rows, k)[:, :n].permute(1, 0, 2).reshape(n, world * k)
    # owners are in class order, each list sorted with ties by class id: a stable sort keeps ties in class order
    merged, order = torch.sort(got_scores, dim=1, descending=True, stable=True)
    best = torch.gather(got_indices, 1, order[:, :k])
    return merged[:, :k], best.masked_fill(torch.isneginf(merged[:, :k]), -1)


def all_reduce_max(value: int, device="cpu") -> int:
    """The largest of every rank's ``value`` over the sharding group (``value`` on one process)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    flag = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=sharding_group())
    return int(flag.item())


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over the sharding group in place (no-op on one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, group=sharding_group())
    return tensor
