"""How far did training move a run's item rows from their init? Prints one JSON object.

The init is rebuilt exactly: the run's own config (``RUN/config.yaml``) through the training recipe's setup, which
seeds and draws the tables as ``cllm4rec train`` did at step 0. Per item table (collaborative, content, separate
head): the median over warm and over cold items of ||final - init|| / ||init||, with the final rows the run's
best-validation weights. Then the content item rows, at their init and after training, scored by item kNN on the
run's dataset as the content-knn baseline scores item vectors (``run_on_vectors``): whether the content tokens came
to hold anything about who likes what.

    python benchmarks/rows_moved.py RUN_DIR
"""

from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np
import torch

from cllm4rec_dist.baselines.content_knn import ContentKnnSettings, run_on_vectors
from cllm4rec_dist.config import load_config
from cllm4rec_dist.corpus.shards import ShardedDataset
from cllm4rec_dist.recommenders.cllm4rec.recipe import CLLM4RecRecipe
from cllm4rec_dist.train.checkpoint import LocalSink, read_saved_weights
from cllm4rec_dist.train.engines import TorchEngine
from cllm4rec_dist.train.rank import Rank

TABLES = ("collab_item_table.weight", "content_item_table.weight", "item_head.weight")
KEYS = ("recall@20", "cold_only/recall@20", "cold_only_random/recall@20")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a `cllm4rec train` run folder")
    args = p.parse_args()
    cfg = load_config(f"{args.run}/config.yaml")
    cfg.out = tempfile.mkdtemp()  # the setup writes its run files there, not into the run
    recipe = CLLM4RecRecipe(cfg.validate(), Rank(), lambda n, params, lr: TorchEngine(n, params, lr),
                            LocalSink(cfg.out)).setup()
    init = {k: v.detach().float().clone() for k, v in recipe.model.state_dict().items() if k in TABLES}
    final = {k: v.float() for k, v in read_saved_weights(args.run).tensors.items() if k in TABLES}
    split = ShardedDataset(cfg.data).eval_split()
    cold = torch.as_tensor(split.cold_mask())
    out: dict = {"run": args.run, "moved": {}}
    for name in TABLES:
        if name not in final:
            continue
        moved = (final[name] - init[name]).norm(dim=1) / init[name].norm(dim=1)
        out["moved"][name] = {"warm_median": round(float(moved[~cold].median()), 4),
                              "cold_median": round(float(moved[cold].median()), 4) if cold.any() else None,
                              "init_row_norm_median": round(float(init[name].norm(dim=1).median()), 4)}
    settings = ContentKnnSettings()
    for label, rows in (("content_rows_init", init["content_item_table.weight"]),
                        ("content_rows_final", final["content_item_table.weight"])):
        result = run_on_vectors(split, rows.numpy().astype(np.float32), settings, model=label)
        out[label] = {"selected": result["selected"],
                      "test": {k: round(result["test"][k], 4) for k in KEYS if k in result["test"]}}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
