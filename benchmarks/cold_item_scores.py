"""Is a model's cold-item recall personal? Prints one JSON object.

The cold slice of `cllm4rec evaluate` (``test.cold/recall@20``) scores each user's held-out cold items inside the
ranking over ALL items, so a model that lifts every cold item for every user scores well on it without knowing
who likes which. This reads an export (`cllm4rec export`: ``users_rec.npy`` · ``items_collab.npy`` are the
scores the evaluation ranks, checked here against its test Recall@20) and the dataset's split, and prints on TEST:
the overall and cold Recall@20 as evaluated; the share of top-20 slots that hold cold items (against their share
of the catalogue); and Recall@20 of each user's held-out cold items when only cold items are ranked, for the
model's per-user order and for two orders that know no user: one global order by the mean score, and random.

    python benchmarks/cold_item_scores.py --export EXPORT_DIR --data DATASET_DIR
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from cllm4rec_dist.corpus.shards import load_eval_split
from cllm4rec_dist.eval.metrics import finalize, metric_sums

K = 20


def recall_at_k(scores: np.ndarray, heldout: list[np.ndarray], keep: np.ndarray | None = None) -> dict:
    """The evaluation's own Recall@20 (eval/metrics.py) of this ranking, against ``heldout`` restricted to ``keep``."""
    if keep is not None:
        heldout = [items[keep[items]] for items in heldout]
    top = np.argsort(-scores, axis=1)[:, :K]
    result = finalize(metric_sums(top, heldout, ks=(K,), ndcg_ks=()))
    return {"recall@20": result["recall@20"], "users": result["num_users"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--export", required=True, help="folder written by `cllm4rec export` (with user vectors)")
    p.add_argument("--data", required=True, help="the preprocessed dataset the model was trained on")
    p.add_argument("--seed", type=int, default=0, help="seed of the random control")
    args = p.parse_args()
    users, items = np.load(f"{args.export}/users_rec.npy"), np.load(f"{args.export}/items_collab.npy")
    split = load_eval_split(args.data)
    cold = np.ones(split.num_items, bool)
    cold[np.concatenate(split.train)] = False
    if not cold.any():
        raise SystemExit(f"{args.data}: every item has training interactions; nothing is cold")
    scores = users @ items.T
    ranked = scores.copy()
    for user in range(split.num_users):  # the test ranking excludes train and valid items, as the evaluation does
        ranked[user, split.train[user]] = -np.inf
        ranked[user, split.valid[user]] = -np.inf
    top = np.argsort(-ranked, axis=1)[:, :K]
    only_cold = np.where(cold[None, :], ranked, -np.inf)
    global_order = np.where(np.isfinite(only_cold), scores.mean(0)[None, :], -np.inf)
    random_order = np.where(np.isfinite(only_cold), np.random.default_rng(args.seed).random(scores.shape), -np.inf)
    print(json.dumps({
        "export": args.export, "data": args.data,
        "test": recall_at_k(ranked, split.test), "test_cold": recall_at_k(ranked, split.test, cold),
        "cold_share_of_top20": float(cold[top].mean()), "cold_share_of_items": float(cold.mean()),
        "cold_only_ranking": {"model": recall_at_k(only_cold, split.test, cold),
                              "global_order_by_mean_score": recall_at_k(global_order, split.test, cold),
                              "random": recall_at_k(random_order, split.test, cold)},
    }, indent=1))


if __name__ == "__main__":
    main()
