"""Memory-bounded softmax over a large class set (the item catalogue, or a 32k-50k vocabulary).

A dense ``hidden @ weight.T`` over a million items and a few thousand positions does not fit in
memory, and autograd would keep it alive for the backward pass. Here the logits are never handed
to autograd: the NLL computes its gradients in the forward pass (the loss is a scalar, so they are
known up to the incoming scalar) and the backward only scales them. When all logits fit
``max_logit_elements`` they are computed once into one buffer (the dense path: one matmul for the
logits, one per gradient); beyond it the row-wise logsumexp is computed in chunks of classes (and of
rows, if the rows alone exceed the budget) in one reused buffer, and each chunk is recomputed once
for the gradients. Everything is computed in float32, whatever the input dtype.

* ``chunked_logsumexp(hidden, weight)``      -> (N,) logsumexp_c (hidden @ weight.T)
* ``sparse_softmax_nll(hidden, weight, rows, cols, coeffs)``
                                              -> sum_k coeff_k * -log softmax(hidden[rows_k] @ weight.T)[cols_k]
* ``chunked_topk(hidden, weight, k, exclude)`` -> the k best classes per row, excluded ones never returned
"""

from __future__ import annotations

import torch

from cllm4rec_dist.model.options import DEFAULT_MAX_LOGIT_ELEMENTS  # noqa: E402, F401 (re-exported)


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


def _softmax_rows_(logits: torch.Tensor) -> torch.Tensor:
    """Turn (R, C) float32 logits into their row softmax IN PLACE; returns the (R,) logsumexp."""
    row_max = logits.amax(dim=1, keepdim=True)
    logits.sub_(row_max).exp_()
    row_sum = logits.sum(dim=1, keepdim=True)
    logits.div_(row_sum)
    return (row_sum.log_() + row_max).squeeze(1)


def _logit_buffer(rows: int, classes: int, device) -> torch.Tensor:
    """One float32 buffer for a chunk of logits, reused for every chunk (no allocation per chunk)."""
    return torch.empty(rows * classes, dtype=torch.float32, device=device)


def _chunk(buffer: torch.Tensor, rows: int, classes: int) -> torch.Tensor:
    return buffer[: rows * classes].view(rows, classes)


def chunked_lse(hidden, weight, row_chunk: int, class_chunk: int) -> torch.Tensor:
    """(N,) float32 logsumexp of hidden @ weight.T, holding at most row_chunk x class_chunk logits."""
    num_rows, num_classes = hidden.shape[0], weight.shape[0]
    lse = torch.empty((num_rows,), dtype=torch.float32, device=hidden.device)
    buffer = _logit_buffer(min(row_chunk, num_rows), min(class_chunk, num_classes), hidden.device)
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        for r0 in range(0, num_rows, row_chunk):
            h = hidden[r0:r0 + row_chunk].float()
            running = None
            for c0 in range(0, num_classes, class_chunk):
                w = weight[c0:c0 + class_chunk].float()
                logits = torch.mm(h, w.T, out=_chunk(buffer, h.shape[0], w.shape[0]))
                row_max = logits.amax(dim=1)
                chunk_lse = logits.sub_(row_max[:, None]).exp_().sum(dim=1).log_().add_(row_max)
                running = chunk_lse if running is None else torch.logaddexp(running, chunk_lse)
            lse[r0:r0 + row_chunk] = running
    return lse


def softmax_gradients(hidden, weight, lse, row_scale, row_chunk: int, class_chunk: int,
                       need_hidden: bool, need_weight: bool):
    """Gradients of sum_r row_scale_r * lse_r in float32: diag(s) P @ W and P.T @ diag(s) H, P = softmax.

    P is RECOMPUTED chunk by chunk from ``lse`` (exp(h.w - lse) in one addmm + exp), never stored;
    the row scale goes onto H (N x d), not onto P (N x C).
    """
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
    grad_weight = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    num_rows, num_classes = hidden.shape[0], weight.shape[0]
    buffer = _logit_buffer(min(row_chunk, num_rows), min(class_chunk, num_classes), hidden.device)
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        for r0 in range(0, num_rows, row_chunk):
            rows = slice(r0, r0 + row_chunk)
            h = hidden[rows].float()
            scale = row_scale[rows, None]
            scaled_h = h * scale
            for c0 in range(0, num_classes, class_chunk):
                classes = slice(c0, c0 + class_chunk)
                w = weight[classes].float()
                probs = torch.addmm(-lse[rows, None], h, w.T, out=_chunk(buffer, h.shape[0], w.shape[0])).exp_()
                if need_hidden:
                    grad_hidden[rows].addmm_(probs, w)
                if need_weight:
                    if r0 == 0:
                        torch.mm(probs.T, scaled_h, out=grad_weight[classes])
                    else:
                        grad_weight[classes].addmm_(probs.T, scaled_h)
            if need_hidden:
                grad_hidden[rows] *= scale
    return grad_hidden, grad_weight


class _ChunkedLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, row_chunk: int, class_chunk: int):
        lse = chunked_lse(hidden, weight, row_chunk, class_chunk)
        ctx.save_for_backward(hidden, weight, lse)
        ctx.chunks = (row_chunk, class_chunk)
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        hidden, weight, lse = ctx.saved_tensors
        grad_hidden, grad_weight = softmax_gradients(hidden, weight, lse, grad_lse.float(), *ctx.chunks,
                                                      *ctx.needs_input_grad[:2])
        return (None if grad_hidden is None else grad_hidden.to(hidden.dtype),
                None if grad_weight is None else grad_weight.to(weight.dtype), None, None)


def _dense_softmax_gradients(hidden, weight, row_scale, need_hidden: bool, need_weight: bool):
    """All logits fit the budget: ONE (N, C) buffer, one pass. Returns (lse, grad_hidden, grad_weight)
    as ``chunked_lse`` + ``softmax_gradients`` would, without recomputing the logits."""
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        h, w = hidden.float(), weight.float()
        probs = h @ w.T
        lse = _softmax_rows_(probs)
        grad_hidden = (probs @ w).mul_(row_scale[:, None]) if need_hidden else None
        grad_weight = probs.T @ (h * row_scale[:, None]) if need_weight else None
    return lse, grad_hidden, grad_weight


class _SparseSoftmaxNLL(torch.autograd.Function):
    """sum_k coeffs_k * (lse(hidden[rows_k]) - hidden[rows_k] . weight[cols_k]) with ONE dense weight gradient.

    The loss is a scalar, so its gradients are known up to the incoming scalar at forward time: the
    forward computes them in the same pass over the logits (fused linear + cross-entropy), and the
    backward only scales them, in place. When all logits fit ``row_chunk x class_chunk`` that is one
    matmul for the logits and one per gradient, the floor of a dense softmax; beyond it, the logsumexp
    is computed first, chunk by chunk, and the chunks are recomputed once for the gradients.
    Fusing the target logits in (instead of autograd through weight[cols]) matters for large
    catalogues: every autograd path into the (J,d) weight would allocate its own (J,d) gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, rows, cols, coeffs, row_chunk: int, class_chunk: int):
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        distinct_rows, row_of_term = torch.unique(rows, return_inverse=True)
        h = hidden[distinct_rows]
        # each distinct row's lse appears once per term on that row
        row_scale = torch.zeros(len(distinct_rows), dtype=torch.float32, device=hidden.device)
        row_scale.index_add_(0, row_of_term, coeffs)
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            target_h, target_w = hidden[rows].float(), weight[cols].float()
            target_logits = (target_h * target_w).sum(dim=-1)
        if len(distinct_rows) <= row_chunk and weight.shape[0] <= class_chunk:
            lse, grad_distinct, grad_weight = _dense_softmax_gradients(h, weight, row_scale,
                                                                       need_hidden, need_weight)
        else:
            lse = chunked_lse(h, weight, row_chunk, class_chunk)
            grad_distinct, grad_weight = softmax_gradients(h, weight, lse, row_scale, row_chunk, class_chunk,
                                                            need_hidden, need_weight)
        grad_hidden = None
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            if need_hidden:  # d/dh of -h.w_col is -w_col
                grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
                grad_hidden.index_add_(0, distinct_rows, grad_distinct)
                grad_hidden.index_add_(0, rows, target_w.mul_(-coeffs[:, None]))
            if need_weight:
                grad_weight.index_add_(0, cols, target_h.mul_(-coeffs[:, None]))
        ctx.gradients = (grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return (coeffs * (lse[row_of_term] - target_logits)).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        if ctx.gradients is None:
            raise RuntimeError("sparse_softmax_nll: backward through the same graph twice is not supported "
                               "(its gradients are computed in the forward and scaled in place)")
        (grad_hidden, grad_weight), ctx.gradients = ctx.gradients, None
        grad_loss = grad_loss.float()
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_loss).to(ctx.dtypes[0])
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss).to(ctx.dtypes[1])
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
    if not torch.is_grad_enabled():  # the forward computes gradients for inputs that require them
        hidden, weight = hidden.detach(), weight.detach()
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
