"""Evaluation: top-K ranking with seen items masked, Recall/NDCG (on the split view of corpus/split.py).

Everything that reports a number (CLLM4Rec training, the baselines) goes through
``cllm4rec_dist.eval.metrics``, so the numbers are comparable by construction.
"""

from cllm4rec_dist.eval.metrics import (
    DEFAULT_NDCG_KS,
    DEFAULT_RECALL_KS,
    PAD,
    PerUser,
    all_reduce_sums,
    combine_exclusions,
    evaluate_split,
    evaluate_topk,
    finalize,
    merge_sums,
    metric_sums,
    ndcg_at_k,
    rank_items,
    recall_at_k,
    split_metric_sums,
    split_targets,
)

__all__ = [
    "DEFAULT_NDCG_KS",
    "DEFAULT_RECALL_KS",
    "PAD",
    "PerUser",
    "all_reduce_sums",
    "combine_exclusions",
    "evaluate_split",
    "evaluate_topk",
    "finalize",
    "merge_sums",
    "metric_sums",
    "ndcg_at_k",
    "rank_items",
    "recall_at_k",
    "split_metric_sums",
    "split_targets",
]
