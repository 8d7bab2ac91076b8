"""`cllm4rec baselines`: most-popular / EASE / Multi-VAE / content kNN / SASRec / GRU4Rec on a preprocessed dataset.

On a random split the baselines read the same ``EvalSplit`` as CLLM4Rec (train
only for fitting) and are scored by the same full-ranking metric code, so their
JSON can sit next to CLLM4Rec's metrics.json (``run_baseline``). On a
leave-one-out dataset ``popular``, ``sasrec`` and ``gru4rec`` are scored on the
stored candidates (hit@K, ndcg@K, warm/cold slices: ``eval/candidates.py``), as
A-LLMRec is (``run_candidate_baseline``); EASE and Multi-VAE keep full ranking.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any

from cllm4rec_dist.corpus.split import EvalSplit

# model name -> (module, settings class name)
MODELS: dict[str, tuple[str, str]] = {
    "popular": ("cllm4rec_dist.baselines.popular", "PopularSettings"),
    "ease": ("cllm4rec_dist.baselines.ease", "EaseSettings"),
    "multivae": ("cllm4rec_dist.baselines.multivae", "MultiVAESettings"),
    "content-knn": ("cllm4rec_dist.baselines.content_knn", "ContentKnnSettings"),
}
# models that read the item texts (items.json) besides the split
TEXT_MODELS = ("content-knn",)
# models scored on the stored candidates of a leave-one-out dataset
CANDIDATE_MODELS = ("popular", "sasrec", "gru4rec")
SEQUENTIAL_ONLY = ("sasrec", "gru4rec")


def run_baseline(split: EvalSplit, model: str, texts: list[str] | None = None, **settings: Any) -> dict[str, Any]:
    """Fit ``model`` on ``split.train``, select on valid, score test once; return the result dict.

    ``settings`` are fields of the model's settings dataclass (e.g. ``seed``,
    ``epochs`` for multivae; ``lambdas`` for ease; ``neighbours`` for content-knn;
    ``exclude_valid_on_test`` for all); None means "default", and a setting the model does not have is a
    ``SettingsError`` (a TypeError). ``texts``: one text per item, for the ``TEXT_MODELS``
    (``dataset_item_texts``). The dict: {"model", "valid", "test", "selected", "settings",
    "seconds"} plus "history" for models that search or train.
    """
    from cllm4rec_dist.baselines.common import settings_from_kwargs

    if model not in MODELS:
        raise ValueError(f"unknown baseline {model!r}; choose from {', '.join(MODELS)}")
    module_name, cls_name = MODELS[model]
    module = importlib.import_module(module_name)
    parsed = settings_from_kwargs(getattr(module, cls_name), model, settings)
    if model in TEXT_MODELS:
        if texts is None:
            raise ValueError(f"{model} scores items by their texts; pass texts= (dataset_item_texts(data))")
        return module.run(split, parsed, texts)
    return module.run(split, parsed)


def dataset_item_texts(dataset) -> list[str]:
    """One text per item of a preprocessed dataset (a ShardedDataset): ``items.json``'s description, else title."""
    from cllm4rec_dist.baselines.content_knn import item_texts
    from cllm4rec_dist.corpus.sequences import ITEMS_FILE

    return item_texts(dataset.read_json(ITEMS_FILE), f"{dataset.url}/{ITEMS_FILE}")


def run_candidate_baseline(data, model: str, model_out: str | None = None, **settings: Any) -> dict[str, Any]:
    """Score ``model`` on a ``SequentialData``'s stored candidates; the result dict of ``run_baseline``.

    ``popular`` ranks by train counts; ``sasrec`` / ``gru4rec`` train stage 0 (``baselines/sequential.py``)
    with early stopping on the validation candidates; ``settings`` are ``CFStageSettings`` fields
    (None = default) and the best model is saved to ``model_out`` when given.
    """
    from cllm4rec_dist.baselines.common import SettingsError

    if model not in CANDIDATE_MODELS:
        raise ValueError(f"{model} is not scored on candidates; choose from {', '.join(CANDIDATE_MODELS)}")
    given = {k: v for k, v in settings.items() if v is not None}
    if model == "popular":
        from cllm4rec_dist.baselines.popular import run_candidates

        if given:
            raise SettingsError(f"setting(s) {', '.join(sorted(given))} do not apply to popular")
        return run_candidates(data)
    import dataclasses

    from cllm4rec_dist.baselines.sequential import CFStage, CFStageSettings

    names = {f.name for f in dataclasses.fields(CFStageSettings)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise SettingsError(f"setting(s) {', '.join(unknown)} do not apply to {model}; "
                            f"valid: {', '.join(sorted(names))}")
    stage = CFStage(data, CFStageSettings(model=model, **given)).setup()
    result = stage.train()
    if model_out:
        stage.save_checkpoint(model_out)
    return {"model": model, "valid": result["valid"], "test": result["test"],
            "selected": {"best_epoch": result["best_epoch"]}, "settings": dataclasses.asdict(stage.settings),
            "seconds": result["seconds"], "history": result["history"]}


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help="preprocessed dataset directory (output of `cllm4rec preprocess`)")
    parser.add_argument("--model", required=True, choices=sorted(set(MODELS) | set(CANDIDATE_MODELS)),
                        help="which baseline; sasrec and gru4rec need a --split leave-one-out dataset")
    parser.add_argument("--out", default=None, help="result JSON (default: DATA/baselines/<model>.json)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (multivae, sasrec, gru4rec; default 0)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (multivae; default 100) / most epochs (sasrec, gru4rec; default 200)")
    parser.add_argument("--patience", type=int, default=None,
                        help="sasrec, gru4rec: stop after this many validations without a better ndcg@10 (default 20)")
    parser.add_argument("--model-out", default=None,
                        help="sasrec, gru4rec: save the best model here (safetensors + JSON)")
    parser.add_argument(
        "--lambdas", type=_float_list, default=None,
        help="comma-separated L2 grid searched on validation (ease; default 1,10,50,100,200,500,1000,2000)",
    )
    parser.add_argument(
        "--neighbours", type=_int_list, default=None,
        help="comma-separated neighbourhood sizes searched on validation (content-knn; default 10,20,50,100,200)",
    )
    parser.add_argument("--encoder", default=None,
                        help="content-knn: local sentence-transformers folder (default all-MiniLM-L6-v2, offline)")
    parser.add_argument("--device", default=None, help="torch device (multivae, content-knn; default cpu)")
    parser.add_argument(
        "--threads", dest="num_threads", type=int, default=None,
        help="torch CPU threads (multivae, content-knn; default 1, robust on a shared CPU; 0 = torch's default, "
             "all cores)",
    )
    parser.add_argument(
        "--keep-valid-on-test", dest="exclude_valid_on_test", action="store_false", default=None,
        help="when scoring test, exclude only train items (as the authors' predict.py) instead of train + valid",
    )


def run(args: argparse.Namespace) -> int:
    from cllm4rec_dist.baselines.common import SettingsError
    from cllm4rec_dist.corpus.sequences import SequentialData
    from cllm4rec_dist.corpus.shards import ShardedDataset

    dataset = ShardedDataset(args.data)
    leave_one_out = dataset.manifest.get("protocol", {}).get("split") == "leave-one-out"
    if args.model in SEQUENTIAL_ONLY and not leave_one_out:
        print(f"error: {args.data} was preprocessed with the random split; --model {args.model} is scored on stored "
              "candidates: re-run `cllm4rec preprocess ... --split leave-one-out`.", file=sys.stderr)
        return 2
    try:
        if leave_one_out and args.model in CANDIDATE_MODELS:
            for flag in ("lambdas", "neighbours", "encoder", "device", "exclude_valid_on_test"):
                if getattr(args, flag) is not None:
                    raise SettingsError(f"--{flag.replace('_', '-')} does not apply to {args.model} on candidates")
            result = run_candidate_baseline(
                SequentialData.open(dataset), args.model, model_out=args.model_out,
                seed=args.seed, max_epochs=args.epochs, patience=args.patience, num_threads=args.num_threads)
        else:
            if args.patience is not None or args.model_out is not None:
                raise SettingsError("--patience and --model-out apply to sasrec and gru4rec only")
            settings = {
                "seed": args.seed,
                "epochs": args.epochs,
                "lambdas": args.lambdas,
                "neighbours": args.neighbours,
                "encoder": args.encoder,
                "device": args.device,
                "num_threads": args.num_threads,
                "exclude_valid_on_test": args.exclude_valid_on_test,
            }
            texts = dataset_item_texts(dataset) if args.model in TEXT_MODELS else None
            result = run_baseline(dataset.eval_split(), args.model, texts=texts, **settings)
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
