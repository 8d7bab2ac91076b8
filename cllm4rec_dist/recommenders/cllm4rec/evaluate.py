"""Score every item for each user in one forward pass, mask known items, top-K, metrics.

Distributed: each rank scores the users of its own eval shards and returns metric SUMS; the
ranks all-reduce them and only then divide (eval/metrics.py), so every user
counts once whatever the number of ranks. With tables or the item head row-sharded across ranks
(model/sharding.py) the forward passes and the top-K are collective: every rank runs as many rounds as
the rank with the most users, an idle round taking part with no data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from cllm4rec_dist.corpus.ids import TokenSpace
from cllm4rec_dist.corpus.shards import ShardedDataset, ShardError
from cllm4rec_dist.errors import EvaluateError
from cllm4rec_dist.eval.metrics import PAD, all_reduce_sums, cold_slice_sums, finalize, merge_sums, metric_sums
from cllm4rec_dist.model.batch import pack_rows
from cllm4rec_dist.model.sharding import all_reduce_max
from cllm4rec_dist.recommenders.cllm4rec.builder import build_model
from cllm4rec_dist.recommenders.cllm4rec.prompts import prediction_prompts
from cllm4rec_dist.settings import ConfigError
from cllm4rec_dist.train.checkpoint import SavedWeights, load_trainable

if TYPE_CHECKING:
    from cllm4rec_dist.config import TrainConfig

TOP_K = 100  # enough for Recall@20/40 and NDCG@100


@torch.no_grad()
def user_representations(model, docs: list[dict], space: TokenSpace, style: str = "rec", batch_size: int = 64,
                         max_length: int = 1024, seed: int = 0, pack: bool = True,
                         reorder: bool = True) -> torch.Tensor:
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


def evaluate_model(model, cfg: TrainConfig, docs: list[dict], space: TokenSpace, part: str, cold_items=(),
                   distributed: bool = False) -> dict:
    """``part`` ('valid' or 'test') metrics of a CLLM4Rec model as training scores it (validation, the final
    test, `cllm4rec evaluate`): the run's prompts, order and exclusions, and the items never trained on scored
    through collaborative rows set from their content rows (the mode of the MR prior) first."""
    if cold_items:
        model.set_unseen_items_from_content(cold_items)
    return evaluate_docs(model, docs, space, part, cfg.prediction_style, cfg.eval.batch_size,
                         cfg.eval.exclude_valid_on_test, cfg.batch.max_length, cfg.batch.seed,
                         reorder=cfg.reorder, distributed=distributed, cold_items=cold_items)


def evaluate_checkpoint(saved: SavedWeights, cfg: TrainConfig, parts: tuple[str, ...], data_dir: str | None = None,
                        device: str = "cpu", cold_item_ridge: float | None = None,
                        cold_item_source: str | None = None) -> dict:
    """{"checkpoint", "weights", "global_step", "best", "cold_item_ridge", "cold_item_source", <part>: metrics for
    each of ``parts``}. ``cold_item_ridge`` / ``cold_item_source``: score the cold items through a centred map of
    that strength / from that source instead of the run's own ``model.cold_item_ridge`` / ``cold_item_source``
    (the trained weights are unchanged; only the cold items' scoring rows are set differently)."""
    ckpt_path, weights = saved.path, saved.weights
    if cold_item_ridge is not None:
        cfg.model.cold_item_ridge = cold_item_ridge
    if cold_item_source is not None:
        cfg.model.cold_item_source = cold_item_source
    try:
        cfg.model.check_cold_map()  # the training config's own rules, on the run's settings with the overrides
    except ConfigError as e:
        raise EvaluateError(f"{e} For a trained run, pass --cold-item-ridge R / --cold-item-source S.") from None
    if saved.sharded:
        raise EvaluateError(f"{saved.folder}: a row-sharded checkpoint; its tables are scored across the ranks that "
                            "hold them. Export it (`cllm4rec export`) or evaluate the run with the same launcher.")
    try:
        data = ShardedDataset(data_dir or cfg.data)
    except ShardError as e:
        raise EvaluateError(f"{ckpt_path} was trained on dataset {cfg.data!r}, which cannot be opened ({e}). "
                            "Pass the dataset folder with --data.") from None
    model = build_model(cfg, data, device, loads_weights=True)
    load_trainable(model, saved.tensors, f"{ckpt_path} ({weights} weights) on dataset {data.url}")
    space = TokenSpace(data.vocab_size, data.num_users, data.num_items)
    docs = data.read_corpus("eval")
    cold_items = data.manifest.get("cold_items", [])
    record = saved.snapshot["state"]
    result = {"checkpoint": ckpt_path, "data": data.url, "weights": weights,
              "global_step": record.get("global_step"), "best": record.get("best") or None,
              "cold_item_ridge": cfg.model.cold_item_ridge, "cold_item_source": cfg.model.cold_item_source}
    for part in parts:
        result[part] = evaluate_model(model, cfg, docs, space, part, cold_items)
    return result
