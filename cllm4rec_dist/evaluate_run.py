"""`cllm4rec evaluate`: score a trained run or checkpoint on validation and/or test, as training does.

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
from cllm4rec_dist.config import saved_run_config
from cllm4rec_dist.errors import EvaluateError
from cllm4rec_dist.recommenders import recommender
from cllm4rec_dist.train.checkpoint import read_saved_weights

PARTS = ("valid", "test")
__all__ = ["EvaluateError", "evaluate_checkpoint", "add_arguments", "run"]


def evaluate_checkpoint(source: str, parts=PARTS, use_best: bool = True, data_dir: str | None = None,
                        device: str = "cpu", **overrides) -> dict:
    """{"checkpoint", "weights", "global_step", "best", ..., <part>: metrics for each of ``parts``} of the run's
    recommender, scored by its evaluate hook as training scores it. ``overrides`` are that hook's own options
    (CLLM4Rec: ``cold_item_ridge`` / ``cold_item_source``, the cold items' scoring rows set another way)."""
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise EvaluateError(f"--part {','.join(parts)}: choose from {', '.join(PARTS)} (comma-separated).")
    saved = read_saved_weights(source, use_best)
    cfg = saved_run_config(saved.snapshot["config"], f"{saved.path} (snapshot config)")
    rec = recommender(cfg.recommender)
    if rec.evaluate is None:
        raise EvaluateError(f"{saved.path}: an {rec.title} run. {rec.title} is scored on its stored candidates "
                            "during training (its metrics.json); `cllm4rec evaluate` re-scores full-ranking runs.")
    return rec.load(rec.evaluate)(saved, cfg, tuple(parts), data_dir, device, **overrides)


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
                             "the run's model.cold_item_ridge (e.g. 10)")
    parser.add_argument("--cold-item-source", default=None,
                        help="what the cold items' scoring rows are mapped from instead of the run's "
                             "model.cold_item_source: content_rows or text_hidden (the backbone's reading of "
                             "items.json; needs a ridge)")
    parser.add_argument("--out", default=None, help="also write the result as JSON here (local path or fsspec URL)")


def run(args: argparse.Namespace) -> int:
    parts = tuple(p.strip() for p in args.part.split(",") if p.strip())
    result = evaluate_checkpoint(args.checkpoint, parts, args.use_best, args.data, args.device,
                                 cold_item_ridge=args.cold_item_ridge, cold_item_source=args.cold_item_source)
    if args.out:
        write_json_atomic(args.out, result)
    print(json.dumps(result, indent=1, default=float))
    return 0
