"""Score every item for each user in one forward pass, mask known items, top-K, metrics.

Distributed: each rank scores the users of its own eval shards and returns metric SUMS; the
ranks all-reduce them and only then divide (eval/metrics.py), so every user
counts once whatever the number of ranks. With tables or the item head row-sharded across ranks
(model/sharding.py) the forward passes and the top-K are collective: every rank runs as many rounds as
the rank with the most users, an idle round taking part with no data.
"""

from __future__ import annotations

import numpy as np
import torch

from cllm4rec_dist.corpus.ids import TokenSpace
from cllm4rec_dist.corpus.prompts import prediction_prompts
from cllm4rec_dist.eval.metrics import PAD, all_reduce_sums, cold_slice_sums, finalize, merge_sums, metric_sums
from cllm4rec_dist.model.batch import pack_rows
from cllm4rec_dist.model.sharding import all_reduce_max

TOP_K = 100  # enough for Recall@20/40 and NDCG@100


@torch.no_grad()
def user_representations(model, docs: list[dict], space: TokenSpace, style: str = "rec", batch_size: int = 64,
                         max_length: int = 1024, seed: int = 0, pack: bool = True, reorder: bool = True) -> torch.Tensor:
    """Hidden state of the last prompt token for each user doc (U, d), fp32: the user's query vector
    (prompt items shuffled with ``reorder``, else in stored order: ``prediction_prompts``).
    Prompts are packed several to a row unless ``pack`` is off (the same vectors either way)."""
    was_training = model.training
    model.eval()
    device = model.item_head_weight().device
    out = []
    for start in range(0, len(docs), batch_size):
        rows = prediction_prompts(docs[start:start + batch_size], space, style, max_length, seed, reorder)
        layout = pack_rows(rows, pack).to(device)
        out.append(model.last_token_hidden(layout, side="collab"))
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, model.hidden_size)


@torch.no_grad()
def evaluate_docs(model, docs: list[dict], space: TokenSpace, part: str, style: str = "rec", batch_size: int = 64,
                  exclude_valid_on_test: bool = True, max_length: int = 1024, seed: int = 0,
                  reorder: bool = True, distributed: bool = False, cold_items=()) -> dict:
    """Recall@20/40, NDCG@100 on ``part`` ('valid' or 'test') for these users' eval docs.

    Train items are always excluded from the ranking; at test time the valid items too
    when ``exclude_valid_on_test``. With ``distributed`` the sums are all-reduced.
    ``cold_items`` (items never trained on) adds the cold-item slices ``cold/``, ``cold_only/`` and
    ``cold_only_random/`` over the users with a held-out cold item (``num_cold_users``): their definitions are
    ``eval.metrics.COLD_SLICES``, the same for every model.
    """
    cold = np.zeros(model.num_items, bool)
    cold[np.asarray(list(cold_items), dtype=np.int64)] = True
    num_cold = int(cold.sum())
    warm = torch.as_tensor(np.flatnonzero(~cold), dtype=torch.long) if num_cold else None
    if part not in ("valid", "test"):
        raise ValueError("part must be 'valid' or 'test'")
    sums = []
    rounds = -(-len(docs) // batch_size)
    if model.shards_across_ranks:
        rounds = all_reduce_max(rounds, model.item_head_weight().device)
    for start in range(0, rounds * batch_size, batch_size):
        chunk = docs[start:start + batch_size]
        if not chunk:  # only with sharded tables: this rank has no users left, the others still score theirs
            model.idle_forward()
            for _ in range(2 if cold.any() else 1):  # the same collectives as a rank with users
                model.item_topk(torch.empty(0, model.hidden_size, device=model.item_head_weight().device), TOP_K)
            continue
        users = user_representations(model, chunk, space, style, batch_size, max_length, seed, reorder=reorder)
        exclude = [torch.as_tensor(d["train"] + (d["valid"] if part == "test" and exclude_valid_on_test else []),
                                   dtype=torch.long) for d in chunk]
        _, topk = model.item_topk(users, TOP_K, exclude=exclude)
        topk = topk.cpu().numpy()
        if topk.shape[1] < TOP_K:  # catalogues smaller than K: the missing ranks are misses
            topk = np.pad(topk, ((0, 0), (0, TOP_K - topk.shape[1])), constant_values=PAD)
        heldout = [np.asarray(d[part], dtype=np.int64) for d in chunk]
        batch_sums = metric_sums(topk, heldout)
        if cold.any():
            _, cold_topk = model.item_topk(users, TOP_K, exclude=[torch.cat([e, warm]) for e in exclude])
            cold_topk = cold_topk.cpu().numpy()
            if cold_topk.shape[1] < TOP_K:
                cold_topk = np.pad(cold_topk, ((0, 0), (0, TOP_K - cold_topk.shape[1])), constant_values=PAD)
            # With fewer cold candidates than K the tail holds excluded items: never a held-out cold item.
            batch_sums.update(cold_slice_sums(topk, cold_topk, heldout, [e.numpy() for e in exclude], cold))
        sums.append(batch_sums)
    if sums:
        total = merge_sums(*sums)
    else:  # a rank with no users adds zeros under the same keys
        total = metric_sums(np.zeros((0, TOP_K), dtype=np.int64), [])
        if cold.any():
            total.update(cold_slice_sums([], [], [], [], cold))
    if distributed:
        total = all_reduce_sums(total)
    return finalize(total)
