"""What an item head of d dimensions can express on a dataset: EASE's item-item weights cut to rank d, on validation.

A CLLM4Rec (or LLM-CF) recommendation is ``h_u . w_j``: a user's last-prompt-token hidden state against the item
head's row, both of the backbone's width d. Its score matrix over users x items has rank at most d, whatever the
backbone does before the head. EASE's scores ``X B`` are full-rank; ``X B_d``, with ``B_d`` the best rank-d
approximation of B (its truncated SVD), is one rank-d score matrix, made from the strongest linear model on the
split. Its validation Recall@20 per d is an indicator of what the width alone allows: not an upper bound (another
rank-d matrix may do better), but a model of width d that falls short of it has room left at that width, and one
whose width is below the rank where it reaches a target cannot get there through its head.

λ is EASE's own, chosen on validation from its grid (``--lambdas``); test is not read. Prints one JSON object.

    python benchmarks/rank_ceiling.py --data DATASET_DIR [--ranks 32,64,128,256,512,768] [--lambdas 100]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from cllm4rec_dist.baselines.common import evaluate
from cllm4rec_dist.baselines.ease import EaseSettings
from cllm4rec_dist.baselines.ease import select as select_ease
from cllm4rec_dist.corpus.shards import ShardedDataset
from cllm4rec_dist.train.monitor import duration


def truncated(b: np.ndarray, factors, rank: int) -> np.ndarray:
    """B cut to ``rank`` from its SVD ``factors`` (u, s, vt); a rank at or above B's size is B itself."""
    u, s, vt = factors
    return b if rank >= len(s) else (u[:, :rank] * s[:rank]) @ vt[:rank]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a preprocessed dataset folder (cllm4rec preprocess)")
    p.add_argument("--ranks", default="32,64,128,256,512,768", help="comma-separated widths d")
    p.add_argument("--lambdas", default=None, help="EASE's λ grid (default: the baseline's own)")
    args = p.parse_args(argv)
    ranks = sorted({int(r) for r in args.ranks.split(",")})
    if not ranks or ranks[0] < 1:
        p.error(f"--ranks needs positive integers, got {args.ranks!r}")
    started = time.perf_counter()
    split = ShardedDataset(args.data).eval_split()
    settings = EaseSettings(score_test=False)
    if args.lambdas:
        settings.lambdas = tuple(float(x) for x in args.lambdas.split(","))
    print(f"[rank_ceiling] EASE: choosing λ on validation from {len(settings.lambdas)} value(s)", file=sys.stderr,
          flush=True)
    ease = select_ease(split, settings)
    lam, x, b = ease.lam, ease.train, ease.weights
    print(f"[rank_ceiling] λ {lam:g}; SVD of B ({b.shape[0]} x {b.shape[0]}) | "
          f"{duration(time.perf_counter() - started)} elapsed", file=sys.stderr, flush=True)
    factors = np.linalg.svd(b, full_matrices=False)
    metric = settings.select_metric
    out = {"data": args.data, "lambda": lam, "num_items": int(b.shape[0]), "metric": f"valid/{metric}",
           "full": ease.valid[metric], "by_rank": {}}
    scored = time.perf_counter()
    for done, rank in enumerate(ranks, 1):
        b_rank = truncated(b, factors, rank)
        out["by_rank"][str(rank)] = evaluate(lambda users, w=b_rank: np.asarray(x[users] @ w), split, "valid",
                                             settings)[metric]
        per_rank = (time.perf_counter() - scored) / done
        print(f"[rank_ceiling] rank {rank}: {metric} {out['by_rank'][str(rank)]:.4f} ({done}/{len(ranks)}) | "
              f"{duration(time.perf_counter() - started)} elapsed, ETA {duration(per_rank * (len(ranks) - done))}",
              file=sys.stderr, flush=True)
    out["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
