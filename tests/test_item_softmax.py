"""The chunked item/vocab softmax equals the dense one, values and gradients."""

import pytest
import torch

from cllm4rec_dist.model.item_softmax import chunk_sizes, chunked_logsumexp, chunked_topk, sparse_softmax_nll

N, C, D = 7, 23, 16


def _inputs(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(C, D, generator=gen).requires_grad_()
    return hidden, weight


@pytest.mark.parametrize("chunk", [1, 2, 5, C, C + 10])
def test_logsumexp_and_gradients_match_dense(chunk):
    hidden, weight = _inputs()
    upstream = torch.randn(N)
    lse = chunked_logsumexp(hidden, weight, chunk=chunk)
    (lse * upstream).sum().backward()
    got = (lse.detach(), hidden.grad.clone(), weight.grad.clone())

    hidden.grad = weight.grad = None
    dense = torch.logsumexp(hidden @ weight.T, dim=1)
    (dense * upstream).sum().backward()
    for a, b in zip(got, (dense.detach(), hidden.grad, weight.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("budget", [1, 3, 10, 50, 10**9])
def test_element_budget_chunks_rows_and_classes(budget):
    row_chunk, class_chunk = chunk_sizes(N, C, budget)
    assert row_chunk * class_chunk <= max(budget, 1) or class_chunk == 1
    hidden, weight = _inputs(1)
    lse = chunked_logsumexp(hidden, weight, max_logit_elements=budget)
    lse.sum().backward()
    got = (lse.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    dense = torch.logsumexp(hidden @ weight.T, dim=1)
    dense.sum().backward()
    for a, b in zip(got, (dense.detach(), hidden.grad, weight.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_frozen_weight_gets_no_gradient_and_bf16_hidden_computes_in_fp32():
    hidden, weight = _inputs(2, dtype=torch.bfloat16)
    weight = weight.detach()
    lse = chunked_logsumexp(hidden, weight, chunk=4)
    assert lse.dtype == torch.float32
    lse.sum().backward()
    assert weight.grad is None and hidden.grad.dtype == torch.bfloat16
    dense = torch.logsumexp(hidden.detach().float() @ weight.T, dim=1)
    torch.testing.assert_close(lse.detach(), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("budget", [1, 12, 10**9])  # row chunks, class chunks, the one-buffer dense path
def test_sparse_nll_multi_hot_matches_dense_log_softmax(budget):
    hidden, weight = _inputs(3)
    rows = torch.tensor([0, 0, 0, 2, 4, 4, 6])
    cols = torch.tensor([1, 5, 22, 0, 7, 8, 3])
    coeffs = torch.rand(len(rows))
    loss = sparse_softmax_nll(hidden, weight, rows, cols, coeffs, max_logit_elements=budget)
    (2.5 * loss).backward()  # the gradients computed in the forward are scaled by the incoming one
    got = (loss.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    log_probs = torch.log_softmax(hidden @ weight.T, dim=1)
    dense = -(coeffs * log_probs[rows, cols]).sum()
    (2.5 * dense).backward()
    for a, b in zip(got, (dense.detach(), hidden.grad, weight.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_sparse_nll_of_no_targets_is_zero_and_differentiable():
    hidden, weight = _inputs(4)
    loss = sparse_softmax_nll(hidden, weight, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().sum() == 0


@pytest.mark.parametrize("chunk", [1, 3, 8, 100])
def test_topk_matches_dense_masked_topk(chunk):
    gen = torch.Generator().manual_seed(5)
    users, items, k = 6, 40, 5
    hidden, weight = torch.randn(users, D, generator=gen), torch.randn(items, D, generator=gen)
    exclude = [torch.randperm(items, generator=gen)[: int(torch.randint(0, 10, (1,), generator=gen))]
               for _ in range(users)]
    scores, indices = chunked_topk(hidden, weight, k, exclude, chunk=chunk)

    dense = hidden @ weight.T
    for u, excluded in enumerate(exclude):
        dense[u, excluded] = float("-inf")
    want_scores, want_indices = torch.topk(dense, k, dim=1)
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(indices, want_indices)
    for u, excluded in enumerate(exclude):
        assert not set(indices[u].tolist()) & set(excluded.tolist())


@pytest.mark.parametrize("chunk", [1, 2, 4, 16])
def test_topk_breaks_ties_to_lower_index_and_pads_exhausted_rows(chunk):
    weight = torch.tensor([[1.0], [2.0], [2.0], [0.5], [2.0], [1.0]])
    hidden = torch.tensor([[1.0], [1.0]])
    exclude = [torch.tensor([2]), torch.tensor([0, 1, 2, 3, 4])]
    scores, indices = chunked_topk(hidden, weight, k=4, exclude=exclude, chunk=chunk)
    assert indices[0].tolist() == [1, 4, 0, 5]
    assert scores[0].tolist() == [2.0, 2.0, 1.0, 1.0]
    assert indices[1].tolist() == [5, -1, -1, -1]
    assert torch.isneginf(scores[1, 1:]).all()


def test_sparse_nll_with_bf16_hidden_and_default_coeffs():
    hidden, weight = _inputs(6, dtype=torch.bfloat16)
    rows, cols = torch.tensor([1, 1, 3]), torch.tensor([4, 9, 0])
    loss = sparse_softmax_nll(hidden, weight, rows, cols, chunk=3)
    assert loss.dtype == torch.float32
    loss.backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    got_weight_grad = weight.grad.clone()
    weight.grad = None
    dense = -torch.log_softmax(hidden.detach().float() @ weight.T, dim=1)[rows, cols].sum()
    dense.backward()
    torch.testing.assert_close(loss.detach(), dense.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_weight_grad, weight.grad, rtol=1e-5, atol=1e-5)


def test_sparse_nll_refuses_a_second_backward_and_computes_no_gradient_under_no_grad():
    hidden, weight = _inputs(7)
    rows, cols = torch.tensor([0, 3]), torch.tensor([2, 2])
    loss = sparse_softmax_nll(hidden, weight, rows, cols)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()
    with torch.no_grad():
        value = sparse_softmax_nll(hidden, weight, rows, cols)
    torch.testing.assert_close(value, loss.detach())
