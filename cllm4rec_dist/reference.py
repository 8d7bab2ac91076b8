"""`cllm4rec train`: the single-process reference trainer (no Ray, no DeepSpeed).

The same recipe, schedule, losses and checkpoints as the distributed trainer,
with torch Adam engines. It is what the distributed trainer is tested against
(``--simulate_ranks W`` reproduces a W-worker run) and the quickest way to debug.
"""

from __future__ import annotations

import json

from cllm4rec_dist.config import TrainConfig, add_config_arguments, config_from_args
from cllm4rec_dist.corpus.preprocess import demo_dataset
from cllm4rec_dist.recommenders import recommender
from cllm4rec_dist.train.checkpoint import LocalSink
from cllm4rec_dist.train.engines import TorchEngine
from cllm4rec_dist.train.rank import Rank
from cllm4rec_dist.train.run_folder import RunLock, default_run_dir


def run_reference(cfg: TrainConfig, on_validation=None, score_test: bool = True,
                  checkpoint_new_best: bool = False) -> dict:
    """Train ``cfg`` in this process; ``on_validation(record)`` is called after each validation (Ray Tune's
    report; a resumed run first calls it with each restored validation), ``score_test=False`` ends at validation
    (tuning) and the result then has no "test"; ``checkpoint_new_best`` checkpoints every validation that improves
    the best before reporting it."""
    def engine_factory(name, params, lr):
        return TorchEngine(name, params, lr, cfg.optim.weight_decay, cfg.optim.grad_clip)

    cfg.out = cfg.out or default_run_dir()
    with RunLock(cfg.out):
        recipe = recommender(cfg.recommender).recipe_class()(cfg, Rank(0, 1, accumulate=cfg.simulate_ranks),
                                               engine_factory, LocalSink(cfg.out, cfg.keep_checkpoints)).setup()
        recipe.trainer.on_validation, recipe.trainer.score_test = on_validation, score_test
        recipe.trainer.checkpoint_new_best = checkpoint_new_best
        return recipe.train()


def add_arguments(p) -> None:
    p.description = ("Train a recommender in one process. CLLM4Rec (recommender: cllm4rec): content warm-up, L/C "
                     "pretraining, rec finetuning with validation, test of the best model. A-LLMRec (recommender: "
                     "allmrec): CF model, collaborative-text alignment, LLM alignment, candidate evaluation. "
                     "Every setting is a flag (--section.field VALUE) or "
                     "a key of a --config YAML file. Writes RUN/metrics.json, RUN/config.yaml, "
                     "RUN/train_log.jsonl, RUN/tensorboard and RUN/checkpoints.")
    add_config_arguments(p)


def run(args) -> int:
    cfg = config_from_args(args)
    cfg.data = demo_dataset(cfg.data)  # the embedded demos are built on first use, as by the Ray launcher
    result = run_reference(cfg)
    keys = ("valid", "test", "best", "stages", "stopped", "global_step", "seconds")
    print(json.dumps({k: result[k] for k in keys if k in result}, indent=1, default=str))
    return 0
