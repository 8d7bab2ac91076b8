"""Memory-bounded softmax over a large class set (the item catalogue, or a 32k-50k vocabulary).

A dense ``hidden @ weight.T`` over a million items and a few thousand positions does not fit in
memory, and autograd would keep it alive for the backward pass. Here the row-wise logsumexp is
computed in chunks of classes (and of rows, if the rows alone exceed the budget), never holding
more than ``max_logit_elements`` logits at once; the backward pass recomputes each chunk's
softmax instead of storing it. Everything is computed in float32, whatever the input dtype.

* ``chunked_logsumexp(hidden, weight)``      -> (N,) logsumexp_c (hidden @ weight.T)
* ``sparse_softmax_nll(hidden, weight, rows, cols, coeffs)``
                                              -> sum_k coeff_k * -log softmax(hidden[rows_k] @ weight.T)[cols_k]
* ``chunked_topk(hidden, weight, k, exclude)`` -> the k best classes per row, excluded ones never returned
"""

from __future__ import annotations

import torch

DEFAULT_MAX_LOGIT_ELEMENTS = 2**24  # 16M float32 logits = 64 MiB per chunk


def chunk_sizes(num_rows: int, num_classes: int, max_logit_elements: int = DEFAULT_MAX_LOGIT_ELEMENTS,
                chunk: int | None = None) -> tuple[int, int]:
    """(row_chunk, class_chunk) so that row_chunk * class_chunk <= max_logit_elements.

    ``chunk`` forces the class chunk (tests use it); rows are split only when even one class
    per row would exceed the budget.
    """
    if max_logit_elements < 1:
        raise ValueError(f"max_logit_elements must be >= 1, got {max_logit_elements}")
    row_chunk = max(1, min(num_rows, max_logit_elements))
    if chunk is None:
        chunk = max(1, max_logit_elements // row_chunk)
    return row_chunk, max(1, min(chunk, max(num_classes, 1)))


def _chunked_lse(hidden, weight, row_chunk: int, class_chunk: int) -> torch.Tensor:
    """(N,) float32 logsumexp of hidden @ weight.T, holding at most row_chunk x class_chunk logits."""
    num_rows, num_classes = hidden.shape[0], weight.shape[0]
    lse = torch.full((num_rows,), float("-inf"), dtype=torch.float32, device=hidden.device)
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        for r0 in range(0, num_rows, row_chunk):
            h = hidden[r0:r0 + row_chunk].float()
            running = lse[r0:r0 + row_chunk]
            for c0 in range(0, num_classes, class_chunk):
                logits = h @ weight[c0:c0 + class_chunk].float().T
                running = torch.logaddexp(running, torch.logsumexp(logits, dim=1))
            lse[r0:r0 + row_chunk] = running
    return lse


def _chunked_softmax_backward(hidden, weight, lse, row_scale, row_chunk: int, class_chunk: int,
                              need_hidden: bool, need_weight: bool):
    """Gradients of sum_r row_scale_r * lse_r, float32: (softmax * scale) @ W and its transpose @ H.

    The softmax is RECOMPUTED chunk by chunk from the saved lse rather than stored.
    """
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        for r0 in range(0, hidden.shape[0], row_chunk):
            rows = slice(r0, r0 + row_chunk)
            h = hidden[rows].float()
            for c0 in range(0, weight.shape[0], class_chunk):
                classes = slice(c0, c0 + class_chunk)
                w = weight[classes].float()
                probs = torch.exp(h @ w.T - lse[rows, None]) * row_scale[rows, None]
                if need_hidden:
                    grad_hidden[rows] += probs @ w
                if need_weight:
                    grad_weight[classes] += probs.T @ h
    return grad_hidden, grad_weight


class _ChunkedLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, row_chunk: int, class_chunk: int):
        lse = _chunked_lse(hidden, weight, row_chunk, class_chunk)
        ctx.save_for_backward(hidden, weight, lse)
        ctx.chunks = (row_chunk, class_chunk)
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        hidden, weight, lse = ctx.saved_tensors
        grad_hidden, grad_weight = _chunked_softmax_backward(hidden, weight, lse, grad_lse.float(), *ctx.chunks,
                                                             *ctx.needs_input_grad[:2])
        return (None if grad_hidden is None else grad_hidden.to(hidden.dtype),
                None if grad_weight is None else grad_weight.to(weight.dtype), None, None)


class _SparseSoftmaxNLL(torch.autograd.Function):
    """sum_k coeffs_k * (lse(hidden[rows_k]) - hidden[rows_k] . weight[cols_k]) with ONE dense weight gradient.

    Fusing the target logits in (instead of autograd through weight[cols]) matters for large
    catalogues: every autograd path into the (J,d) weight would allocate its own (J,d) gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, rows, cols, coeffs, row_chunk: int, class_chunk: int):
        distinct_rows, row_of_term = torch.unique(rows, return_inverse=True)
        lse = _chunked_lse(hidden[distinct_rows], weight, row_chunk, class_chunk)
        with torch.autocast(hidden.device.type, enabled=False):
            target_logits = (hidden[rows].float() * weight[cols].float()).sum(dim=-1)
        ctx.save_for_backward(hidden, weight, rows, cols, coeffs, distinct_rows, row_of_term, lse)
        ctx.chunks = (row_chunk, class_chunk)
        return (coeffs * (lse[row_of_term] - target_logits)).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, rows, cols, coeffs, distinct_rows, row_of_term, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        term_scale = grad_loss.float() * coeffs
        # each distinct row's lse appears once per term on that row
        row_scale = torch.zeros_like(lse).index_add_(0, row_of_term, term_scale)
        grad_distinct, grad_weight = _chunked_softmax_backward(hidden[distinct_rows], weight, lse, row_scale,
                                                               *ctx.chunks, need_hidden, need_weight)
        grad_hidden = None
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            if need_hidden:  # d/dh of -h.w_col is -w_col
                grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
                grad_hidden.index_add_(0, distinct_rows, grad_distinct)
                grad_hidden.index_add_(0, rows, -term_scale[:, None] * weight[cols].float())
                grad_hidden = grad_hidden.to(hidden.dtype)
            if need_weight:
                grad_weight.index_add_(0, cols, -term_scale[:, None] * hidden[rows].float())
                grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def chunked_logsumexp(hidden: torch.Tensor, weight: torch.Tensor,
                      max_logit_elements: int = DEFAULT_MAX_LOGIT_ELEMENTS,
                      chunk: int | None = None) -> torch.Tensor:
    """logsumexp(hidden (N,d) @ weight (C,d).T, dim=1) in float32, holding <= max_logit_elements logits.

    Differentiable w.r.t. hidden and (if it requires grad) weight; the weight gradient is dense.
    """
    _check_shapes(hidden, weight)
    row_chunk, class_chunk = chunk_sizes(hidden.shape[0], weight.shape[0], max_logit_elements, chunk)
    return _ChunkedLogSumExp.apply(hidden, weight, row_chunk, class_chunk)


def sparse_softmax_nll(hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                       coeffs: torch.Tensor | None = None,
                       max_logit_elements: int = DEFAULT_MAX_LOGIT_ELEMENTS,
                       chunk: int | None = None) -> torch.Tensor:
    """sum_k coeffs_k * (lse(hidden[rows_k]) - hidden[rows_k] . weight[cols_k]), a float32 scalar.

    Each term is -log softmax(hidden[rows_k] @ weight.T)[cols_k]. One term per row is next-token
    cross-entropy; several terms sharing a row is the multinomial NLL of a multi-hot target.
    The logsumexp is computed once per distinct row, chunked, and the gradients of the logsumexp
    and the target logits land in one dense weight gradient. Returns a SUM: the caller normalises.
    """
    _check_shapes(hidden, weight)
    if rows.numel() == 0:
        # keep the graph connected so backward() works on an empty batch
        return (hidden.float().sum() + weight.float().sum()) * 0.0
    if coeffs is None:
        coeffs = torch.ones(rows.shape, dtype=torch.float32, device=hidden.device)
    num_distinct_rows = min(rows.numel(), hidden.shape[0])
    row_chunk, class_chunk = chunk_sizes(num_distinct_rows, weight.shape[0], max_logit_elements, chunk)
    return _SparseSoftmaxNLL.apply(hidden, weight, rows, cols, coeffs.float(), row_chunk, class_chunk)


def _check_shapes(hidden, weight):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden (N,d) and weight (C,d), got {tuple(hidden.shape)} and {tuple(weight.shape)}")


@torch.no_grad()
def chunked_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int,
                 exclude: list[torch.Tensor] | None = None, chunk: int | None = None,
                 max_logit_elements: int = DEFAULT_MAX_LOGIT_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k classes of hidden (U,d) @ weight (J,d).T per row, scanning classes in chunks.

    ``exclude[u]`` lists classes never returned for row u (the user's train items). Ties go to
    the lower class index. Rows with fewer than k allowed classes are padded with score -inf
    and index -1. Memory is bounded by U x (chunk + k) scores.
    Returns (scores float32 (U,k), indices int64 (U,k)).
    """
    num_rows, num_classes = hidden.shape[0], weight.shape[0]
    device = hidden.device
    k = min(k, num_classes)
    _, class_chunk = chunk_sizes(num_rows, num_classes, max_logit_elements, chunk)

    # excluded (row, class) pairs sorted by class, so each chunk finds its own with searchsorted
    if exclude:
        if len(exclude) != num_rows:
            raise ValueError(f"exclude has {len(exclude)} entries for {num_rows} rows")
        ex_rows = torch.cat([torch.full((len(e),), u, dtype=torch.long) for u, e in enumerate(exclude)]).to(device)
        ex_cols = torch.cat([torch.as_tensor(e, dtype=torch.long).reshape(-1) for e in exclude]).to(device)
        ex_cols, order = torch.sort(ex_cols)
        ex_rows = ex_rows[order]
    else:
        ex_rows = ex_cols = torch.empty(0, dtype=torch.long, device=device)

    best_scores = torch.empty(num_rows, 0, dtype=torch.float32, device=device)
    best_indices = torch.empty(num_rows, 0, dtype=torch.long, device=device)
    h = hidden.float()
    for c0 in range(0, num_classes, class_chunk):
        c1 = min(c0 + class_chunk, num_classes)
        scores = h @ weight[c0:c1].float().T
        lo, hi = torch.searchsorted(ex_cols, torch.tensor([c0, c1], device=device)).tolist()
        scores[ex_rows[lo:hi], ex_cols[lo:hi] - c0] = float("-inf")
        indices = torch.arange(c0, c1, device=device).expand(num_rows, -1)
        # running best (ties already in index order) first, then this chunk in index order:
        # a STABLE descending sort keeps equal scores in ascending class order
        scores = torch.cat([best_scores, scores], dim=1)
        indices = torch.cat([best_indices, indices], dim=1)
        scores, order = torch.sort(scores, dim=1, descending=True, stable=True)
        best_scores = scores[:, :k]
        best_indices = torch.gather(indices, 1, order[:, :k])
    best_indices = best_indices.masked_fill(torch.isneginf(best_scores), -1)
    return best_scores, best_indices
