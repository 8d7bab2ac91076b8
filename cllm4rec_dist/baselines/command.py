"""`cllm4rec baselines`: most-popular / EASE / Multi-VAE on a preprocessed dataset's split.

The baselines read the same ``EvalSplit`` as CLLM4Rec (train only for fitting)
and are scored by the same metric code, so their JSON can sit next to
CLLM4Rec's metrics.json. ``run_baseline`` is the Python entry point.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any

from cllm4rec_dist.eval.split import EvalSplit

# model name -> (module, settings class name)
MODELS: dict[str, tuple[str, str]] = {
    "popular": ("cllm4rec_dist.baselines.popular", "PopularSettings"),
    "ease": ("cllm4rec_dist.baselines.ease", "EaseSettings"),
    "multivae": ("cllm4rec_dist.baselines.multivae", "MultiVAESettings"),
}


def run_baseline(split: EvalSplit, model: str, **settings: Any) -> dict[str, Any]:
    """Fit ``model`` on ``split.train``, select on valid, score test once; return the result dict.

    ``settings`` are fields of the model's settings dataclass (e.g. ``seed``,
    ``epochs`` for multivae; ``lambdas`` for ease; ``exclude_valid_on_test`` for
    all); None means "default", and a setting the model does not have is a
    ``SettingsError`` (a TypeError). The dict: {"model", "valid", "test", "selected", "settings",
    "seconds"} plus "history" for models that search or train.
    """
    from cllm4rec_dist.baselines.common import settings_from_kwargs

    if model not in MODELS:
        raise ValueError(f"unknown baseline {model!r}; choose from {', '.join(MODELS)}")
    module_name, cls_name = MODELS[model]
    module = importlib.import_module(module_name)
    return module.run(split, settings_from_kwargs(getattr(module, cls_name), model, settings))


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="preprocessed dataset directory (output of `cllm4rec preprocess`)")
    parser.add_argument("--model", required=True, choices=sorted(MODELS), help="which baseline")
    parser.add_argument("--out", default=None, help="result JSON (default: DATA/baselines/<model>.json)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (multivae; default 0)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (multivae; default 100)")
    parser.add_argument(
        "--lambdas", type=_float_list, default=None,
        help="comma-separated L2 grid searched on validation (ease; default 1,10,50,100,200,500,1000,2000)",
    )
    parser.add_argument("--device", default=None, help="torch device (multivae; default cpu)")
    parser.add_argument(
        "--threads", dest="num_threads", type=int, default=None,
        help="torch CPU threads (multivae; default 1, robust on a shared CPU; 0 = torch's default, all cores)",
    )
    parser.add_argument(
        "--keep-valid-on-test", dest="exclude_valid_on_test", action="store_false", default=None,
        help="when scoring test, exclude only train items (as the authors' predict.py) instead of train + valid",
    )


def run(args: argparse.Namespace) -> int:
    from cllm4rec_dist.corpus.shards import load_eval_split

    split = load_eval_split(args.data)
    settings = {
        "seed": args.seed,
        "epochs": args.epochs,
        "lambdas": args.lambdas,
        "device": args.device,
        "num_threads": args.num_threads,
        "exclude_valid_on_test": args.exclude_valid_on_test,
    }
    from cllm4rec_dist.baselines.common import SettingsError

    try:
        result = run_baseline(split, args.model, **settings)
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.data, "baselines", f"{args.model}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    text = json.dumps(result, indent=2)
    with open(out, "w") as f:
        f.write(text + "\n")
    print(json.dumps({k: result[k] for k in ("model", "valid", "test", "selected", "seconds")}, indent=2))
    print(f"wrote {out}")
    return 0
