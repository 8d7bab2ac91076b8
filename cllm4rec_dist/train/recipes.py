"""The recipe registry: ``TrainConfig.recommender`` -> the recipe class every entry point runs.

`cllm4rec train` (train/reference.py), each Ray Train worker and each torchrun/deepspeed process
(train/distributed.py) look the recipe up here; a recipe has ``__init__(cfg, rank, engine_factory,
sink, timer=None)``, ``setup()``, ``train() -> dict`` and ``save_checkpoint()``. A new model is a new recipe
module and one line below (plus its value in config.RECOMMENDERS).
"""

from __future__ import annotations

import importlib

RECIPES: dict[str, str] = {
    "cllm4rec": "cllm4rec_dist.train.recipe:CLLM4RecRecipe",
    "allmrec": "cllm4rec_dist.train.allmrec:ALLMRecRecipe",
}


def recipe_class(recommender: str):
    """The recipe class of a recommender name (imported on demand: each pulls in only its own model)."""
    if recommender not in RECIPES:
        raise ValueError(f"recommender={recommender!r}; known: {', '.join(RECIPES)}")
    module, name = RECIPES[recommender].split(":")
    return getattr(importlib.import_module(module), name)
