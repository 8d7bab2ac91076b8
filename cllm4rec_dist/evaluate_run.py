"""`cllm4rec evaluate`: score a trained CLLM4Rec run or checkpoint on validation and/or test, as training does.

    cllm4rec evaluate --checkpoint RUN_OR_CHECKPOINT [--part valid,test] [--last] [--data DIR] [--out FILE.json]

The best-validation weights (``--last``: the last trained state) with the run's own config: backbone, precision,
prompts and their item order, exclusions, and the cold items' scoring rows set as the run sets them. The metrics
are those of the run's metrics.json (Recall@20/40, NDCG@100 and, when the dataset holds cold items, the cold
slices) and reproduce them; ``--cold-item-ridge`` / ``--cold-item-source`` score the cold items another way. Uses:
test a tuning trial's selected model once (`cllm4rec tune` never scores test), re-score a run after moving its
dataset (``--data``), score an interrupted run's best model.
"""

from __future__ import annotations

import argparse
import json

from cllm4rec_dist.atomic import write_json_atomic
from cllm4rec_dist.corpus.ids import TokenSpace
from cllm4rec_dist.corpus.shards import ShardedDataset, ShardError
from cllm4rec_dist.errors import UserError
from cllm4rec_dist.model.cllm4rec import COLD_ITEM_SOURCES
from cllm4rec_dist.train.checkpoint import load_trainable, read_saved_weights
from cllm4rec_dist.train.config import ConfigError, config_from_dict
from cllm4rec_dist.train.recipe import build_model
from cllm4rec_dist.train.trainer import evaluate_model

PARTS = ("valid", "test")


class EvaluateError(UserError, ValueError):
    """A checkpoint or dataset `cllm4rec evaluate` cannot score; the message says what to pass instead."""


def evaluate_checkpoint(source: str, parts=PARTS, use_best: bool = True, data_dir: str | None = None,
                        device: str = "cpu", cold_item_ridge: float | None = None,
                        cold_item_source: str | None = None) -> dict:
    """{"checkpoint", "weights", "global_step", "best", "cold_item_ridge", "cold_item_source", <part>: metrics for
    each of ``parts``}. ``cold_item_ridge`` / ``cold_item_source``: score the cold items through a centred map of
    that strength / from that source instead of the run's own ``model.cold_item_ridge`` / ``cold_item_source``
    (the trained weights are unchanged; only the cold items' scoring rows are set differently)."""
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise EvaluateError(f"--part {','.join(parts)}: choose from {', '.join(PARTS)} (comma-separated).")
    saved = read_saved_weights(source, use_best)
    ckpt_path, weights = saved.path, saved.weights
    cfg = config_from_dict(saved.snapshot["config"], f"{ckpt_path} (snapshot config)")
    if cold_item_ridge is not None:
        cfg.model.cold_item_ridge = cold_item_ridge
    if cold_item_source is not None:
        cfg.model.cold_item_source = cold_item_source
    try:
        cfg.model.check_cold_map()  # the training config's own rules, on the run's settings with the overrides
    except ConfigError as e:
        raise EvaluateError(f"{e} For a trained run, pass --cold-item-ridge R / --cold-item-source S.") from None
    if cfg.recommender != "cllm4rec":
        raise EvaluateError(f"{ckpt_path}: an {cfg.recommender} run. A-LLMRec is scored on its stored candidates "
                            "during training (its metrics.json); `cllm4rec evaluate` scores CLLM4Rec runs.")
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0].split(": ", 1)[1]
    parser.add_argument("--checkpoint", required=True,
                        help="run folder (its newest complete checkpoint) or checkpoint folder with trainer.pt")
    parser.add_argument("--part", default="valid,test", help="valid, test or both, comma-separated (default both)")
    parser.add_argument("--last", dest="use_best", action="store_false",
                        help="the last trained state instead of the best-validation weights")
    parser.add_argument("--data", default=None,
                        help="preprocessed dataset folder, if it moved since training (default: the one in the config)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--cold-item-ridge", type=float, default=None,
                        help="map a separate item head's cold rows with a centred ridge of this strength instead of "
                             "the run's model.cold_item_ridge (e.g. 10; RESULTS §7)")
    parser.add_argument("--cold-item-source", default=None, choices=COLD_ITEM_SOURCES,
                        help="what the cold items' scoring rows are mapped from instead of the run's "
                             "model.cold_item_source: content_rows or text_hidden (the backbone's reading of "
                             "items.json; needs a ridge)")
    parser.add_argument("--out", default=None, help="also write the result as JSON here (local path or fsspec URL)")


def run(args: argparse.Namespace) -> int:
    parts = tuple(p.strip() for p in args.part.split(",") if p.strip())
    result = evaluate_checkpoint(args.checkpoint, parts, args.use_best, args.data, args.device, args.cold_item_ridge,
                                 args.cold_item_source)
    if args.out:
        write_json_atomic(args.out, result)
    print(json.dumps(result, indent=1, default=float))
    return 0
